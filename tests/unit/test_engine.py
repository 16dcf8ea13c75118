"""The engine's record handling with dict tables: routing, emission, state round trip."""

from __future__ import annotations

import json

import pytest

from alarm_engine.codec import BadRecord
from alarm_engine.config import Settings
from alarm_engine.core import AlarmState, Connection, PVState, Severity, step, DefinitionSet, AlarmDef
from alarm_engine.engine import AlarmProcessor, state_from_json, state_to_json
from alarm_engine.pv_home import PVEntry, PVHome, decode_entry, encode_entry

S = Settings()
T0 = 1_800_000_000_000


def j(obj) -> bytes:
    return json.dumps(obj).encode()


def pv_msg(pv, severity="NO_ALARM", connection="CONNECTED", value=1.0, ts=T0):
    return j({"pv": pv, "state": {"connection": connection, "value": value, "severity": severity,
                                  "status": "HIHI" if severity != "NO_ALARM" else "NO_ALARM",
                                  "iocTimestamp": ts, "receivedAt": ts}})


def tick(alarm, pv, ts):
    from alarm_engine.engine import Out

    return Out("alarm-deps", pv.encode(), j({"alarm": alarm, "tick": ts}))


class Harness:
    """An AlarmProcessor and a PVHome wired to each other by hand; each PV's entry
    goes through its encoding after every record, as it does through the table."""

    def __init__(self, codec):
        self.codec = codec
        self.alarms = AlarmProcessor(S, codec, {})
        self.home = PVHome(codec)
        self.entries: dict[str, bytes] = {}
        self.active: dict[str, dict] = {}
        self.emitted: list = []

    def feed(self, topic, key, value, ts=T0):
        outs = self.alarms.handle(topic, key, value, ts)
        self._route(outs, ts)
        return outs

    def pv(self, pv, ts=T0, **kw):
        datum = json.loads(pv_msg(pv, ts=ts, **kw))["state"]
        self._route(self._home("pv-state", pv, self.codec.encode("pv-state", datum), ts), ts)

    def entry(self, pv) -> PVEntry:
        return decode_entry(pv, self.entries.get(pv))

    def _home(self, topic, pv, value, ts):
        e = decode_entry(pv, self.entries.get(pv))
        outs = self.home.handle(topic, pv, value, ts, e)
        self.entries[pv] = encode_entry(e)
        return outs

    def _route(self, outs, ts):
        for o in outs:
            if o.topic == "alarm-deps":
                self._route(self._home("alarm-deps", o.key.decode(), o.value, ts), ts)
            elif o.topic == "alarm-inputs":
                self._route(self.alarms.handle("alarm-inputs", o.key.decode(), o.value, ts), ts)
            elif o.topic == "active-alarms":
                value = self.codec.decode("active-alarms", o.value)
                self.emitted.append((o.key.decode(), value))
                if value is None:
                    self.active.pop(o.key.decode(), None)
                else:
                    self.active[o.key.decode()] = value


@pytest.fixture
def h(codec):
    return Harness(codec)


def alarm(h, name, **producer):
    datum = {"producer": producer, "location": "L", "category": "C"}
    return h.feed("alarms", name, h.codec.encode("alarms", h.codec._json["alarms"].read(datum)))


def test_pv_alarm_goes_active_then_tombstone(h):
    alarm(h, "A", pv="T:1")
    h.pv("T:1", severity="MAJOR")
    assert h.active["A"]["severity"] == "MAJOR" and h.active["A"]["state"] == "ACTIVE"
    h.pv("T:1", severity="NO_ALARM", ts=T0 + 10)
    assert "A" not in h.active
    assert h.emitted[-1] == ("A", None)


def test_pv_state_before_the_definition_is_delivered_when_it_arrives(h):
    h.pv("T:1", severity="MINOR")
    alarm(h, "A", pv="T:1")
    assert h.active["A"]["severity"] == "MINOR"


def test_rule_over_two_pvs(h):
    alarm(h, "R", expression="`X` > 5 and `Y` < 1")
    h.pv("X", value=10.0)
    assert "R" not in h.active
    h.pv("Y", value=0.0)
    assert h.active["R"]["cause"] == "RULE"
    h.pv("X", value=1.0)
    assert "R" not in h.active


def test_unchanged_visible_state_emits_nothing(h):
    alarm(h, "A", pv="T:1")
    h.pv("T:1", severity="MAJOR", value=1.0)
    n = len(h.emitted)
    for i in range(5):
        h.pv("T:1", severity="MAJOR", value=float(i), ts=T0 + i)
    assert len(h.emitted) == n


def test_redefinition_moves_the_dependency(h):
    alarm(h, "A", pv="T:1")
    h.pv("T:2", severity="MAJOR")
    alarm(h, "A", pv="T:2")
    assert h.active["A"]["severity"] == "MAJOR"
    assert set(h.entry("T:2").alarms) == {"A"} and h.entry("T:1").alarms == {}


def test_removing_the_definition_tombstones_and_drops_dependencies(h):
    alarm(h, "A", pv="T:1")
    h.pv("T:1", severity="MAJOR")
    h.feed("alarms", "A", None)
    assert "A" not in h.active and h.entry("T:1").alarms == {}


def test_timed_shelving_expires_through_a_tick(h):
    alarm(h, "A", pv="T:1")
    h.pv("T:1", severity="MAJOR")
    shelf = {"user": "op", "expiration": T0 + 1000}
    h.feed("shelved-alarms", "A", h.codec.encode("shelved-alarms", h.codec._json["shelved-alarms"].read(shelf)),
           ts=T0 + 1)
    assert h.active["A"]["state"] == "SHELVED"
    assert h.alarms.deadlines == {}  # evaluated at the PV's home, which keeps the deadline
    assert h.entry("T:1").deadlines() == {"A": T0 + 1000}
    h._route([tick("A", "T:1", T0 + 1000)], T0 + 1000)
    assert h.active["A"]["state"] == "ACTIVE"
    assert h.entry("T:1").deadlines() == {}


def test_rule_alarm_timed_shelving_expires_through_a_tick(h):
    alarm(h, "R", expression="`X` > 1")
    h.pv("X", value=5.0)
    shelf = {"user": "op", "expiration": T0 + 1000}
    h.feed("shelved-alarms", "R", h.codec.encode("shelved-alarms", h.codec._json["shelved-alarms"].read(shelf)),
           ts=T0 + 1)
    assert h.active["R"]["state"] == "SHELVED"
    assert h.alarms.due(T0 + 999) == []
    ticks = h.alarms.due(T0 + 1000)
    assert [t.key for t in ticks] == [b"R"]
    h._route(ticks, T0 + 1000)
    assert h.active["R"]["state"] == "ACTIVE"
    assert h.alarms.deadlines == {}


def test_an_alarm_redefined_from_pv_to_rule_and_back_moves_between_homes(h):
    alarm(h, "A", pv="T:1")
    h.pv("T:1", severity="MAJOR")
    h.pv("X", value=0.0)
    assert h.active["A"]["cause"] == "PV_ALARM"
    alarm(h, "A", expression="`X` > 1")
    # Moved to the alarm's own partition: the rule shows nothing, and says so.
    assert "A" not in h.active and h.emitted[-1] == ("A", None)
    assert h.entry("T:1").alarms == {} and h.entry("X").rules == ["A"]
    h.pv("X", value=5.0)
    assert h.active["A"]["cause"] == "RULE"
    alarm(h, "A", pv="T:1")
    assert h.active["A"]["cause"] == "PV_ALARM" and h.entry("X").rules == []
    h.pv("X", value=0.0)  # no longer read by A
    assert h.active["A"]["cause"] == "PV_ALARM"


def test_a_pv_alarm_redefined_as_a_rule_sees_its_pvs_at_once(h):
    # The rule's PVs answer its `uses` with their state while the alarm is still being
    # released by its old home: that state must not be lost on the way.
    alarm(h, "A", pv="T:1")
    h.pv("T:1", severity="MAJOR")
    h.pv("X", value=5.0, severity="MINOR")
    alarm(h, "A", expression="`X` > 1")
    assert h.active["A"]["cause"] == "RULE"
    h.pv("X", value=0.0, ts=T0 + 1)
    assert "A" not in h.active


def test_a_pv_alarm_redefined_as_a_rule_over_a_disconnected_pv_shows_it(h):
    alarm(h, "A", pv="T:1")
    h.pv("X", connection="DISCONNECTED", severity="INVALID", value=None)
    alarm(h, "A", expression="`X` > 1")
    assert h.active["A"]["severity"] == "INVALID" and "X" in h.active["A"]["message"]


def test_a_replayed_record_sends_the_current_outputs_again(h):
    alarm(h, "A", pv="T:1")
    alarm(h, "R", expression="`T:1` > 1")
    h.pv("T:1", severity="MAJOR", value=5.0)
    outs = h.home.current_outputs("T:1", h.entry("T:1"))
    assert [(o.topic, o.key) for o in outs] == [("active-alarms", b"A"), ("alarm-inputs", b"R")]
    assert h.codec.decode("active-alarms", outs[0].value)["severity"] == "MAJOR"


@pytest.mark.parametrize("value, reason", [
    (b"{", "alarm-deps: malformed JSON"),
    (b'{"alarm": "", "uses": true}', "value.alarm: must be 1 to"),
    (b'{"alarm": "A"}', "none of the fields uses, tick, control"),
    (b'{"alarm": "A", "uses": 1}', "value.uses: expected true or false"),
    (b'{"alarm": "A", "control": {"def": ["A", "rule", null, "x", "P1_LIFE", 2], "shelving": null}}',
     "alarm-deps control of A"),
])
def test_bad_alarm_deps_records_are_rejected_with_a_reason(h, value, reason):
    with pytest.raises(BadRecord, match=reason):
        h._home("alarm-deps", "T:1", value, T0)
    assert "T:1" not in h.entries


def test_bad_rule_is_rejected_with_its_position(h):
    with pytest.raises(BadRecord, match="column"):
        alarm(h, "R", expression="`X` > > 5")


def test_legacy_jar_rule_is_rejected_with_a_reason(h):
    with pytest.raises(BadRecord, match="not supported"):
        alarm(h, "J", jar="rules.jar")


def test_state_json_round_trip():
    d = AlarmDef.for_rule("R", "`X` > 1", "P1_LIFE", location="here")
    s = step(AlarmState(), DefinitionSet(d), T0)
    from alarm_engine.core import PVUpdate
    s = step(s, PVUpdate("X", PVState(Connection.CONNECTED, 5.0, Severity.NO_ALARM, "NO_ALARM", T0, T0)), T0 + 1)
    assert s.shown is not None
    again = state_from_json(json.loads(json.dumps(state_to_json(s))))
    assert again == s


def test_a_dead_letter_of_a_record_near_the_size_limit_stays_under_it(codec):
    from alarm_engine.codec import MAX_VALUE_BYTES
    from alarm_engine.engine import dead_letter

    key, value = b"k" * 5000, b"{" + b"x" * (MAX_VALUE_BYTES - 1)
    out = dead_letter(codec, "alarms", 2, 17, key, value, "why " * 10_000, 0)
    assert len(out.value) < 300 * 1024  # well under Kafka's 1 MiB default
    d = codec.decode("dead-letters", out.value)
    assert d["value"] == value[:256 * 1024] and d["key"] == key[:1024] and out.key == key[:1024]
    assert d["reason"].startswith("why why")
    assert d["reason"].endswith(f"(key cut to 1024 of 5000 bytes, value cut to 262144 of {MAX_VALUE_BYTES} "
                                f"bytes; the whole record is alarms[2]@17)")
    small = codec.decode("dead-letters", dead_letter(codec, "alarms", 0, 1, b"k", b"v", "bad", 0).value)
    assert (small["key"], small["value"], small["reason"]) == (b"k", b"v", "bad")


def test_handovers_are_sent_after_everything_before_them_and_order_is_kept():
    from alarm_engine.engine import Out, in_send_order

    a, b, c = (Out("alarm-deps", b"P", bytes([i])) for i in range(3))
    h1 = Out("alarm-deps", b"P", b"h1", handover=True)
    h2 = Out("alarm-inputs", b"A", b"h2", handover=True)
    assert in_send_order([a, h1, b, c, h2]) == [[a], [h1, b, c], [h2]]
    assert in_send_order([h1, a]) == [[h1, a]]
    assert in_send_order([]) == []
