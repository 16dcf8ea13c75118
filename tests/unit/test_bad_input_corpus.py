"""Bad input, without a stack: every kind of bad record on every input topic is
refused with a clear reason (`BadRecord`), never an escaping exception.

The corpus generators here (`bad_corpus`, `verdict`) are also what the
integration test (tests/integration/test_bad_input.py) sends to a real worker.

Decisions documented by these tests:

- NaN and ±Infinity are accepted as PV values (JSON `NaN`, `Infinity`, as
  Python's json reads them, or Avro doubles): an EPICS double can be NaN; the
  rule language treats NaN as unknown and infinities as numbers.
- A rule over a PV that nobody monitors is accepted; the alarm stays inactive
  until the PV reports (the engine cannot tell "not monitored yet" from "not
  monitored": monitored-pvs may be written after the alarm).
- Free text is bounded (records.MAX_TEXT), PV names are bounded and printable
  (records.MAX_NAME), waveforms and PV strings are bounded (records.MAX_WAVEFORM,
  MAX_PV_TEXT), strings must be valid Unicode (no lone surrogates from JSON
  "\\ud800" escapes), so that whatever is accepted can be written back out.
"""

from __future__ import annotations

import json
import math
import struct

import hypothesis
import pytest
from hypothesis import HealthCheck, Phase, given, strategies as st

from alarm_engine import records
from alarm_engine.codec import MAX_VALUE_BYTES, BadRecord, decode_key
from alarm_engine.config import Settings
from alarm_engine.core.rules import MAX_DEPTH, RuleError, parse

INPUT_TOPICS = ("monitored-pvs", "alarms", "shelved-alarms", "alarm-activations", "pv-state")
# The operator actions and the location tree (config.MANAGEMENT_TOPICS): checked here record by
# record; the end-to-end corpus (tests/integration/test_bad_input.py) covers INPUT_TOPICS.
MANAGEMENT_INPUTS = ("alarm-acks", "disabled-alarms", "alarm-locations")
NOW_MS = 1_767_225_600_000  # 2026-01-01
SETTINGS = Settings()

# One valid datum per topic: the base that the corpus spoils.
VALID = {
    "monitored-pvs": {"mask": ["VALUE", "ALARM"], "topic": None},
    "alarms": {"producer": {"source": "test"}, "location": "L", "category": "C", "docUrl": "",
               "edmPath": "", "priority": "P3_PRODUCTIVITY", "description": ""},
    "shelved-alarms": {"user": "op", "reason": "", "comment": "", "expiration": NOW_MS + 3_600_000,
                       "oneshot": False, "duration": None},
    "alarm-activations": {"priority": None, "note": "n"},
    "pv-state": {"connection": "CONNECTED", "value": 1.0, "severity": "MAJOR", "status": "HIHI",
                 "iocTimestamp": None, "receivedAt": NOW_MS},
    "alarm-acks": {"user": "op", "host": "console1", "comment": "", "time": NOW_MS, "unack": False},
    "disabled-alarms": {"user": "op", "host": "", "reason": "broken", "comment": "", "until": NOW_MS + 3_600_000},
    "alarm-locations": {"parent": "CEBAF", "description": ""},
}
# Another topic's schema for each topic (a valid Avro record of the wrong kind).
OTHER = {"monitored-pvs": "pv-state", "alarms": "shelved-alarms", "shelved-alarms": "alarms",
         "alarm-activations": "pv-state", "pv-state": "alarms", "alarm-acks": "alarms",
         "disabled-alarms": "alarm-locations", "alarm-locations": "pv-state"}

PYTHONISH = [
    "__import__('os').system('id')", "__import__(\"os\")", "lambda: 1", "(lambda x: x)(1)",
    "().__class__.__bases__[0].__subclasses__()", "`A`.__class__", "eval(\"1\")", "exec(\"x=1\")",
    "open(\"/etc/passwd\")", "globals()", "os.system(\"id\")", "[x for x in (1,)]", "{}", "[]",
    "`A` if 1 else 2", "import os", "1; 2", "a = 1", "`A`.value > 1", "getattr(`A`, \"x\")",
    "f\"{1}\"", "b\"x\"", "1 ** 2", "1 // 2", "~1", "1 << 2", "1 & 2", "`A` is None", "`A` in (1, 2)",
    "print(1)", "__builtins__", "x", "True", "None", "`A` > 1 # comment", "'single'",
]

# ----------------------------------------------------------------- strategies

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda c: st.one_of(st.lists(c, max_size=3),
                                                             st.dictionaries(st.text(max_size=8), c, max_size=3)),
                           max_leaves=8)


def _dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _bad_keys(i: int) -> st.SearchStrategy:
    return st.sampled_from([
        None, b"", b" ", b"\t\n", b"\xff\xfe" + str(i).encode(), b"bad\n" + str(i).encode(),
        b"bad\x00" + str(i).encode(), b"k" * 513 + str(i).encode(), b"\xc3\x28" + str(i).encode(),
        b"\xed\xa0\x80" + str(i).encode(),  # a UTF-8-encoded surrogate: not UTF-8
    ])


def _wrong_type_for(value):
    """A JSON value of another type than `value`'s."""
    if isinstance(value, bool):
        return st.one_of(st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=2))
    if isinstance(value, (int, float)):
        return st.one_of(st.booleans(), st.text(max_size=5), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
    if isinstance(value, str):
        return st.one_of(st.booleans(), st.integers(), st.lists(st.text(max_size=3), max_size=2))
    if isinstance(value, list):
        return st.one_of(st.text(max_size=5), st.integers(), st.booleans())
    return st.one_of(st.integers(), st.lists(st.integers(), max_size=2), st.text(max_size=5))


def _content(topic: str) -> list[st.SearchStrategy]:
    """Schema-valid JSON whose content the engine must refuse, per topic."""
    v = VALID[topic]
    surrogate = st.sampled_from(["\ud800", "a\udfffb", "\udbff"])
    if topic == "alarms":
        def alarm(producer, **kw):
            return {**v, "producer": producer, **kw}
        bad_rule = st.text(alphabet="`AB1 ()<>=!&|+-*/%.,\"'x", min_size=1, max_size=30).filter(_rule_fails)
        nested = st.builds(lambda n, op: op[0] * n + "1" + op[1] * n, st.integers(MAX_DEPTH + 1, 1500),
                           st.sampled_from([("(", ")"), ("-", ""), ("!", ""), ("not ", ""), ("abs(", ")")]))
        chained = st.builds(lambda n, op: op.join(["`A`"] * n), st.integers(MAX_DEPTH + 2, 900),
                            st.sampled_from(["+", "*", " and ", " or ", "-"]))
        return [
            st.builds(lambda e: alarm({"expression": e, "severity": "MAJOR"}),
                      st.one_of(bad_rule, st.sampled_from(PYTHONISH), nested, chained,
                                st.just("`A` > " + "1" * 5000), st.just(""), st.just("`" + "P" * 600 + "` > 1"))),
            st.builds(lambda pv: alarm({"pv": pv}),
                      st.one_of(st.sampled_from(["", " ", "A B", "A\nB", "A\x00", "\t", "P" * 513]),
                                surrogate)),
            st.builds(lambda j: alarm({"jar": j}), st.text(max_size=10)),
            st.builds(lambda f, s: alarm({"source": "x"}, **{f: s}),
                      st.sampled_from(["location", "category", "description", "docUrl", "edmPath"]),
                      st.one_of(surrogate, st.just("x" * (records.MAX_TEXT + 1)))),
        ]
    absurd_times = st.one_of(st.integers(-(2**63), records.MIN_TIME_MS - 1),
                             st.integers(records.MAX_TIME_MS + 1, 2**63 - 1))
    if topic == "shelved-alarms":
        absurd = st.one_of(st.integers(-(2**63), records.MIN_TIME_MS - 1),
                           st.integers(records.MAX_TIME_MS + 1, 2**63 - 1),
                           st.sampled_from([0, -1, 1_700_000_000, 2**63 - 1, -(2**63)]))
        return [
            st.builds(lambda e: {**v, "expiration": e}, absurd),
            st.builds(lambda e: {**v, "expiration": None, "duration": {"expiration": e}}, absurd),
            st.builds(lambda e: {**v, "expiration": e}, st.integers(NOW_MS + SETTINGS.max_shelve_s * 1000 + 1,
                                                                   records.MAX_TIME_MS)),
            st.just({**v, "expiration": None}),  # indefinite, while a maximum is set
            st.builds(lambda r: {**v, "reason": r}, st.sampled_from(["Broken", "stale!", "x", "Chatter"])),
            st.builds(lambda u: {**v, "user": u}, st.sampled_from(["", " ", "\t\n"])),
            st.builds(lambda f, s: {**v, f: s}, st.sampled_from(["user", "reason", "comment"]),
                      st.one_of(surrogate, st.just("x" * (records.MAX_TEXT + 1)))),
        ]
    if topic == "alarm-acks":
        return [st.builds(lambda u: {**v, "user": u}, st.sampled_from(["", " ", "\t\n"])),
                st.builds(lambda e: {**v, "time": e}, absurd_times),
                st.builds(lambda f, s: {**v, f: s}, st.sampled_from(["user", "host", "comment"]),
                          st.one_of(surrogate, st.just("x" * (records.MAX_COMMENT + 1))))]
    if topic == "disabled-alarms":
        return [st.builds(lambda u: {**v, "user": u}, st.sampled_from(["", " ", "\t\n"])),
                st.builds(lambda e: {**v, "until": e}, st.one_of(absurd_times, st.integers(records.MIN_TIME_MS, NOW_MS))),
                st.builds(lambda f, s: {**v, f: s}, st.sampled_from(["user", "host", "reason", "comment"]),
                          st.one_of(surrogate, st.just("x" * (records.MAX_COMMENT + 1))))]
    if topic == "alarm-locations":
        return [st.builds(lambda s: {**v, "parent": s}, st.sampled_from(["", " ", "\t"])),
                st.builds(lambda s: {**v, "description": s}, st.one_of(surrogate, st.just("x" * (records.MAX_TEXT + 1))))]
    if topic == "alarm-activations":
        return [st.builds(lambda s: {**v, "note": s}, st.one_of(surrogate, st.just("x" * (records.MAX_TEXT + 1)))),
                st.builds(lambda p: {**v, "priority": p}, st.sampled_from(["P0", "p1_life", "", "HIGH"]))]
    if topic == "monitored-pvs":
        return [st.builds(lambda m: {**v, "mask": m},
                          st.lists(st.sampled_from(["value", "DBE_VALUE", "PROPERTY", "", "ALL"]), min_size=1, max_size=3))]
    if topic == "pv-state":
        return [
            st.builds(lambda n: {**v, "value": [0.5] * n}, st.integers(records.MAX_WAVEFORM + 1, 5000)),
            st.builds(lambda s: {**v, "status": s}, st.one_of(surrogate, st.just("S" * (records.MAX_PV_TEXT + 1)))),
            st.builds(lambda s: {**v, "value": s}, st.one_of(surrogate, st.just("S" * (records.MAX_PV_TEXT + 1)))),
            st.builds(lambda c: {**v, "connection": c}, st.sampled_from(["connected", "UP", "", "LOST"])),
            st.builds(lambda s: {**v, "severity": s}, st.sampled_from(["HIGH", "minor", "5", ""])),
            st.builds(lambda x: {**v, "value": x}, st.one_of(st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                                                             st.lists(st.text(max_size=3), min_size=1, max_size=3))),
        ]
    return []


def _rule_fails(text: str) -> bool:
    try:
        parse(text)
    except RuleError:
        return True
    return False


@st.composite
def bad_record(draw, topic: str, codec, i: int):
    """(category, key, value) of a record the engine must dead-letter. `i` makes keys unique."""
    key = f"bad-{topic}-{i}".encode()
    v = VALID[topic]
    avro = codec.encode(topic, v)
    sid = struct.unpack(">I", avro[1:5])[0]
    ws = b" \t\n\r\x0b\x0c"
    kinds = {
        "random bytes": st.binary(min_size=1, max_size=64),
        "wrong magic byte": st.builds(lambda m: bytes([m]) + avro[1:],
                                      st.integers(1, 255).filter(lambda m: m != ord("{") and m not in ws)),
        "unknown schema id": st.builds(lambda s, body: b"\x00" + struct.pack(">I", s) + body,
                                       st.integers(1_000_000, 2**32 - 1), st.binary(max_size=16)),
        "truncated Avro": st.builds(lambda n: avro[:n], st.integers(0, len(avro) - 1)).filter(bool),
        "Avro of another topic": st.just(codec.encode(OTHER[topic], VALID[OTHER[topic]])),
        "Avro with trailing bytes": st.builds(lambda t: avro + t, st.binary(min_size=1, max_size=8)),
        "Avro with a wrong body": st.builds(lambda b: avro[:5] + b, st.binary(min_size=0, max_size=12)),
        "empty value": st.just(b""),
        "JSON not an object": st.builds(_dumps, st.one_of(st.lists(json_values, max_size=3), st.integers(),
                                                           st.text(max_size=8), st.booleans(), st.none())),
        "JSON of the wrong shape": st.builds(_dumps, st.dictionaries(st.text(max_size=10), json_values,
                                                                     min_size=1, max_size=4)),
        "JSON with a wrong type": st.sampled_from(sorted(v)).flatmap(
            lambda f: st.builds(lambda x: _dumps({**v, f: x}), _wrong_type_for(v[f]))),
        "JSON with an unknown field": st.builds(lambda f, x: _dumps({**v, f: x}),
                                                st.text(min_size=1, max_size=8).filter(lambda f: f not in v), json_values),
        "JSON missing a required field": st.sampled_from(
            [_dumps({k: x for k, x in v.items() if k != f}) for f in _required(topic)] or [b"{"]),
        "JSON not UTF-8": st.builds(lambda b: _dumps(v)[:-1] + b',"x":"' + b + b'"}',
                                    st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80abc"])),
        "malformed JSON": st.builds(lambda n: _dumps(v)[:n], st.integers(1, len(_dumps(v)) - 1)),
        "deeply nested JSON": st.builds(lambda n: b'{"x":' + b"[" * n + b"]" * n + b"}", st.integers(1000, 100_000)),
        "huge integer": st.builds(lambda d: b'{"x":' + b"9" * d + b"}", st.integers(400, 6000)),
        "NaN where an integer goes": st.just(_dumps(v)[:-1] + b',"oneshot":NaN}' if topic == "shelved-alarms"
                                             else b'{"mask":NaN}' if topic == "monitored-pvs"
                                             else _dumps(v)[:-1].replace(b'"receivedAt":', b'"x":') + b',"receivedAt":NaN}'
                                             if topic == "pv-state" else b'{"note":Infinity}'),
        "bad key": st.builds(lambda k: ("bad key", k, avro), _bad_keys(i)),
        "content": st.one_of(*[s.map(_dumps) for s in _content(topic)]) if _content(topic) else st.just(b""),
    }
    if topic == "pv-state":
        kinds["huge integer"] = st.builds(lambda d: _dumps(v)[:-1].replace(b'"value":1.0', b'"value":' + b"9" * d),
                                          st.integers(310, 4000))
    # Topic-specific content (bad rules, absurd expiries, ...) drawn as often as five other kinds.
    name = draw(st.sampled_from(sorted(kinds) + ["content"] * 4))
    got = draw(kinds[name])
    if isinstance(got, tuple):
        return got
    return name, key, got


def _required(topic: str) -> list[str]:
    from alarm_engine.codec import load_schema
    from alarm_engine.config import VALUE_SCHEMAS

    return [f["name"] for f in load_schema(VALUE_SCHEMAS[topic])["fields"] if "default" not in f]


def verdict(topic: str, key: bytes | None, value: bytes | None, codec, settings: Settings = SETTINGS) -> str | None:
    """The reason the engine's checks refuse a record, or None if they accept it.
    Anything but BadRecord escaping is a bug (it would be an "internal error")."""
    try:
        k = decode_key(key)
        datum = codec.decode(topic, value)
        if datum is not None:
            records.validate(topic, k, datum, settings, NOW_MS)
    except BadRecord as e:
        return str(e)
    return None


def draw_corpus(strategy_for, n: int, seed: int) -> list:
    """n examples drawn up front, deterministically (hypothesis as a generator)."""
    out: list = []

    @hypothesis.seed(seed)
    @hypothesis.settings(max_examples=n, database=None, phases=[Phase.generate], deadline=None,
                         suppress_health_check=list(HealthCheck))
    @given(st.data())
    def collect(data):
        out.append(data.draw(strategy_for(len(out))))

    collect()
    return out


def bad_corpus(topic: str, codec, n: int = 200, seed: int = 5, settings: Settings = SETTINGS) -> list:
    """[(category, key, value, reason)]: records the engine must refuse; draws that are
    accidentally valid (random bytes that happen to decode, say) are dropped."""
    out = []
    for category, key, value in draw_corpus(lambda i: bad_record(topic, codec, i), n, seed):
        reason = verdict(topic, key, value, codec, settings)
        if reason is not None:
            out.append((category, key, value, reason))
    return out


# ---------------------------------------------------------------------- tests


@pytest.mark.parametrize("topic", INPUT_TOPICS + MANAGEMENT_INPUTS)
def test_the_valid_base_records_are_valid(codec, topic):
    assert verdict(topic, b"k", codec.encode(topic, VALID[topic]), codec) is None
    assert verdict(topic, b"k", _dumps(VALID[topic]), codec) is None
    assert verdict(topic, b"k", None, codec) is None  # tombstone


@pytest.mark.parametrize("topic", INPUT_TOPICS + MANAGEMENT_INPUTS)
def test_corpus_is_refused_with_reasons(codec, topic):
    corpus = bad_corpus(topic, codec, n=150, seed=11)
    assert len(corpus) >= 120, f"too many accidental valid draws: {len(corpus)}"
    categories = {c for c, *_ in corpus}
    assert {"random bytes", "unknown schema id", "JSON with a wrong type", "bad key"} <= categories
    for category, key, value, reason in corpus:
        assert reason and "internal error" not in reason, (category, key, value[:80])


@pytest.mark.parametrize("topic", INPUT_TOPICS + MANAGEMENT_INPUTS)
@hypothesis.settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.one_of(st.none(), st.binary(max_size=20)), value=st.one_of(st.none(), st.binary(max_size=200)))
def test_arbitrary_bytes_never_escape(codec, topic, key, value):
    verdict(topic, key, value, codec)  # BadRecord or accepted; anything else fails the test


@pytest.mark.parametrize("topic", INPUT_TOPICS + MANAGEMENT_INPUTS)
@hypothesis.settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(obj=st.dictionaries(st.text(max_size=12), json_values, max_size=6))
def test_arbitrary_json_objects_never_escape(codec, topic, obj):
    merged = {**VALID[topic], **obj}
    verdict(topic, b"k", _dumps(merged), codec)
    verdict(topic, b"k", _dumps(obj), codec)


@pytest.mark.parametrize("payload", PYTHONISH)
def test_python_never_reaches_the_rule_language(payload):
    with pytest.raises(RuleError):
        parse(payload)


def test_python_payloads_are_dead_letter_reasons(codec):
    for payload in PYTHONISH:
        value = _dumps({**VALID["alarms"], "producer": {"expression": payload, "severity": "MAJOR"}})
        reason = verdict("alarms", b"a", value, codec)
        assert reason and "column" in reason, payload


@pytest.mark.parametrize("op", [("(", ")"), ("-", ""), ("!", ""), ("not ", ""), ("abs(", ")"), ("max(1,", ")")])
def test_deep_nesting_is_a_rule_error_not_a_recursion_error(op):
    for n in (MAX_DEPTH + 1, 300, 1000):
        with pytest.raises(RuleError, match="nested too deeply|too long"):
            parse(op[0] * n + "`A`" + op[1] * n)


def test_values_over_a_mebibyte_are_refused_and_large_legal_ones_accepted(codec):
    note = "x" * records.MAX_TEXT
    legal = _dumps({"note": note})
    assert verdict("alarm-activations", b"a", legal, codec) is None
    big = b'{"note":"' + b"x" * MAX_VALUE_BYTES + b'"}'
    assert "exceeds the 1048576-byte limit" in verdict("alarm-activations", b"a", big, codec)
    wave = _dumps({**VALID["pv-state"], "value": [1.5] * records.MAX_WAVEFORM})
    assert verdict("pv-state", b"p", wave, codec) is None
    desc = {f: "d" * records.MAX_TEXT for f in ("location", "category", "docUrl", "edmPath", "description")}
    assert verdict("alarms", b"a", codec.encode("alarms", {**VALID["alarms"], **desc}), codec) is None


@pytest.mark.parametrize("raw", [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"[NaN, 1.5, -Infinity]"])
def test_nan_and_infinity_are_accepted_pv_values(codec, raw):
    value = _dumps(VALID["pv-state"]).replace(b'"value":1.0', b'"value":' + raw)
    assert verdict("pv-state", b"p", value, codec) is None
    datum = codec.decode("pv-state", value)
    v = datum["value"]
    assert all(isinstance(x, float) and (math.isnan(x) or math.isinf(x) or x == 1.5)
               for x in (v if isinstance(v, list) else [v]))


def test_huge_integers_give_a_reason_not_an_overflow(codec):
    for digits in (20, 309, 400, 4300):
        value = _dumps(VALID["pv-state"]).replace(b'"value":1.0', b'"value":' + b"9" * digits)
        reason = verdict("pv-state", b"p", value, codec)
        assert (reason is None) == (digits <= 308), reason  # a double holds up to ~1.8e308
    assert "out of range for long" in verdict("shelved-alarms", b"a", b'{"user":"u","expiration":' + b"9" * 30 + b"}", codec)
    assert "malformed JSON" in verdict("shelved-alarms", b"a", b'{"user":"u","expiration":' + b"9" * 5000 + b"}", codec)


@pytest.mark.parametrize("pv", ["A B", "A\nB", " ", "\ud800", "P" * 513])
def test_pv_names_must_be_usable_keys(codec, pv):
    reason = verdict("alarms", b"a", _dumps({**VALID["alarms"], "producer": {"pv": pv}}), codec)
    assert reason and "PV name" in reason


def test_rule_over_an_unknown_pv_is_accepted(codec):
    # Decision: accepted; the alarm stays inactive until the PV reports (nobody monitors it).
    value = _dumps({**VALID["alarms"], "producer": {"expression": "`NOBODY:MONITORS:THIS` > 1", "severity": "MAJOR"}})
    assert verdict("alarms", b"a", value, codec) is None


@pytest.mark.parametrize("exp", [0, -1, 1_700_000_000, records.MAX_TIME_MS + 1, 2**63 - 1, -(2**63)])
def test_absurd_expirations_are_refused(codec, exp):
    for datum in ({**VALID["shelved-alarms"], "expiration": exp},
                  {**VALID["shelved-alarms"], "expiration": None, "duration": {"expiration": exp}}):
        assert "between 2000 and 3000" in verdict("shelved-alarms", b"a", codec.encode("shelved-alarms", datum), codec)


@pytest.mark.parametrize("key", [None, b"", b" ", b"\xff", b"a\x00b", b"a\nb", b"k" * 513, b"\xed\xa0\x80"])
def test_bad_keys_are_refused(codec, key):
    assert verdict("alarms", key, _dumps(VALID["alarms"]), codec)
