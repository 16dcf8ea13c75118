"""The alarm core, row by row of alarm_engine/core/PRECEDENCE.md."""

import pytest

from alarm_engine.core.alarm import (
    ActivationSet,
    AlarmState,
    DefinitionSet,
    PVUpdate,
    ShelvingSet,
    Shown,
    Tick,
    find_cause,
    next_deadline,
    shelving_in_force,
    step,
)
from alarm_engine.core.model import Activation, AlarmDef, Connection, PVState, Severity, Shelving
from alarm_engine.core.rules import RuleError

MINOR, MAJOR, INVALID, NO_ALARM = Severity.MINOR, Severity.MAJOR, Severity.INVALID, Severity.NO_ALARM
T0 = 1_700_000_000_000

TEMP = AlarmDef.for_pv("temp", "TEMP:1", "P2_PROPERTY", location="NL", category="RF")
RULE = AlarmDef.for_rule("pair", "`A` > 5 and `B` < 3", "P1_LIFE", rule_severity=MINOR)
EXT = AlarmDef.external("ext", "P4_DIAGNOSTIC")


def pv(severity=NO_ALARM, status="", value=1.0, connection=Connection.CONNECTED, at=T0):
    return PVState(connection, value, Severity(severity), status, None, at)


def lost(connection=Connection.DISCONNECTED):
    return PVState(connection, None, INVALID, connection.value, None, T0)


def run(*timed_events, state=None):
    """Apply (time, event) pairs; return the final state."""
    state = state or AlarmState()
    for now, event in timed_events:
        state = step(state, event, now)
    return state


def active(state):
    return state.shown is not None and state.shown.state == "ACTIVE"


def shelved(state):
    return state.shown is not None and state.shown.state == "SHELVED"


# ------------------------------------------------------------------ S1


def test_s1_no_definition_shows_nothing_but_keeps_inputs():
    s = run(
        (T0, PVUpdate("TEMP:1", pv(MAJOR, "HIHI"))),
        (T0 + 1, ShelvingSet(Shelving("op", "Stale"))),
        (T0 + 2, ActivationSet(Activation())),
    )
    assert s.shown is None
    assert s.inputs["TEMP:1"].severity == MAJOR and s.shelving and s.activation
    # A later definition picks them up.
    s = step(s, DefinitionSet(TEMP), T0 + 3)
    assert s.shown.state == "SHELVED" and s.shown.since_ms == T0 + 3


def test_s1_definition_removed_tombstones_and_readding_starts_anew():
    s = run((T0, DefinitionSet(TEMP)), (T0 + 1, PVUpdate("TEMP:1", pv(MAJOR, "HIHI"))))
    assert active(s) and s.shown.since_ms == T0 + 1
    s = step(s, DefinitionSet(None), T0 + 2)
    assert s.shown is None and s.active_since_ms is None and s.first_seen_ms is None
    assert "TEMP:1" in s.inputs
    s = step(s, DefinitionSet(TEMP), T0 + 5)
    assert active(s) and s.shown.since_ms == T0 + 5 and s.first_seen_ms == T0 + 5


def test_edited_definition_keeps_since_and_first_seen():
    s = run((T0, DefinitionSet(TEMP)), (T0 + 1, PVUpdate("TEMP:1", pv(MAJOR, "HIHI"))))
    edited = AlarmDef.for_pv("temp", "TEMP:1", "P1_LIFE")
    s = step(s, DefinitionSet(edited), T0 + 9)
    assert s.shown.priority == "P1_LIFE" and s.shown.since_ms == T0 + 1 and s.first_seen_ms == T0


# ---------------------------------------------------------------- causes


def test_c1_disconnect_beats_value_alarm():
    s = run((T0, DefinitionSet(TEMP)), (T0, PVUpdate("TEMP:1", pv(MAJOR, "HIHI"))))
    s = step(s, PVUpdate("TEMP:1", PVState(Connection.DISCONNECTED, 99.0, MAJOR, "HIHI", None, T0)), T0 + 1)
    assert s.shown == Shown("ACTIVE", INVALID, "DISCONNECTED", "P2_PROPERTY", None, None, None, T0, "TEMP:1 disconnected", ack_state="UNACK")


def test_c2_never_connected():
    s = run((T0, DefinitionSet(TEMP)), (T0 + 7, PVUpdate("TEMP:1", lost(Connection.NEVER_CONNECTED))))
    assert (s.shown.cause, s.shown.severity, s.shown.message) == ("NEVER_CONNECTED", INVALID, "TEMP:1 never connected")


def test_c1_disconnected_beats_never_connected_in_a_rule():
    s = run(
        (T0, DefinitionSet(RULE)),
        (T0, PVUpdate("A", lost(Connection.NEVER_CONNECTED))),
        (T0, PVUpdate("B", lost(Connection.DISCONNECTED))),
    )
    assert s.shown.cause == "DISCONNECTED"
    assert s.shown.message == "B disconnected (+1 more not connected)"
    assert s.shown.priority == "P1_LIFE"


@pytest.mark.parametrize("severity", [MINOR, MAJOR, INVALID])
def test_c3_pv_alarm_severity(severity):
    s = run((T0, DefinitionSet(TEMP)), (T0, PVUpdate("TEMP:1", pv(severity, "HIHI"))))
    assert s.shown == Shown(
        "ACTIVE", severity, "PV_ALARM", "P2_PROPERTY", None, None, None, T0, f"TEMP:1 {severity.name} HIHI", ack_state="UNACK"
    )


def test_c3_no_alarm_shows_nothing():
    s = run((T0, DefinitionSet(TEMP)), (T0, PVUpdate("TEMP:1", pv(NO_ALARM, "NO_ALARM"))))
    assert s.shown is None


def test_c3_pv_not_reported_shows_nothing():
    assert run((T0, DefinitionSet(TEMP))).shown is None


def test_c4_rule_over_two_pvs():
    s = run((T0, DefinitionSet(RULE)), (T0, PVUpdate("A", pv(value=7))))
    assert s.shown is None  # B unknown: the rule is unknown, no cause
    s = step(s, PVUpdate("B", pv(value=1)), T0 + 1)
    assert s.shown == Shown(
        "ACTIVE", MINOR, "RULE", "P1_LIFE", None, None, None, T0 + 1, "rule true: `A` > 5 and `B` < 3", ack_state="UNACK"
    )
    s = step(s, PVUpdate("B", pv(value=4)), T0 + 2)
    assert s.shown is None  # false
    s = step(s, PVUpdate("B", pv(value=0)), T0 + 3)
    assert s.shown.since_ms == T0 + 3


def test_c4_rule_ignores_pv_severity_but_not_connection():
    s = run((T0, DefinitionSet(RULE)), (T0, PVUpdate("A", pv(MAJOR, value=1))), (T0, PVUpdate("B", pv(value=1))))
    assert s.shown is None
    s = step(s, PVUpdate("A", lost()), T0 + 1)
    assert (s.shown.cause, s.shown.severity, s.shown.message) == ("DISCONNECTED", INVALID, "A disconnected")


def test_c5_external_activation():
    s = run((T0, DefinitionSet(EXT)), (T0 + 1, ActivationSet(Activation("P1_LIFE", "beam dump"))))
    assert s.shown == Shown("ACTIVE", MAJOR, "EXTERNAL", "P1_LIFE", None, None, None, T0 + 1, "external: beam dump",
                            ack_state="UNACK")
    s = step(s, ActivationSet(Activation()), T0 + 2)
    assert (s.shown.priority, s.shown.message, s.shown.since_ms) == ("P4_DIAGNOSTIC", "externally active", T0 + 1)
    assert step(s, ActivationSet(None), T0 + 3).shown is None


@pytest.mark.parametrize(
    "pv_state, cause, severity, priority",
    [
        (pv(MINOR, "HIGH"), "EXTERNAL", MAJOR, "P1_LIFE"),  # external is higher
        (pv(MAJOR, "HIHI"), "PV_ALARM", MAJOR, "P2_PROPERTY"),  # tie: the non-external one
        (pv(INVALID, "UDF"), "PV_ALARM", INVALID, "P2_PROPERTY"),
        (lost(), "DISCONNECTED", INVALID, "P2_PROPERTY"),
        (pv(NO_ALARM), "EXTERNAL", MAJOR, "P1_LIFE"),
    ],
)
def test_c6_external_combined_with_another_cause(pv_state, cause, severity, priority):
    s = run(
        (T0, DefinitionSet(TEMP)),
        (T0, PVUpdate("TEMP:1", pv_state)),
        (T0, ActivationSet(Activation("P1_LIFE", "n"))),
    )
    assert (s.shown.cause, s.shown.severity, s.shown.priority) == (cause, severity, priority)


def test_find_cause_is_usable_alone():
    assert find_cause(TEMP, {}, None) is None
    c = find_cause(TEMP, {"TEMP:1": pv(MINOR, "LOW")}, None)
    assert (c.cause, c.severity, c.message) == ("PV_ALARM", MINOR, "TEMP:1 MINOR LOW")


# ------------------------------------------------------------- S2-S4, since


def test_s2_no_cause_shows_nothing_and_s4_cause_shows_active():
    s = run((T0, DefinitionSet(TEMP)), (T0, PVUpdate("TEMP:1", pv(MINOR, "HIGH"))))
    assert active(s)
    s = step(s, PVUpdate("TEMP:1", pv(NO_ALARM)), T0 + 1)
    assert s.shown is None and s.active_since_ms is None


def test_since_survives_severity_and_cause_changes_and_resets_after_normal():
    s = run((T0, DefinitionSet(TEMP)), (T0 + 1, PVUpdate("TEMP:1", pv(MINOR, "HIGH"))))
    s2 = step(s, PVUpdate("TEMP:1", pv(MAJOR, "HIHI")), T0 + 2)
    assert s2.shown.severity == MAJOR and s2.shown.since_ms == T0 + 1
    s3 = step(s2, PVUpdate("TEMP:1", lost()), T0 + 3)
    assert s3.shown.cause == "DISCONNECTED" and s3.shown.since_ms == T0 + 1
    s4 = step(step(s3, PVUpdate("TEMP:1", pv()), T0 + 4), PVUpdate("TEMP:1", pv(MINOR, "HIGH")), T0 + 5)
    assert s4.shown.since_ms == T0 + 5


def test_same_update_twice_changes_nothing():
    s = run((T0, DefinitionSet(TEMP)), (T0, PVUpdate("TEMP:1", pv(MAJOR, "HIHI"))))
    assert step(s, PVUpdate("TEMP:1", pv(MAJOR, "HIHI")), T0 + 50) == s


def test_value_change_alone_changes_nothing_visible():
    s = run((T0, DefinitionSet(TEMP)), (T0, PVUpdate("TEMP:1", pv(MAJOR, "HIHI", value=90.0))))
    s2 = step(s, PVUpdate("TEMP:1", pv(MAJOR, "HIHI", value=91.0, at=T0 + 5)), T0 + 5)
    assert s2.shown == s.shown


def test_forgetting_a_pv():
    s = run((T0, DefinitionSet(TEMP)), (T0, PVUpdate("TEMP:1", pv(MAJOR, "HIHI"))))
    s = step(s, PVUpdate("TEMP:1", None), T0 + 1)
    assert s.shown is None and "TEMP:1" not in s.inputs


# --------------------------------------------------------------- shelving


def alarming(*extra):
    return run((T0, DefinitionSet(TEMP)), (T0, PVUpdate("TEMP:1", pv(MAJOR, "HIHI"))), *extra)


def test_s3_indefinite_shelving_shows_shelved_not_hidden():
    s = alarming((T0 + 1, ShelvingSet(Shelving("alice", "Chattering", "noisy", set_ms=T0 + 1))))
    assert s.shown == Shown(
        "SHELVED", MAJOR, "PV_ALARM", "P2_PROPERTY", "INDEFINITE", "alice", None, T0, "TEMP:1 MAJOR HIHI", "Chattering",
        ack_state="UNACK",
    )
    assert next_deadline(s) is None
    assert shelving_in_force(s, T0 + 10**12)


def test_shelving_without_cause_shows_nothing():
    s = run((T0, DefinitionSet(TEMP)), (T0, ShelvingSet(Shelving("alice"))))
    assert s.shown is None


@pytest.mark.parametrize("event", [Tick(), PVUpdate("TEMP:1", pv(MAJOR, "HIHI"))])
def test_timed_shelving_boundaries(event):
    exp = T0 + 1000
    s = alarming((T0 + 1, ShelvingSet(Shelving("bob", expiration_ms=exp, set_ms=T0 + 1))))
    assert s.shown.shelving_kind == "TIMED" and s.shown.shelf_expiration_ms == exp
    assert next_deadline(s) == exp
    before = step(s, event, exp - 1)
    assert shelved(before) and next_deadline(before) == exp
    at = step(s, event, exp)
    assert active(at) and at.shown.since_ms == T0  # shelved only for t < expiration
    assert next_deadline(at) is None  # no loop on a past deadline
    after = step(s, event, exp + 1)
    assert active(after)
    assert not shelving_in_force(s, exp) and shelving_in_force(s, exp - 1)


def test_already_expired_shelving_is_not_in_force():
    s = alarming((T0 + 10, ShelvingSet(Shelving("bob", expiration_ms=T0 + 10))))
    assert active(s)


def test_oneshot_ends_on_return_to_normal_then_new_alarm_is_active():
    s = alarming((T0 + 1, ShelvingSet(Shelving("carol", oneshot=True, set_ms=T0 + 1))))
    assert shelved(s) and s.shown.shelving_kind == "ONESHOT"
    s = step(s, PVUpdate("TEMP:1", pv(MINOR, "HIGH")), T0 + 2)
    assert shelved(s)  # still in alarm: a severity change is not a return to normal
    s = step(s, PVUpdate("TEMP:1", pv()), T0 + 3)
    assert s.shown is None and s.shelving_consumed and s.shelving is not None
    s = step(s, PVUpdate("TEMP:1", pv(MAJOR, "HIHI")), T0 + 4)
    assert active(s) and s.shown.since_ms == T0 + 4


def test_oneshot_set_while_normal_waits_for_the_next_alarm():
    s = run((T0, DefinitionSet(TEMP)), (T0, PVUpdate("TEMP:1", pv())), (T0 + 1, ShelvingSet(Shelving("c", oneshot=True))))
    s = step(s, Tick(), T0 + 2)
    assert not s.shelving_consumed
    s = step(s, PVUpdate("TEMP:1", pv(MAJOR, "HIHI")), T0 + 3)
    assert shelved(s)
    s = step(s, PVUpdate("TEMP:1", pv()), T0 + 4)
    assert s.shelving_consumed


def test_oneshot_with_expiration_whichever_first():
    exp = T0 + 100
    s = alarming((T0 + 1, ShelvingSet(Shelving("c", expiration_ms=exp, oneshot=True))))
    assert s.shown.shelving_kind == "ONESHOT" and s.shown.shelf_expiration_ms == exp
    assert next_deadline(s) == exp
    assert active(step(s, Tick(), exp))  # expiration first
    assert step(s, PVUpdate("TEMP:1", pv()), exp - 1).shelving_consumed  # normal first


def test_redelivered_shelving_does_not_revive_a_consumed_oneshot():
    shelf = Shelving("c", oneshot=True, set_ms=T0 + 1)
    s = alarming((T0 + 1, ShelvingSet(shelf)), (T0 + 2, PVUpdate("TEMP:1", pv())))
    assert s.shelving_consumed
    s = step(s, ShelvingSet(shelf), T0 + 3)
    assert s.shelving_consumed
    assert active(step(s, PVUpdate("TEMP:1", pv(MAJOR, "HIHI")), T0 + 4))
    # A new shelving (a new record) resets consumption.
    s = step(s, ShelvingSet(Shelving("c", oneshot=True, set_ms=T0 + 5)), T0 + 5)
    assert not s.shelving_consumed
    assert shelved(step(s, PVUpdate("TEMP:1", pv(MAJOR, "HIHI")), T0 + 6))


def test_unshelve_reevaluates_at_once():
    s = alarming((T0 + 1, ShelvingSet(Shelving("alice"))))
    assert shelved(s)
    s = step(s, ShelvingSet(None), T0 + 2)
    assert active(s) and s.shown.since_ms == T0 and s.shown.shelved_by is None


def test_definition_removed_while_shelved_keeps_the_shelving():
    s = alarming((T0 + 1, ShelvingSet(Shelving("alice", oneshot=True))), (T0 + 2, DefinitionSet(None)))
    assert s.shown is None and s.shelving is not None and not s.shelving_consumed
    assert shelved(step(s, DefinitionSet(TEMP), T0 + 3))


def test_next_deadline_none_without_shelving_or_alarm():
    assert next_deadline(AlarmState()) is None
    assert next_deadline(alarming()) is None
    s = run((T0, DefinitionSet(TEMP)), (T0, ShelvingSet(Shelving("bob", expiration_ms=T0 + 5))))
    assert next_deadline(s) is None  # nothing shown; the expiry changes nothing visible


# ------------------------------------------------------------------ model


def test_alarm_def_pvs():
    assert TEMP.pvs() == frozenset({"TEMP:1"})
    assert RULE.pvs() == frozenset({"A", "B"})
    assert EXT.pvs() == frozenset()
    assert RULE.rule.evaluate({"A": pv(value=6), "B": pv(value=2)}) is True


@pytest.mark.parametrize(
    "args, error",
    [
        (("x", "pvv", "A", None, "P1_LIFE"), ValueError),
        (("x", "pv", None, None, "P1_LIFE"), ValueError),
        (("x", "pv", "A", "`A` > 1", "P1_LIFE"), ValueError),
        (("x", "rule", None, None, "P1_LIFE"), ValueError),
        (("x", "external", "A", None, "P1_LIFE"), ValueError),
        (("x", "pv", "A", None, "P9"), ValueError),
        (("x", "rule", None, "`A` >", "P1_LIFE"), RuleError),
    ],
)
def test_alarm_def_validation(args, error):
    with pytest.raises(error):
        AlarmDef(*args)


def test_rule_severity_must_be_an_alarm():
    with pytest.raises(ValueError):
        AlarmDef.for_rule("x", "true", "P1_LIFE", rule_severity=NO_ALARM)
    assert AlarmDef.for_rule("x", "true", "P1_LIFE", rule_severity=3).rule_severity is INVALID


def test_activation_priority_checked():
    with pytest.raises(ValueError):
        Activation("URGENT")


def test_shelving_kinds():
    assert Shelving("u").kind == "INDEFINITE"
    assert Shelving("u", expiration_ms=5).kind == "TIMED"
    assert Shelving("u", oneshot=True).kind == "ONESHOT"
    assert Shelving("u", expiration_ms=5, oneshot=True).kind == "ONESHOT"
    assert not Shelving("u", expiration_ms=5).expired(4) and Shelving("u", expiration_ms=5).expired(5)


def test_pv_state_canonical_forms():
    a = PVState(Connection.CONNECTED, [1.0, 2.0], 2)
    assert a.value == (1.0, 2.0) and a.severity is MAJOR
    assert a == PVState(Connection.CONNECTED, (1.0, 2.0), MAJOR)
    with pytest.raises(TypeError):
        PVState("CONNECTED")


def test_state_inputs_are_read_only():
    s = AlarmState(inputs={"A": pv()})
    with pytest.raises(TypeError):
        s.inputs["B"] = pv()


def test_unknown_event_is_a_type_error():
    with pytest.raises(TypeError):
        step(AlarmState(), object(), T0)
