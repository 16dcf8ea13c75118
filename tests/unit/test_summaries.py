"""Location summaries: the roll-up order of Phoebus' alarm tree (unacknowledged above
acknowledged) and the reference's test vectors (alarm-features.md F1)."""

from __future__ import annotations

from hypothesis import given, strategies as st

from alarm_engine.summaries import LEVELS, ancestors, changes, level, summarize

TREE = {"Site": None, "Linac": "Site", "Linac/RF": "Linac", "Injector": "Site"}


def shown(severity="MAJOR", state="ACTIVE", ack="UNACK", priority="P3_PRODUCTIVITY"):
    return {"state": state, "severity": severity, "ackState": ack, "priority": priority}


def test_vectors_of_the_reference():
    # children {MAJOR_ACK, MINOR} -> MINOR
    s = summarize({"a": "Linac", "b": "Linac"}, {"a": shown("MAJOR", ack="ACK"), "b": shown("MINOR")}, TREE)
    assert s["Linac"]["level"] == "MINOR" and s["Linac"]["severity"] == "MINOR" and not s["Linac"]["acknowledged"]
    # children {MAJOR_ACK, OK} -> MAJOR_ACK
    s = summarize({"a": "Linac", "b": "Linac"}, {"a": shown("MAJOR", ack="ACK")}, TREE)
    assert s["Linac"]["level"] == "MAJOR_ACK" and s["Linac"]["acknowledged"] and s["Linac"]["severity"] == "MAJOR"
    # disabling the only alarming child -> OK (still counted as disabled)
    s = summarize({"a": "Linac"}, {"a": shown("MAJOR", state="DISABLED")}, TREE)
    assert s["Linac"]["level"] == "OK" and s["Linac"]["severity"] == "NO_ALARM"
    assert s["Linac"]["states"]["DISABLED"] == 1 and s["Linac"]["alarms"] == 1


def test_rolls_up_to_every_ancestor_and_counts():
    s = summarize({"rf": "Linac/RF", "gun": "Injector", "idle": "Injector"},
                  {"rf": shown("INVALID", priority="P1_LIFE"), "gun": shown("MINOR", ack="ACK")}, TREE)
    assert s["Linac/RF"]["level"] == s["Linac"]["level"] == s["Site"]["level"] == "INVALID"
    assert s["Injector"]["level"] == "MINOR_ACK"
    site = s["Site"]
    assert (site["defined"], site["alarms"], site["unacknowledged"]) == (3, 2, 1)
    assert site["priorities"]["P1_LIFE"] == 1 and site["priorities"]["P3_PRODUCTIVITY"] == 1
    assert site["states"]["ACTIVE"] == 2


def test_a_latched_alarm_returned_to_normal_is_unacknowledged():
    assert level(shown("MAJOR", ack="RTN_UNACK")) == "MAJOR"
    s = summarize({"a": "Linac"}, {"a": shown("MAJOR", ack="RTN_UNACK")}, TREE)
    assert s["Linac"]["unacknowledged"] == 1


def test_a_location_outside_the_tree_and_empty_locations_have_summaries():
    s = summarize({"a": "Lab"}, {}, TREE)
    assert s["Lab"]["defined"] == 1 and s["Lab"]["level"] == "OK"
    assert s["Injector"]["defined"] == 0 and set(s) == set(TREE) | {"Lab"}


def test_a_cycle_in_the_tree_does_not_hang_or_double_count():
    assert ancestors({"A": "B", "B": "A"}, "A") == ["A", "B"]
    s = summarize({"x": "A"}, {"x": shown()}, {"A": "B", "B": "A"})
    assert s["A"]["alarms"] == s["B"]["alarms"] == 1


def test_changes_write_what_differs_and_tombstone_what_is_gone():
    computed = summarize({"a": "Linac"}, {}, TREE)
    assert changes(computed, computed) == []
    published = {**computed, "Gone": computed["Site"], "Linac": {"stale": True}}
    assert changes(computed, published) == [("Linac", computed["Linac"]), ("Gone", None)]


@given(st.lists(st.tuples(st.sampled_from(["Site", "Linac", "Linac/RF", "Injector"]),
                          st.sampled_from(["MINOR", "MAJOR", "INVALID"]),
                          st.sampled_from(["UNACK", "ACK", "RTN_UNACK"]),
                          st.sampled_from(["ACTIVE", "SHELVED", "MASKED"])), max_size=12))
def test_a_node_is_the_highest_level_below_it(alarms):
    locations = {f"a{i}": loc for i, (loc, *_rest) in enumerate(alarms)}
    active = {f"a{i}": shown(sev, state, ack) for i, (_, sev, ack, state) in enumerate(alarms)}
    s = summarize(locations, active, TREE)
    for node in TREE:
        below = [level(active[a]) for a, loc in locations.items() if node in ancestors(TREE, loc)]
        assert s[node]["level"] == max(below, key=LEVELS.index, default="OK")
        assert s[node]["defined"] == len(below)


def test_the_writer_writes_only_what_the_topic_does_not_hold():
    import asyncio

    from alarm_engine.config import Settings
    from alarm_engine.worker.summary_writer import SummaryWriter

    w = SummaryWriter(Settings())
    w.apply("alarm-locations", "Site", {"parent": None, "description": ""})
    w.apply("alarms", "a", {"location": "Site"})
    w.apply("active-alarms", "a", shown("MAJOR"))
    first = asyncio.run(w.due())
    assert [(loc, s["level"]) for loc, s in first] == [("Site", "MAJOR")] and not w.dirty
    for loc, s in first:  # read back from the topic: nothing more to write
        w.apply("alarm-summaries", loc, s)
    assert asyncio.run(w.due()) == []
    w.apply("active-alarms", "a", None)
    w.apply("alarms", "a", None)
    w.apply("alarm-locations", "Site", None)
    assert w.dirty and asyncio.run(w.due()) == [("Site", None)]  # gone: a tombstone


def test_a_location_closing_a_cycle_is_refused_not_applied():
    from alarm_engine.config import Settings
    from alarm_engine.worker.summary_writer import SummaryWriter

    w = SummaryWriter(Settings())
    w.apply("alarm-locations", "Site", {"parent": None, "description": ""}, "r1")
    w.apply("alarm-locations", "Hall", {"parent": "Site", "description": ""}, "r2")
    w.apply("alarm-locations", "Site", {"parent": "Hall", "description": ""}, "r3")
    assert w.parents == {"Site": None, "Hall": "Site"}
    assert w.refused == [("r3", "location 'Site': parent 'Hall' would make a cycle: Site -> Hall -> Site")]
    w.apply("alarm-locations", "Hall", None, "r4")  # a tombstone never closes a cycle
    assert w.parents == {"Site": None} and len(w.refused) == 1


def test_the_writer_decodes_only_the_latest_active_alarms_value_of_an_alarm():
    import asyncio
    import json

    from alarm_engine.codec import BadRecord
    from alarm_engine.config import Settings
    from alarm_engine.worker.summary_writer import SummaryWriter

    decoded = []

    def decode(raw):
        decoded.append(raw)
        if raw == b"bad":
            raise BadRecord("not Avro")
        return json.loads(raw)

    w = SummaryWriter(Settings())
    w.apply("alarm-locations", "Site", {"parent": None, "description": ""})
    w.apply("alarms", "a", {"location": "Site"})
    w.apply("alarms", "b", {"location": "Site"})
    for sev in ("MINOR", "MAJOR", "MINOR", "MAJOR"):  # a flood: four values, one decoded
        w.apply_raw("a", json.dumps(shown(sev)).encode())
    w.apply_raw("b", json.dumps(shown("MINOR")).encode())
    w.apply("active-alarms", "b", None)  # a tombstone after it: b's value is never decoded
    first = asyncio.run(w.due(decode))
    assert decoded == [json.dumps(shown("MAJOR")).encode()]
    assert [(loc, s["level"]) for loc, s in first] == [("Site", "MAJOR")] and "b" not in w.active
    for loc, s in first:
        w.apply("alarm-summaries", loc, s)
    w.apply_raw("a", b"bad")  # skipped: the alarm keeps what it showed
    assert asyncio.run(w.due(decode)) == [] and w.active["a"]["severity"] == "MAJOR"
