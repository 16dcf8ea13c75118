"""Alarm management in the core: ack/latch (F3), on-delay (F4), count (F5), off-delay (F6),
disable, enabling filter, masking and their precedence (PRECEDENCE.md rows D, A and M)."""

import json

import pytest

from alarm_engine.core import (
    Ack,
    AckSet,
    AlarmDef,
    AlarmState,
    Connection,
    DefinitionSet,
    Disable,
    DisableSet,
    ParentSet,
    PVState,
    PVUpdate,
    Severity,
    Shelving,
    ShelvingSet,
    Tick,
    apply_control,
    masks_children,
    next_deadline,
    step,
)
from alarm_engine.core.rules import RuleError

OK, MINOR, MAJOR, INVALID = Severity.NO_ALARM, Severity.MINOR, Severity.MAJOR, Severity.INVALID
T0 = 1_000_000


def pv(sev, status=None, value=1.0):
    return PVState(Connection.CONNECTED, value, sev, status if status is not None else sev.name)


def defn(**kw):
    return AlarmDef.for_pv("A", "PV:1", "P2_PROPERTY", **kw)


def run(d, *events):
    """events: (t, event) or (t, severity) for the alarm's PV."""
    s = step(AlarmState(), DefinitionSet(d), T0)
    for t, e in events:
        if isinstance(e, Severity):
            e = PVUpdate("PV:1", pv(e))
        s = step(s, e, T0 + t)
    return s


def ack(t, user="op", unack=False):
    return AckSet(Ack(user, "host1", "seen", T0 + t, unack))


def view(s):
    return None if s.shown is None else (s.shown.state, s.shown.ack_state, s.shown.severity)


# ------------------------------------------------------------- F3 ack/latch


def test_a1_a2_plain_alarm_activates_unacked_and_ack_makes_it_acked():
    s = run(defn(), (0, MAJOR))
    assert view(s) == ("ACTIVE", "UNACK", MAJOR)
    assert s.shown.ack is None
    s = step(s, ack(1), T0 + 1)
    assert view(s) == ("ACTIVE", "ACK", MAJOR)
    assert s.shown.ack == Ack("op", "host1", "seen", T0 + 1)
    assert s.ack == s.shown.ack


def test_a3_a5_f3_latching_ok_major_ok_ack_gives_ok():
    s = run(defn(latching=True), (0, OK), (1, MAJOR), (2, OK))
    assert view(s) == ("ACTIVE", "RTN_UNACK", MAJOR)
    assert s.shown.cause == "PV_ALARM" and s.shown.message == "PV:1 MAJOR MAJOR"
    assert s.shown.since_ms == T0 + 1
    s = step(s, ack(3), T0 + 3)
    assert s.shown is None and s.ack_state is None


def test_a2_a8_f3_ok_major_ack_then_ok():
    for latching in (False, True):
        s = run(defn(latching=latching), (0, OK), (1, MAJOR), (2, ack(2)))
        assert view(s) == ("ACTIVE", "ACK", MAJOR)
        s = step(s, PVUpdate("PV:1", pv(OK)), T0 + 3)
        assert s.shown is None


def test_a2_f3_latching_minor_major_minor_ack_gives_minor_ack():
    s = run(defn(latching=True), (0, MINOR), (1, MAJOR), (2, MINOR))
    assert view(s) == ("ACTIVE", "UNACK", MAJOR)  # latched: the highest since the last ack
    s = step(s, ack(3), T0 + 3)
    assert view(s) == ("ACTIVE", "ACK", MINOR)
    assert s.shown.message == "PV:1 MINOR MINOR"


def test_a4_f3_non_latching_major_ok_clears_without_ack():
    s = run(defn(), (0, MAJOR), (1, OK))
    assert s.shown is None and s.ack_state is None


def test_a7_f3_acked_major_escalating_to_invalid_is_unacked_again():
    s = run(defn(), (0, MAJOR), (1, ack(1)), (2, INVALID))
    assert view(s) == ("ACTIVE", "UNACK", INVALID)
    assert s.shown.ack is None


def test_acked_alarm_at_same_or_lower_severity_stays_acked():
    s = run(defn(), (0, MAJOR), (1, ack(1)), (2, MINOR), (3, MAJOR))
    assert view(s) == ("ACTIVE", "ACK", MAJOR)


def test_a6_rtn_unack_reactivation_is_unack_with_new_since():
    s = run(defn(latching=True), (0, MAJOR), (1, OK), (5, MINOR))
    assert view(s) == ("ACTIVE", "UNACK", MAJOR)  # still the highest since the last ack
    assert s.shown.since_ms == T0 + 5


def test_a9_unack_moves_ack_to_unack_and_nothing_else():
    s = run(defn(), (0, MAJOR), (1, ack(1)))
    s = step(s, ack(2, unack=True), T0 + 2)
    assert view(s) == ("ACTIVE", "UNACK", MAJOR)
    before = s
    s = step(s, ack(3, unack=True), T0 + 3)  # already unacked
    assert s.shown == before.shown


def test_a9_unack_of_a_latching_alarm_keeps_the_acknowledged_latch():
    s = run(defn(latching=True), (1, MAJOR), (2, ack(2)), (3, MINOR))
    assert view(s) == ("ACTIVE", "ACK", MAJOR)
    s = step(s, ack(4, unack=True), T0 + 4)
    assert view(s) == ("ACTIVE", "UNACK", MAJOR)  # the highest since the last ack, not the current MINOR


def test_a9_after_a_stale_unack_an_ack_before_the_condition_still_acknowledges_nothing():
    s = run(defn(), (1, MAJOR), (2, ack(2)))
    s = step(s, AckSet(Ack("op", ack_ms=50, unack=True)), T0 + 3)  # stale, still applied (A9)
    assert view(s) == ("ACTIVE", "UNACK", MAJOR)
    s = step(s, AckSet(Ack("op", ack_ms=60)), T0 + 4)  # given before the condition began at T0 + 1
    assert view(s) == ("ACTIVE", "UNACK", MAJOR)
    s = step(s, ack(5), T0 + 5)
    assert view(s) == ("ACTIVE", "ACK", MAJOR)


def test_stale_ack_acknowledges_nothing_but_is_remembered():
    s = run(defn(), (0, MAJOR), (1, OK), (5, MAJOR))
    old = Ack("op", ack_ms=T0 + 2)  # given before the current activation began
    s = step(s, AckSet(old), T0 + 6)
    assert view(s) == ("ACTIVE", "UNACK", MAJOR)
    assert s.ack == old


def test_duplicate_ack_and_none_change_nothing():
    s = run(defn(), (0, MAJOR), (1, ack(1)))
    s = step(s, ack(2, unack=True), T0 + 2)
    assert step(s, ack(2, unack=True), T0 + 3) == s
    assert step(s, AckSet(None), T0 + 3) == s
    # ... but time counts: a disable that ended meanwhile has ended.
    d = step(s, DisableSet(Disable("op", until_ms=T0 + 5, set_ms=T0 + 3)), T0 + 3)
    assert view(d)[0] == "DISABLED"
    assert view(step(d, ack(2, unack=True), T0 + 6)) == ("ACTIVE", "UNACK", MAJOR)


def test_ack_of_normal_alarm_changes_nothing_shown():
    s = run(defn(), (0, OK), (1, ack(1)))
    assert s.shown is None
    s = step(s, PVUpdate("PV:1", pv(MAJOR)), T0 + 2)
    assert view(s) == ("ACTIVE", "UNACK", MAJOR)  # the earlier ack acknowledges nothing later


# ---------------------------------------------------------- F4-F6 delays


def test_d1_d2_f4_on_delay_needs_a_continuous_cause():
    d = defn(delay_ms=10_000)
    s = run(d, (0, MINOR))
    assert s.shown is None and next_deadline(s) == T0 + 10_000
    s = run(d, (0, MINOR), (3_000, OK), (5_000, MINOR), (10_000, Tick()))
    assert s.shown is None and next_deadline(s) == T0 + 15_000
    s = step(s, Tick(), T0 + 15_000)
    assert view(s) == ("ACTIVE", "UNACK", MINOR)
    assert s.shown.since_ms == T0 + 15_000
    assert next_deadline(s) is None


def test_d1_d2_f4_on_delay_raises_at_highest_severity_without_restart():
    s = run(defn(delay_ms=10_000), (0, MINOR), (4_000, MAJOR), (6_000, MINOR))
    assert next_deadline(s) == T0 + 10_000
    s = step(s, Tick(), T0 + 10_000)
    assert view(s) == ("ACTIVE", "UNACK", MAJOR)


def test_d3_f5_count_raises_on_the_fifth_transition_across_clears():
    d = defn(delay_ms=10_000, count=5)
    events = []
    for i in range(5):
        events += [(2_000 * i, MINOR), (2_000 * i + 1_000, OK)]
    s = run(d, *events[:8])  # four pulses
    assert s.shown is None
    s = run(d, *events[:9])  # the fifth onset
    assert view(s) == ("ACTIVE", "UNACK", MINOR)
    assert s.count_times == ()


def test_d3_f5_transitions_spread_wider_than_the_delay_do_not_raise():
    d = defn(delay_ms=10_000, count=3)
    s = run(d, (0, MINOR), (1_000, OK), (6_000, MINOR), (7_000, OK), (12_000, MINOR))
    assert s.shown is None  # the onset at 0 is older than 10 s at 12 s
    assert len(s.count_times) <= 3


def test_d4_f6_off_delay_keeps_alarm_shown_and_reactivation_continues():
    d = defn(off_delay_ms=5_000)
    s = run(d, (0, MAJOR), (1_000, OK))
    assert view(s) == ("ACTIVE", "UNACK", MAJOR) and next_deadline(s) == T0 + 6_000
    s2 = step(s, PVUpdate("PV:1", pv(MINOR)), T0 + 3_000)
    assert view(s2) == ("ACTIVE", "UNACK", MINOR) and s2.shown.since_ms == T0
    assert next_deadline(s2) is None
    s = step(s, Tick(), T0 + 6_000)
    assert s.shown is None and next_deadline(s) is None


# ------------------------------------------------------------ disable etc.


def test_m1_disabled_without_cause_is_shown_with_cause_none():
    dis = Disable("op", "h", "maintenance", set_ms=T0 + 1)
    s = run(defn(), (1, DisableSet(dis)))
    assert s.shown.state == "DISABLED" and s.shown.cause == "NONE"
    assert s.shown.severity == OK and s.shown.message == "disabled: maintenance"
    assert s.shown.disable == dis and s.shown.ack_state is None
    assert s.disable == dis


def test_m1_disabled_shows_the_cause_underneath_and_ack_machine_runs():
    s = run(defn(), (0, MAJOR), (1, DisableSet(Disable("op"))))
    assert view(s) == ("DISABLED", "UNACK", MAJOR)
    s = step(s, ack(2), T0 + 2)
    assert view(s) == ("DISABLED", "ACK", MAJOR)
    s = step(s, DisableSet(None), T0 + 3)
    assert view(s) == ("ACTIVE", "ACK", MAJOR)


def test_m1_disable_until_ends_by_itself():
    s = run(defn(), (0, MAJOR), (1, DisableSet(Disable("op", until_ms=T0 + 100))))
    assert next_deadline(s) == T0 + 100
    s = step(s, Tick(), T0 + 100)
    assert view(s) == ("ACTIVE", "UNACK", MAJOR) and next_deadline(s) is None


def test_d5_disabling_cancels_a_pending_on_delay():
    d = defn(delay_ms=10_000)
    s = run(d, (0, MAJOR), (1_000, DisableSet(Disable("op"))))
    assert s.pending_since_ms is None and s.shown.state == "DISABLED"
    s = step(s, Tick(), T0 + 10_000)
    s = step(s, DisableSet(None), T0 + 12_000)
    assert s.shown is None and next_deadline(s) == T0 + 22_000  # the delay starts anew


def test_m2_filter_false_suppresses_true_or_unknown_does_not():
    d = defn(filter="`BEAM` > 0")
    assert d.input_pvs() == frozenset({"PV:1", "BEAM"})
    s = run(d, (0, MAJOR))
    assert view(s) == ("ACTIVE", "UNACK", MAJOR)  # filter unknown: not suppressed
    s = step(s, PVUpdate("BEAM", pv(OK, value=0)), T0 + 1)
    assert view(s) == ("SUPPRESSED", "UNACK", MAJOR)
    s = step(s, PVUpdate("BEAM", pv(OK, value=5)), T0 + 2)
    assert view(s) == ("ACTIVE", "UNACK", MAJOR)


def test_m2_filter_pv_connection_never_becomes_the_cause():
    d = defn(filter="`BEAM` > 0")
    lost = PVState(Connection.DISCONNECTED, None, INVALID)
    s = run(d, (0, OK), (1, PVUpdate("BEAM", lost)))
    assert s.shown is None
    s = run(d, (0, OK), (1, PVUpdate("BEAM", pv(OK, value=0))))
    assert s.shown is None  # suppressed only while there is an alarm condition


def test_m3_parent_masking_masks_while_in_alarm():
    s = run(defn(masked_by="PARENT"), (0, ParentSet(True)))
    assert s.shown is None and s.parent_masking
    s = step(s, PVUpdate("PV:1", pv(MAJOR)), T0 + 1)
    assert view(s) == ("MASKED", "UNACK", MAJOR)
    s = step(s, ParentSet(False), T0 + 2)
    assert view(s) == ("ACTIVE", "UNACK", MAJOR)


def test_masks_children():
    s = run(defn(), (0, MAJOR))
    assert masks_children(s.shown)
    assert masks_children(step(s, ack(1), T0 + 1).shown)
    rtn = run(defn(latching=True), (0, MAJOR), (1, OK))
    assert not masks_children(rtn.shown)
    assert not masks_children(step(s, ShelvingSet(Shelving("op")), T0 + 1).shown)
    assert not masks_children(None)


@pytest.mark.parametrize(
    "extra, expected",
    [
        ((DisableSet(Disable("op")), ParentSet(True), ShelvingSet(Shelving("op"))), "DISABLED"),
        ((ParentSet(True), ShelvingSet(Shelving("op")), PVUpdate("BEAM", pv(OK, value=0))), "SUPPRESSED"),
        ((ParentSet(True), ShelvingSet(Shelving("op"))), "MASKED"),
        ((ShelvingSet(Shelving("op")),), "SHELVED"),
    ],
)
def test_m1_to_m4_precedence_disabled_suppressed_masked_shelved(extra, expected):
    s = run(defn(filter="`BEAM` > 0"), (0, MAJOR), *((i + 1, e) for i, e in enumerate(extra)))
    assert s.shown.state == expected and s.shown.ack_state == "UNACK"


def test_m5_on_delay_pending_hides_rtn_unack():
    d = defn(latching=True, delay_ms=1_000)
    s = run(d, (0, MAJOR), (1_000, Tick()), (2_000, OK))
    assert view(s) == ("ACTIVE", "RTN_UNACK", MAJOR)
    s = step(s, PVUpdate("PV:1", pv(MINOR)), T0 + 3_000)
    assert s.shown is None and next_deadline(s) == T0 + 4_000
    s = step(s, Tick(), T0 + 4_000)
    assert view(s) == ("ACTIVE", "UNACK", MAJOR)


def test_m6_m7_rtn_unack_beats_off_delay():
    s = run(defn(latching=True, off_delay_ms=5_000), (0, MAJOR), (1_000, OK))
    assert view(s) == ("ACTIVE", "UNACK", MAJOR)  # off-delay still running: in alarm
    s = step(s, Tick(), T0 + 6_000)
    assert view(s) == ("ACTIVE", "RTN_UNACK", MAJOR)
    assert next_deadline(s) is None


def test_shelving_under_latched_return():
    s = run(defn(latching=True), (0, MAJOR), (1, OK), (2, ShelvingSet(Shelving("op"))))
    assert view(s) == ("SHELVED", "RTN_UNACK", MAJOR)


# -------------------------------------------------------------- records


def test_alarm_def_fields_are_hashable_and_parsed():
    d = defn(displays=[["Panel", "http://x"]], filter="`B` > 1", rationale="why")
    assert d.displays == (("Panel", "http://x"),)
    assert hash(d) == hash(defn(displays=(("Panel", "http://x"),), filter="`B` > 1", rationale="why"))
    assert d.filter_rule.pvs == frozenset({"B"})
    assert defn().input_pvs() == frozenset({"PV:1"}) and defn().filter_rule is None
    with pytest.raises(RuleError):
        defn(filter="`B` >")
    with pytest.raises(ValueError):
        defn(delay_ms=-1)
    with pytest.raises(ValueError):
        defn(displays=[("only title",)])
    assert Shelving("op", host="h").host == "h"
    assert Disable("op", until_ms=5).expired(5) and not Disable("op").expired(10**15)


def test_apply_control_stores_records_without_evaluating():
    s = AlarmState()
    a, d = Ack("op", ack_ms=1), Disable("op")
    s = apply_control(s, AckSet(a), 1)
    s = apply_control(s, DisableSet(d), 2)
    s = apply_control(s, ParentSet(True), 3)
    assert (s.ack, s.disable, s.parent_masking, s.shown) == (a, d, True, None)


def _plain(v):
    if isinstance(v, (Ack, Disable)):
        return vars(v)
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    return v


def test_state_fields_are_json_able():
    s = run(defn(latching=True, delay_ms=10, count=2, off_delay_ms=5), (0, MAJOR), (10, Tick()),
            (11, ack(11)), (12, DisableSet(Disable("op"))), (13, OK))
    names = ["ack", "disable", "parent_masking", "ack_state", "latched", "acked_severity",
             "ack_in_force", "unack_since_ms", "pending_since_ms", "pending", "count_times",
             "count_last", "off_since_ms", "kept"]
    json.dumps({n: _plain(getattr(s, n)) for n in names})


def test_tick_at_next_deadline_always_progresses():
    d = defn(latching=True, delay_ms=3_000, off_delay_ms=2_000)
    events = [(0, MAJOR), (500, ShelvingSet(Shelving("op", expiration_ms=T0 + 4_000))),
              (1_000, DisableSet(Disable("op", until_ms=T0 + 1_500))), (2_000, MINOR),
              (6_000, OK), (6_500, MAJOR), (7_000, OK)]
    s = run(d, *events)
    for _ in range(20):
        t = next_deadline(s)
        if t is None:
            break
        s2 = step(s, Tick(), t)
        assert s2.shown != s.shown or next_deadline(s2) is None or next_deadline(s2) > t
        s = s2
    assert next_deadline(s) is None


def test_replay_is_deterministic():
    d = defn(latching=True, delay_ms=1_000, count=2, off_delay_ms=500, filter="`B` > 0")
    events = [(0, MAJOR), (100, OK), (200, MINOR), (300, PVUpdate("B", pv(OK, value=0))),
              (400, ack(400)), (1_500, Tick()), (1_600, OK), (2_500, Tick())]
    assert run(d, *events) == run(d, *events)


def test_m5_cancelled_on_delay_shows_the_latched_return_again():
    d = defn(latching=True, delay_ms=1_000)
    s = run(d, (0, MAJOR), (1_000, Tick()), (2_000, OK), (3_000, MINOR))
    assert s.shown is None
    s = step(s, PVUpdate("PV:1", pv(OK)), T0 + 3_500)
    assert view(s) == ("ACTIVE", "RTN_UNACK", MAJOR) and next_deadline(s) is None


def test_m8_m9_plain_alarm_has_no_management_state():
    s = run(defn(), (0, MAJOR))
    assert (s.pending_since_ms, s.off_since_ms, s.latched, s.count_times) == (None, None, None, ())
    s = step(s, PVUpdate("PV:1", pv(OK)), T0 + 1)
    assert s.shown is None and s.ack_state is None and next_deadline(s) is None


def test_acked_latching_alarm_keeps_the_acked_severity_when_current_drops():
    s = run(defn(latching=True), (0, MAJOR), (1, ack(1)), (2, MINOR))
    assert view(s) == ("ACTIVE", "ACK", MAJOR)
    s = step(s, PVUpdate("PV:1", pv(OK)), T0 + 3)
    assert s.shown is None


# ------------------------------------------------------------ properties

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_defs = st.builds(
    defn,
    latching=st.booleans(),
    delay_ms=st.sampled_from([0, 0, 1_000, 3_000]),
    count=st.sampled_from([0, 2, 3]),
    off_delay_ms=st.sampled_from([0, 0, 1_500]),
    filter=st.sampled_from([None, "`BEAM` > 0"]),
)
_events = st.one_of(
    st.sampled_from([OK, MINOR, MAJOR, INVALID]),
    st.builds(lambda v: PVUpdate("BEAM", pv(OK, value=v)), st.sampled_from([0, 1])),
    st.builds(lambda u: AckSet(Ack("op", ack_ms=T0 + u * 100, unack=u % 5 == 0)), st.integers(0, 400)),
    st.sampled_from([DisableSet(None), DisableSet(Disable("op")), ParentSet(True), ParentSet(False),
                     ShelvingSet(None), ShelvingSet(Shelving("op", oneshot=True)), Tick()]),
    st.builds(lambda u: DisableSet(Disable("op", until_ms=T0 + u * 100)), st.integers(0, 400)),
)


@settings(max_examples=200, deadline=None)
@given(_defs, st.lists(st.tuples(st.integers(0, 2_000), _events), max_size=25))
def test_property_ticks_progress_duplicates_and_replay(d, events):
    s = step(AlarmState(), DefinitionSet(d), T0)
    t = T0
    for dt, e in events:
        t += dt
        while (dl := next_deadline(s)) is not None and dl <= t:
            s2 = step(s, Tick(), max(dl, T0))
            assert s2.shown != s.shown or next_deadline(s2) is None or next_deadline(s2) > dl
            s = s2
        if isinstance(e, Severity):
            e = PVUpdate("PV:1", pv(e))
        s = step(s, e, t)
        if isinstance(e, (AckSet, DisableSet, ParentSet, ShelvingSet)):
            assert step(s, e, t).shown == s.shown  # a duplicate delivery at once changes nothing
        if s.shown is not None:
            assert s.shown.state == "DISABLED" or s.shown.ack_state is not None
            if s.shown.state == "ACTIVE":
                assert s.shown.ack_state in ("UNACK", "ACK", "RTN_UNACK")
        assert (s.shown is not None and s.shown.ack_state == "ACK") == (
            s.shown is not None and s.shown.ack is not None)
    replay = step(AlarmState(), DefinitionSet(d), T0)
    t = T0
    for dt, e in events:
        t += dt
        while (dl := next_deadline(replay)) is not None and dl <= t:
            replay = step(replay, Tick(), max(dl, T0))
        replay = step(replay, PVUpdate("PV:1", pv(e)) if isinstance(e, Severity) else e, t)
    assert replay == s


def test_definition_edits_between_latching_and_not_keep_the_machine_consistent():
    s = run(defn(latching=True), (0, MAJOR), (1, OK))
    assert view(s) == ("ACTIVE", "RTN_UNACK", MAJOR)
    s = step(s, DefinitionSet(defn()), T0 + 2)
    assert s.shown is None and s.ack_state is None and s.latched is None
    s = step(s, PVUpdate("PV:1", pv(MINOR)), T0 + 3)
    s = step(s, DefinitionSet(defn(latching=True)), T0 + 4)
    assert view(s) == ("ACTIVE", "UNACK", MINOR)
