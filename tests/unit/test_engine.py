"""The engine's record handling with dict tables: routing, emission, state round trip."""

from __future__ import annotations

import json

import pytest

from alarm_engine.codec import BadRecord
from alarm_engine.config import Settings
from alarm_engine.core import AlarmState, Connection, PVState, Severity, step, DefinitionSet, AlarmDef
from alarm_engine.engine import AlarmProcessor, Router, state_from_json, state_to_json

S = Settings()
T0 = 1_800_000_000_000


def j(obj) -> bytes:
    return json.dumps(obj).encode()


def pv_msg(pv, severity="NO_ALARM", connection="CONNECTED", value=1.0, ts=T0):
    return j({"pv": pv, "state": {"connection": connection, "value": value, "severity": severity,
                                  "status": "HIHI" if severity != "NO_ALARM" else "NO_ALARM",
                                  "iocTimestamp": ts, "receivedAt": ts}})


class Harness:
    """An AlarmProcessor and a Router wired to each other by hand."""

    def __init__(self, codec):
        self.codec = codec
        self.alarms = AlarmProcessor(S, codec, {})
        self.router = Router(codec, {}, {})
        self.active: dict[str, dict] = {}
        self.emitted: list = []

    def feed(self, topic, key, value, ts=T0):
        outs = self.alarms.handle(topic, key, value, ts)
        self._route(outs, ts)
        return outs

    def pv(self, pv, ts=T0, **kw):
        datum = json.loads(pv_msg(pv, ts=ts, **kw))["state"]
        self._route(self.router.handle("pv-state", pv, self.codec.encode("pv-state", datum)), ts)

    def _route(self, outs, ts):
        for o in outs:
            if o.topic == "alarm-deps":
                self._route(self.router.handle("alarm-deps", o.key.decode(), o.value), ts)
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
    assert h.router.dependents == {"T:2": ["A"]}


def test_removing_the_definition_tombstones_and_drops_dependencies(h):
    alarm(h, "A", pv="T:1")
    h.pv("T:1", severity="MAJOR")
    h.feed("alarms", "A", None)
    assert "A" not in h.active and h.router.dependents == {}


def test_timed_shelving_expires_through_a_tick(h):
    alarm(h, "A", pv="T:1")
    h.pv("T:1", severity="MAJOR")
    shelf = {"user": "op", "expiration": T0 + 1000}
    h.feed("shelved-alarms", "A", h.codec.encode("shelved-alarms", h.codec._json["shelved-alarms"].read(shelf)),
           ts=T0 + 1)
    assert h.active["A"]["state"] == "SHELVED"
    assert h.alarms.due(T0 + 999) == []
    ticks = h.alarms.due(T0 + 1000)
    assert [t.key for t in ticks] == [b"A"]
    h._route(ticks, T0 + 1000)
    assert h.active["A"]["state"] == "ACTIVE"
    assert h.alarms.deadlines == {}


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
