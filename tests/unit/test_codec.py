"""The codec without a registry: framing, strict JSON, legacy records."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import fastavro
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from alarm_engine.codec import BadRecord, Codec, RegistryUnavailable, decode_key, load_schema
from alarm_engine.config import VALUE_SCHEMAS

from conftest import FakeRegistry  # noqa: E402  (tests/unit/conftest.py)

LEGACY = Path(__file__).resolve().parents[2] / "schemas" / "legacy"


def frame(sid: int, schema: dict, datum: dict) -> bytes:
    buf = io.BytesIO()
    buf.write(struct.pack(">bI", 0, sid))
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), datum)
    return buf.getvalue()


ALARM = {"producer": {"pv": "TEMP:1"}, "location": "NL", "category": "RF"}


def test_every_schema_field_is_documented():
    for name in VALUE_SCHEMAS.values():
        schema = load_schema(name)
        assert schema.get("doc"), name
        for f in schema["fields"]:
            assert f.get("doc"), f"{name}.{f['name']} has no doc"


def test_avro_round_trip_fills_defaults(codec):
    raw = codec.encode("alarms", codec._json["alarms"].read(ALARM))
    assert raw[0] == 0
    got = codec.decode("alarms", raw)
    assert got["producer"] == {"pv": "TEMP:1"}
    assert got["priority"] == "P3_PRODUCTIVITY"
    assert got["docUrl"] == ""


def test_json_and_avro_decode_to_the_same_datum(codec):
    for datum in (ALARM, {"producer": {"expression": "`A` > 1"}, "location": "x", "category": "y"},
                  {"producer": {"source": "PSS"}, "location": "x", "category": "y", "priority": "P1_LIFE"}):
        from_json = codec.decode("alarms", json.dumps(datum).encode())
        from_avro = codec.decode("alarms", codec.encode("alarms", from_json))
        assert from_json == from_avro


def test_tombstone_is_none(codec):
    assert codec.decode("alarms", None) is None


@pytest.mark.parametrize("raw, reason", [
    (b"", "empty value"),
    (b"hello", "neither Confluent-framed Avro"),
    (b"\x00\x00\x00", "shorter than its 5-byte header"),
    (b"\x00\x00\x00\x00\x63\x02", "unknown schema id 99"),
    (b'{"producer": {"pv": "X"}}', "missing required field 'location'"),
    (b'{"producer": {"pv": "X"}, "location": "a", "category": "b", "colour": 1}', "unknown field 'colour'"),
    (b'{"producer": {"pvv": "X"}, "location": "a", "category": "b"}', "matches none of DirectCAAlarm"),
    (b'{"producer": {"pv": 5}, "location": "a", "category": "b"}', "matches none"),
    (b'{"producer": {"pv": "X"}, "location": "a", "category": "b", "priority": "P9"}', "is not one of P1_LIFE"),
    (b'{"producer": ', "malformed JSON"),
    (b'{"a": "\xff"}', "not UTF-8"),
])
def test_bad_values_have_reasons(codec, raw, reason):
    with pytest.raises(BadRecord) as e:
        codec.decode("alarms", raw)
    assert reason in str(e.value)


def test_trailing_bytes_after_avro_body_are_refused(codec):
    raw = codec.encode("alarm-activations", {"priority": None, "note": "x"})
    with pytest.raises(BadRecord, match="trailing"):
        codec.decode("alarm-activations", raw + b"\x00")


def test_registry_down_is_not_a_bad_record(reg):
    # The record may be perfectly good: the reader must retry, not dead-letter it.
    def down(sid):
        raise ConnectionError("connection refused")

    c = Codec({"alarms": load_schema("alarms-value")}, down, reg.register)
    with pytest.raises(RegistryUnavailable, match="schema id 7: schema registry unreachable") as e:
        c.decode("alarms", b"\x00\x00\x00\x00\x07\x00")
    assert not isinstance(e.value, BadRecord)


def test_known_ids_decode_while_the_registry_is_down(reg):
    calls = []

    def fetch(sid):
        calls.append(sid)
        if len(calls) > 1:
            raise ConnectionError("down")
        return reg.fetch(sid)

    c = Codec({"alarms": load_schema("alarms-value")}, fetch, reg.register)
    legacy_id = reg.register("alarms-value", json.load(open(LEGACY / "alarms-value.avsc")))
    raw = frame(legacy_id, reg.by_id[legacy_id], {"producer": {"pv": "A"}, "location": "NL",
                                                  "category": "RF", "docUrl": "", "edmPath": ""})
    assert c.decode("alarms", raw)["location"] == "NL"
    assert c.decode("alarms", raw)["location"] == "NL"
    assert calls == [legacy_id]


@pytest.mark.parametrize("topic, legacy_datum, check", [
    ("monitored-pvs", {"topic": "pv-T1", "mask": ["VALUE", "ALARM"]},
     lambda d: d["mask"] == ["VALUE", "ALARM"] and d["topic"] == "pv-T1"),
    ("alarms", {"producer": {"jar": "x.jar"}, "location": "HA", "category": "Vacuum",
                "docUrl": "/d", "edmPath": "/e"},
     lambda d: d["producer"] == {"jar": "x.jar"} and d["location"] == "HA" and d["priority"] == "P3_PRODUCTIVITY"),
    ("shelved-alarms", {"user": "op", "duration": {"expiration": 1_800_000_000_000}},
     lambda d: d["duration"] == {"expiration": 1_800_000_000_000} and d["expiration"] is None),
    ("shelved-alarms", {"user": "op", "duration": {"reason": "broken"}},
     lambda d: d["duration"] == {"reason": "broken"} and not d["oneshot"]),
    ("active-alarms", {"priority": "P1_LIFE"},
     lambda d: d["priority"] == "P1_LIFE" and d["state"] == "ACTIVE"),
])
def test_records_of_the_original_scripts_still_read(codec, reg, topic, legacy_datum, check):
    legacy = json.load(open(LEGACY / f"{VALUE_SCHEMAS[topic]}.avsc"))
    sid = reg.register(f"{topic}-value", legacy)
    assert check(codec.decode(topic, frame(sid, legacy, legacy_datum)))


def test_json_tagged_union_form_is_accepted(codec):
    raw = json.dumps({"producer": {"org.jlab.RuleAlarm": {"expression": "`A` > 2"}},
                      "location": "a", "category": "b"}).encode()
    assert codec.decode("alarms", raw)["producer"] == {"expression": "`A` > 2", "severity": "MAJOR"}


@pytest.mark.parametrize("raw", [None, b"", b" ", b"a\x00b", "é".encode("latin-1")])
def test_unusable_keys_are_refused(raw):
    with pytest.raises(BadRecord):
        decode_key(raw)


@hsettings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=200), topic=st.sampled_from(sorted(VALUE_SCHEMAS)))
def test_random_bytes_never_raise_anything_but_bad_record(codec, raw, topic):
    try:
        codec.decode(topic, raw)
    except BadRecord:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@hsettings(max_examples=300, deadline=None)
@given(obj=st.dictionaries(st.sampled_from(["producer", "location", "category", "mask", "user", "value",
                                            "connection", "severity", "priority", "note", "x"]),
                           json_values, max_size=6),
       topic=st.sampled_from(sorted(VALUE_SCHEMAS)))
def test_random_json_decodes_or_is_refused_and_decoded_json_encodes(codec, obj, topic):
    raw = json.dumps(obj).encode()
    try:
        datum = codec.decode(topic, raw)
    except BadRecord:
        return
    # Whatever the JSON reader accepts is a valid Avro datum.
    assert codec.decode(topic, codec.encode(topic, datum)) == datum
