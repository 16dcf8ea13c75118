"""History entries and KPIs: pure functions, checked with hand-made vectors."""

from __future__ import annotations

import json

import pytest

from alarm_engine import history, kpi
from alarm_engine.codec import Codec, load_schema

T0 = 1_800_000_000_000  # a fixed epoch ms
MIN = 60_000
_offsets = iter(range(10**9))


def shown(alarm, t, since=None, state="ACTIVE", priority="P3_PRODUCTIVITY", location="L", offset=None):
    datum = {"priority": priority, "state": state, "severity": "MAJOR", "cause": "PV_ALARM",
             "message": "m", "since": since if since is not None else t, "shelving": None}
    return history.entry("active-alarms", alarm, datum, t, 0, next(_offsets) if offset is None else offset,
                         definition={"location": location, "category": "C", "priority": priority})


def cleared(alarm, t, location="L"):
    return history.entry("active-alarms", alarm, None, t, 0, next(_offsets), definition={"location": location})


def shelve(alarm, t, user="op"):
    return history.entry("shelved-alarms", alarm, {"user": user, "reason": "Chattering", "comment": "",
                                                   "expiration": None, "oneshot": False, "duration": None},
                         t, 1, next(_offsets), headers=[("host", b"console1")])


def unshelve(alarm, t):
    return history.entry("shelved-alarms", alarm, None, t, 1, next(_offsets),
                         headers=[("user", b"op2"), ("host", b"console2")])


def test_entry_fields_and_schema():
    e = shelve("a", T0)
    assert (e["kind"], e["user"], e["host"], e["message"]) == ("shelve", "op", "console1", "Chattering")
    u = unshelve("a", T0 + 1)
    assert (u["kind"], u["user"], u["host"], json.loads(u["detail"])) == ("unshelve", "op2", "console2", None)
    s = shown("b", T0, location="Hall A/S1")
    assert (s["kind"], s["state"], s["location"], s["since"]) == ("shown", "ACTIVE", "Hall A/S1", T0)
    assert cleared("b", T0)["kind"] == "cleared"
    d = history.entry("alarms", "c", {"location": "X", "category": "Y", "priority": "P1_LIFE",
                                      "description": "what to do"}, T0, 2, 5)
    assert (d["kind"], d["location"], d["priority"], d["message"]) == ("define", "X", "P1_LIFE", "what to do")
    # Every entry encodes with the topic's schema and decodes back the same.
    codec = Codec({"alarm-history": load_schema("alarm-history-value")}, lambda sid: None,
                  register=lambda subject, schema: 1)
    for x in (e, u, s, d):
        assert codec.decode("alarm-history", codec.encode("alarm-history", x)) == x
    assert "[by op from console1]" in history.describe(e)
    # What is shown includes the acknowledgement state, so an ack is not read as a repeat.
    datum = {"priority": "P2_PROPERTY", "state": "ACTIVE", "severity": "MINOR", "cause": "PV_ALARM",
             "message": "m", "since": T0, "shelving": None, "ackState": "UNACK"}
    shown_unack = history.entry("active-alarms", "a", datum, T0, 0, 1)
    shown_ack = history.entry("active-alarms", "a", {**datum, "ackState": "ACK"}, T0 + 1, 0, 2)
    assert history.describe(shown_unack).startswith("ACTIVE UNACK MINOR PV_ALARM: m")
    assert history.describe(shown_ack).startswith("ACTIVE ACK MINOR")
    assert history.describe(shown("b", T0)).startswith("ACTIVE MAJOR PV_ALARM")  # no ack state: none said


def test_replay_copies_are_skipped_and_selection():
    a = shown("a", T0, location="Hall A/S1", offset=7)
    copy = dict(a)
    b = shown("b", T0 + 1, location="Hall B", offset=8)
    out = history.select([a, b, copy])
    assert out == [a, b]
    assert history.select([a, b, copy], location="Hall A/S1") == [a]
    tree = {"Hall A/S1": "Hall A", "Hall A": "Site", "Hall B": "Site"}
    assert history.select([a, b, copy], location="Hall A", parents=tree) == [a]  # below it in the tree
    assert history.select([a, b], location="Site", parents=tree) == [a, b]
    assert history.select([a, b], location="Hall A") == []  # without the tree, the name alone
    assert history.select([a, b], location="Hall", parents=tree) == []  # a name, not a string prefix
    assert history.select([a, b], name="b") == [b]
    assert history.select([a, b], since_ms=T0 + 1) == [b]


def test_retention_setting():
    assert history.retention_ms({}) == 30 * 86_400_000
    assert history.retention_ms({"ALARM_ENGINE_HISTORY_RETENTION": "2d"}) == 2 * 86_400_000
    assert history.retention_ms({"ALARM_ENGINE_HISTORY_RETENTION": "5000"}) == 5000


def test_rates_flood_and_top():
    # 12 alarms activate within the first 10 minutes (a flood), 2 in the second bucket.
    es = [shown(f"a{i}", T0 + i * 1000) for i in range(12)] + [shown("b", T0 + 11 * MIN), shown("c", T0 + 12 * MIN)]
    r = kpi.compute(es, T0, T0 + 30 * MIN)
    o = r["overall"]
    assert o["activations"] == 14
    assert o["rate_per_bucket"]["buckets"] == [12, 2, 0]
    assert o["rate_per_bucket"]["peak"] == 12
    assert o["rate_per_bucket"]["average"] == pytest.approx(14 / 3)
    assert o["flood"]["buckets"] == 1 and o["flood"]["time_ms"] == 10 * MIN
    assert o["flood"]["percent"] == pytest.approx(100 / 3)
    # A higher threshold: no flood.
    assert kpi.compute(es, T0, T0 + 30 * MIN, kpi.KpiConfig(flood_threshold=12))["overall"]["flood"]["buckets"] == 0
    assert len(o["top"]) == 10 and o["top"][0]["activations"] == 1


def test_chattering_fleeting_and_state_changes_that_are_not_activations():
    es = []
    t = T0
    for _ in range(3):  # 3 activations within 50 s: chattering
        es += [shown("chat", t), cleared("chat", t + 5000)]
        t += 20_000
    es += [shown("fleet", T0, location="M"), cleared("fleet", T0 + 300, location="M")]
    # Shelving an active alarm changes what it shows but not its since: no new activation.
    es += [shown("steady", T0 + 1000), shown("steady", T0 + 2000, since=T0 + 1000, state="SHELVED")]
    r = kpi.compute(es, T0, T0 + 10 * MIN)
    o = r["overall"]
    assert o["chattering"] == {"chat": 3}
    assert o["fleeting"] == {"fleet": 1}
    assert o["activations"] == 5
    assert o["top"][0] == {"alarm": "chat", "activations": 3}
    assert set(r["locations"]) == {"L", "M"}
    assert r["locations"]["M"]["activations"] == 1
    assert o["state_time_ms"]["SHELVED"] == 10 * MIN - 2000
    # 2 activations 61 s apart are not chattering.
    es2 = [shown("x", T0), cleared("x", T0 + 1000), shown("x", T0 + 61_000)]
    assert kpi.compute(es2, T0, T0 + 10 * MIN)["overall"]["chattering"] == {}


def test_stale_standing_and_priority_distribution():
    day = 86_400_000
    # Standing since before the period: not an activation, but stale after 24 h shown.
    es = [shown("old", T0 + 1000, since=T0 - 2 * day)]
    es += [shown(f"p1-{i}", T0 + i, priority="P1_LIFE") for i in range(1)]
    es += [shown(f"p2-{i}", T0 + 10 + i, priority="P2_PROPERTY") for i in range(3)]
    es += [shown(f"p3-{i}", T0 + 20 + i, priority="P3_PRODUCTIVITY") for i in range(12)]
    es += [shown(f"p4-{i}", T0 + 40 + i, priority="P4_DIAGNOSTIC") for i in range(4)]
    r = kpi.compute(es, T0, T0 + 60 * MIN)["overall"]
    assert r["activations"] == 20
    assert set(r["stale"]) == {"old"} and r["stale"]["old"] == 2 * day + 60 * MIN
    assert r["priority_percent"] == {"low": 80.0, "medium": 15.0, "high": 5.0}
    assert r["standing_at_end"] == 21


def test_shelving_durations_and_copies():
    a = shelve("s", T0 + MIN)
    es = [a, dict(a), unshelve("s", T0 + 4 * MIN), shelve("s", T0 + 8 * MIN)]
    r = kpi.compute(es, T0, T0 + 10 * MIN)["overall"]["shelving"]
    assert r == {"actions": 2, "alarms": 1, "time_ms": 5 * MIN, "by_alarm": {"s": 5 * MIN}}


def test_recent_rate_flood_indicator_and_reports(tmp_path):
    now = T0 + 30 * MIN
    es = [shown(f"a{i}", now - 60_000 + i, location="Hall A") for i in range(11)] + [shown("b", now - 20 * MIN)]
    r = kpi.recent_rate(es, now)
    assert r["activations"] == 11 and r["flood"] and r["flooded_locations"] == ["Hall A"]
    assert not kpi.recent_rate(es[:5], now)["flood"]
    result = kpi.compute(es, T0, now + 1)
    text = kpi.format_text(result)
    assert "location Hall A" in text and "activations: 12" in text
    pytest.importorskip("matplotlib")
    out = tmp_path / "k.html"
    kpi.write_html(result, str(out))
    assert out.read_text().count("data:image/png;base64,") == 2


def test_locations_roll_up_along_the_alarm_locations_tree():
    # Hall W holds Bay 1 and Bay 2; Bay 1 holds Rack 3. Six alarms in Bay 1 and Rack 3 and
    # six in Bay 2: no bay floods (threshold 10), the hall does (12 in one bucket).
    parents = {"Bay 1": "Hall W", "Bay 2": "Hall W", "Rack 3": "Bay 1", "Hall W": None}
    es = ([shown(f"r{i}", T0 + i * 1000, location="Rack 3") for i in range(3)]
          + [shown(f"b{i}", T0 + i * 1000, location="Bay 1") for i in range(3)]
          + [shown(f"c{i}", T0 + i * 1000, location="Bay 2", priority="P1_LIFE") for i in range(6)]
          + [shown("x", T0, location="Elsewhere")])
    r = kpi.compute(es, T0, T0 + 10 * MIN, parents=parents)
    loc = r["locations"]
    assert {k: v["activations"] for k, v in loc.items()} == {
        "Rack 3": 3, "Bay 1": 6, "Bay 2": 6, "Hall W": 12, "Elsewhere": 1}
    assert loc["Hall W"]["flood"]["buckets"] == 1 and loc["Bay 1"]["flood"]["buckets"] == 0
    assert loc["Hall W"]["priority"] == {"P1_LIFE": 6, "P3_PRODUCTIVITY": 6}
    assert r["overall"]["activations"] == 13  # each alarm once overall, whatever the tree
    # Without the tree each location counts alone; the live indicator rolls up the same way.
    assert kpi.compute(es, T0, T0 + 10 * MIN)["locations"]["Bay 1"]["activations"] == 3
    live = kpi.recent_rate(es, T0 + 5 * MIN, parents=parents)
    assert live["flooded_locations"] == ["Hall W"] and live["locations"]["Bay 1"] == 6
    # A cycle in the tree does not count an alarm twice.
    cyc = kpi.compute(es[:1], T0, T0 + MIN, parents={"Rack 3": "Bay 1", "Bay 1": "Rack 3"})
    assert {k: v["activations"] for k, v in cyc["locations"].items()} == {"Rack 3": 1, "Bay 1": 1}


def test_bad_period():
    with pytest.raises(ValueError):
        kpi.compute([], T0, T0)


def test_a_value_published_again_is_no_new_history_entry():
    r = history.Repeats()
    active = {"state": "ACTIVE", "severity": "MAJOR"}
    assert not r.repeat("a", active) and r.repeat("a", dict(active))  # the engine's republish
    assert not r.repeat("a", None) and r.repeat("a", None)
    assert not r.repeat("b", None)  # never seen: written (it may clear what another reader saw)
    assert not r.repeat("a", active)
    r.forget()  # a rebalance: what this reader saw may be old
    assert not r.repeat("a", active)
