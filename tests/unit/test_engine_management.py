"""Alarm management through the engine's record handling (dict tables): acks, latching,
delays, disabling, filters and masking, wherever the alarm is evaluated (its PV's home
or the alarm-keyed processor), and the state's round trip through the tables."""

from __future__ import annotations

import json

import pytest

from alarm_engine.engine import at_pv_home, state_from_json, state_to_json
from alarm_engine.pv_home import decode_entry, encode_entry
from tests.unit.test_engine import T0, Harness, tick


@pytest.fixture
def h(codec):
    return Harness(codec)


def alarm(h, name, ts=T0, producer=None, **fields):
    datum = {"producer": producer, "location": "L", "category": "C", **fields}
    return h.feed("alarms", name, h.codec.encode("alarms", h.codec._json["alarms"].read(datum)), ts=ts)


def send(h, topic, name, datum, ts):
    value = None if datum is None else h.codec.encode(topic, h.codec._json[topic].read(datum))
    return h.feed(topic, name, value, ts=ts)


def ack(h, name, ts, unack=False, user="op"):
    return send(h, "alarm-acks", name, {"user": user, "host": "console1", "comment": "seen", "time": ts,
                                        "unack": unack}, ts)


def shown(h, name):
    a = h.active.get(name)
    return None if a is None else (a["state"], a.get("ackState"), a["severity"])


def test_a_per_pv_alarm_is_acknowledged_at_its_home(h):
    alarm(h, "A", producer={"pv": "T:1"})
    h.pv("T:1", severity="MAJOR", ts=T0 + 1)
    assert shown(h, "A") == ("ACTIVE", "UNACK", "MAJOR")
    ack(h, "A", T0 + 2)
    assert shown(h, "A") == ("ACTIVE", "ACK", "MAJOR")
    assert h.active["A"]["ack"]["user"] == "op" and h.active["A"]["ack"]["host"] == "console1"
    n = len(h.emitted)
    ack(h, "A", T0 + 2)  # the same record again (a replay): nothing changes
    assert len(h.emitted) == n
    h.pv("T:1", severity="INVALID", ts=T0 + 3)  # escalation above what was acknowledged
    assert shown(h, "A") == ("ACTIVE", "UNACK", "INVALID")


def test_a_latching_alarm_returns_unacknowledged_and_an_ack_clears_it(h):
    alarm(h, "A", producer={"pv": "T:1"}, latching=True)
    h.pv("T:1", severity="MAJOR", ts=T0 + 1)
    h.pv("T:1", severity="NO_ALARM", ts=T0 + 2)
    assert shown(h, "A") == ("ACTIVE", "RTN_UNACK", "MAJOR")
    ack(h, "A", T0 + 3)
    assert "A" not in h.active


def test_an_ack_before_the_alarm_moved_in_does_not_acknowledge_it(h):
    alarm(h, "A", producer={"pv": "T:1"})
    h.pv("T:1", severity="MAJOR", ts=T0 + 1)
    ack(h, "A", T0 + 2)
    h.pv("T:2", severity="MAJOR", ts=T0 + 3)
    alarm(h, "A", producer={"pv": "T:2"}, ts=T0 + 4)  # moves to another PV's home
    assert shown(h, "A") == ("ACTIVE", "UNACK", "MAJOR")


def test_disable_shows_disabled_and_enable_shows_the_truth(h):
    alarm(h, "A", producer={"pv": "T:1"})
    send(h, "disabled-alarms", "A", {"user": "op", "reason": "maintenance", "until": None}, T0 + 1)
    assert h.active["A"]["state"] == "DISABLED" and h.active["A"]["disabled"]["reason"] == "maintenance"
    h.pv("T:1", severity="MAJOR", ts=T0 + 2)
    assert h.active["A"]["state"] == "DISABLED"
    send(h, "disabled-alarms", "A", None, T0 + 3)
    assert shown(h, "A") == ("ACTIVE", "UNACK", "MAJOR")


def test_a_disable_until_ends_by_itself_through_a_tick(h):
    alarm(h, "A", producer={"pv": "T:1"})
    h.pv("T:1", severity="MINOR", ts=T0 + 1)
    send(h, "disabled-alarms", "A", {"user": "op", "reason": "r", "until": T0 + 5000}, T0 + 2)
    assert h.active["A"]["state"] == "DISABLED"
    assert h.entry("T:1").deadlines() == {"A": T0 + 5000}
    h._route([tick("A", "T:1", T0 + 5000)], T0 + 5000)
    assert shown(h, "A") == ("ACTIVE", "UNACK", "MINOR")


def test_on_delay_at_the_home(h):
    alarm(h, "A", producer={"pv": "T:1"}, delaySeconds=10.0)
    h.pv("T:1", severity="MAJOR", ts=T0)
    assert "A" not in h.active
    assert h.entry("T:1").deadlines() == {"A": T0 + 10_000}
    h._route([tick("A", "T:1", T0 + 10_000)], T0 + 10_000)
    assert shown(h, "A") == ("ACTIVE", "UNACK", "MAJOR")


def test_a_filtered_pv_alarm_is_evaluated_by_the_processor(h):
    alarm(h, "A", producer={"pv": "T:1"}, filter="`BEAM:MODE` == 3")
    assert not at_pv_home(state_from_json(h.alarms.table["A"]).definition)
    h.pv("T:1", severity="MAJOR", ts=T0 + 1)
    assert shown(h, "A")[0] == "ACTIVE"  # the filter is unknown: the alarm is not hidden
    h.pv("BEAM:MODE", value=1.0, ts=T0 + 2)
    assert shown(h, "A")[0] == "SUPPRESSED"
    h.pv("BEAM:MODE", value=3.0, ts=T0 + 3)
    assert shown(h, "A")[0] == "ACTIVE"


@pytest.mark.parametrize("parent_kind", ["pv", "rule"])
def test_a_child_is_masked_while_its_parent_is_active(h, parent_kind):
    if parent_kind == "pv":
        alarm(h, "P", producer={"pv": "P:1"})
    else:
        alarm(h, "P", producer={"expression": "`P:1` > 5", "severity": "MAJOR"})
    alarm(h, "C", producer={"pv": "C:1"}, maskedBy="P")
    h.pv("C:1", severity="MAJOR", ts=T0 + 1)
    assert shown(h, "C")[0] == "ACTIVE"
    if parent_kind == "pv":
        h.pv("P:1", severity="MAJOR", ts=T0 + 2)
    else:
        h.pv("P:1", value=9.0, ts=T0 + 2)
    assert shown(h, "P")[0] == "ACTIVE" and shown(h, "C")[0] == "MASKED"
    if parent_kind == "pv":
        h.pv("P:1", severity="NO_ALARM", ts=T0 + 3)
    else:
        h.pv("P:1", value=0.0, ts=T0 + 3)
    assert "P" not in h.active and shown(h, "C")[0] == "ACTIVE"


def test_a_child_defined_after_its_active_parent_is_masked_at_once(h):
    alarm(h, "P", producer={"pv": "P:1"})
    h.pv("P:1", severity="MAJOR", ts=T0 + 1)
    h.pv("C:1", severity="MINOR", ts=T0 + 2)
    alarm(h, "C", producer={"pv": "C:1"}, maskedBy="P", ts=T0 + 3)
    assert shown(h, "C")[0] == "MASKED"
    alarm(h, "C", producer={"pv": "C:1"}, ts=T0 + 4)  # no parent any more: back to its PV's home
    assert shown(h, "C")[0] == "ACTIVE"
    assert "C" in h.entry("C:1").alarms


def test_a_parent_moving_between_homes_keeps_masking(h):
    alarm(h, "P", producer={"pv": "P:1"})
    alarm(h, "C", producer={"pv": "C:1"}, maskedBy="P")
    h.pv("C:1", severity="MINOR", ts=T0 + 1)
    h.pv("P:2", severity="MAJOR", ts=T0 + 2)
    alarm(h, "P", producer={"pv": "P:2"}, ts=T0 + 3)
    assert shown(h, "C")[0] == "MASKED"
    assert h.entry("P:2").children == {"P": ["C"]} and h.entry("P:1").children == {}
    alarm(h, "P", producer={"expression": "`P:3` > 1", "severity": "MINOR"}, ts=T0 + 4)
    assert shown(h, "C")[0] == "ACTIVE"  # the rule has no input yet: P shows nothing
    h.pv("P:3", value=2.0, ts=T0 + 5)
    assert shown(h, "C")[0] == "MASKED"


def test_management_state_round_trips_through_the_tables(h):
    alarm(h, "A", producer={"pv": "T:1"}, latching=True, delaySeconds=1.0, offDelaySeconds=2.0,
          guidance={"rationale": "why", "consequence": "what", "correctiveAction": "do",
                    "responseTimeSeconds": 60},
          displays=[{"title": "Overview", "url": "https://example.org/overview"}])
    h.pv("T:1", severity="MAJOR", ts=T0 + 1)
    h._route([tick("A", "T:1", T0 + 1001)], T0 + 1001)
    ack(h, "A", T0 + 1002)
    e = h.entry("T:1")
    st = e.alarms["A"]
    assert decode_entry("T:1", encode_entry(e)).alarms["A"] == st
    j = json.loads(json.dumps(state_to_json(st)))
    assert state_from_json(j) == st
    assert st.definition.displays == (("Overview", "https://example.org/overview"),)


def test_an_ack_of_an_unknown_alarm_is_refused_with_its_reason(h):
    from alarm_engine.codec import BadRecord

    with pytest.raises(BadRecord, match="ack 'nobody': no alarm of that name is defined"):
        ack(h, "nobody", T0)
    assert h.alarms.table.get("nobody") is None  # nothing kept for a later alarm of that name
    send(h, "alarm-acks", "nobody", None, T0)  # a tombstone of it is harmless
