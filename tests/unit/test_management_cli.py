"""The operator commands of alarm management: which alarms --location and --all reach, and
the records set-alarm's management options build (validated as the engine validates them)."""

from __future__ import annotations

import pytest

from alarm_engine import records
from alarm_engine.cli import CLIError, build_parser, alarm_record
from alarm_engine.codec import BadRecord
from alarm_engine.config import Settings
from alarm_engine.management_cli import below, location_cycle, resolve

TREE = {"Site": None, "Linac": "Site", "Linac/RF": "Linac", "Injector": "Site", "Lab": None}
ALARMS = {
    "rf trip": {"location": "Linac/RF"},
    "linac vacuum": {"location": "Linac"},
    "injector gun": {"location": "Injector"},
    "lab door": {"location": "Lab"},
    "nowhere": {"location": "Unlisted"},
}


def test_below_follows_parents_and_stops_on_a_cycle():
    assert below(TREE, "Linac/RF", "Site") and below(TREE, "Linac/RF", "Linac/RF")
    assert not below(TREE, "Linac", "Linac/RF") and not below(TREE, "Lab", "Site")
    assert not below({"A": "B", "B": "A"}, "A", "C")  # a cycle in the topic does not hang


def test_resolve_names_locations_and_all():
    assert resolve(["lab door"], [], False, ALARMS, TREE) == ["lab door"]
    assert resolve([], ["Linac"], False, ALARMS, TREE) == ["linac vacuum", "rf trip"]
    assert resolve(["lab door"], ["Injector"], False, ALARMS, TREE) == ["injector gun", "lab door"]
    assert resolve([], ["Unlisted"], False, ALARMS, TREE) == ["nowhere"]  # a location outside the tree
    assert resolve([], [], True, ALARMS, TREE) == sorted(ALARMS)


@pytest.mark.parametrize("names, tops, everything, error", [
    (["no such"], [], False, "no alarm named 'no such'"),
    ([], ["Nowhere"], False, "no alarm at or below location 'Nowhere'"),
    ([], [], False, "name alarms, or give --location L or --all"),
])
def test_resolve_refuses(names, tops, everything, error):
    with pytest.raises(CLIError, match=error):
        resolve(names, tops, everything, ALARMS, TREE)


def test_location_cycle_is_refused():
    assert location_cycle(TREE, "Site", "Linac/RF") == ["Site", "Linac/RF", "Linac", "Site"]
    assert location_cycle(TREE, "Lab", "Site") is None


def _alarm(*argv):
    args = build_parser().parse_args(["set-alarm", "a", "--pv", "X:1", "--location", "L", "--category", "C", *argv])
    return alarm_record(args)


def test_set_alarm_management_options_make_a_valid_record():
    datum = _alarm("--latching", "--delay", "10s", "--count", "3", "--off-delay", "1m",
                   "--filter", "`BEAM:MODE` == 3", "--masked-by", "parent",
                   "--rationale", "why", "--corrective-action", "call RF", "--response-time", "5m",
                   "--display", "RF overview=https://ops/rf", "--display", "Manual=docs/rf.html")
    d = records.alarm_def("a", {"docUrl": "", "edmPath": "", "priority": "P3_PRODUCTIVITY", "description": "",
                                **datum}, Settings())
    assert (d.latching, d.delay_ms, d.count, d.off_delay_ms) == (True, 10_000, 3, 60_000)
    assert d.filter == "`BEAM:MODE` == 3" and d.masked_by == "parent"
    assert (d.rationale, d.corrective_action, d.response_time_s) == ("why", "call RF", 300)
    assert d.displays == (("RF overview", "https://ops/rf"), ("Manual", "docs/rf.html"))


def test_set_alarm_defaults_leave_management_to_the_settings():
    datum = _alarm()
    assert datum["latching"] is None and datum["guidance"] is None and datum["displays"] == []
    d = records.alarm_def("a", {"docUrl": "", "edmPath": "", "priority": "P3_PRODUCTIVITY", "description": "",
                                **datum}, Settings(latching_default=True))
    assert d.latching and d.delay_ms == 0 and d.masked_by is None


@pytest.mark.parametrize("argv, error", [
    (["--display", "no url"], "bad --display"),
    (["--delay", "soon"], "bad duration"),
])
def test_set_alarm_refuses_bad_options(argv, error):
    with pytest.raises(CLIError, match=error):
        _alarm(*argv)


def test_a_display_that_is_a_command_is_refused():
    datum = _alarm("--display", "run=file:///bin/sh")
    with pytest.raises(BadRecord, match="neither an http"):
        records.alarm_def("a", {"docUrl": "", "edmPath": "", "priority": "P3_PRODUCTIVITY", "description": "",
                                **datum}, Settings())


def test_a_shelving_longer_than_the_maximum_is_refused():
    s = Settings(max_shelve_s=3600)
    now = 1_800_000_000_000
    ok = {"user": "op", "reason": "maintenance", "comment": "", "expiration": now + 3_600_000,
          "oneshot": False, "duration": None, "host": "h"}
    assert records.shelving("a", ok, now, s).reason == "Maintenance"
    with pytest.raises(BadRecord, match="more than the limit of 3600 s"):
        records.shelving("a", {**ok, "expiration": now + 3_600_001}, now, s)
    with pytest.raises(BadRecord, match="no expiration"):
        records.shelving("a", {**ok, "expiration": None}, now, s)
    with pytest.raises(BadRecord, match="is not one of"):
        records.shelving("a", {**ok, "reason": "because"}, now, s)


def test_an_operator_record_without_user_is_kept_as_unknown(codec):
    now = 1_800_000_000_000
    datum = codec.decode("alarm-acks", b'{"time": %d}' % now)  # a JSON producer that gave no user
    assert records.ack("a", datum).user == "unknown"
    datum = codec.decode("disabled-alarms", b'{"user": " ", "reason": "broken"}')
    assert records.disable("a", datum, now).user == "unknown"
