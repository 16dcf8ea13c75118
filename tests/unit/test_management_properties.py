"""Random management sequences (causes, acks, unacks, shelvings, disables, ticks)
against an independent reference model of PRECEDENCE.md, "Alarm management (ISA-18.2)".

The reference is a small state machine written from rows A1-A9 and M1-M9 (plus
the Shelving and Time sections), not from alarm.py. Scope: one 'pv' alarm,
latching or not (chosen per example), its PV always CONNECTED, no on-/off-delay,
count, filter or masking, and no one-shot shelving. So the cause is the PV's
severity, and the alarm condition is the cause (row D1).

It found two places where the core disagreed with PRECEDENCE.md (an unack of a
latching alarm dropped its latch to the current severity; an ack after a stale unack
could acknowledge a condition that began after it); both are fixed in the core.
"""

from hypothesis import given, settings
from hypothesis import strategies as st

from alarm_engine.core.alarm import (
    AckSet,
    AlarmState,
    DefinitionSet,
    DisableSet,
    PVUpdate,
    ShelvingSet,
    Tick,
    next_deadline,
    step,
)
from alarm_engine.core.model import Ack, AlarmDef, Connection, Disable, PVState, Severity, Shelving

OK, MINOR, MAJOR, INVALID = Severity.NO_ALARM, Severity.MINOR, Severity.MAJOR, Severity.INVALID
# The status is a function of the severity, so "the highest cause" is never a tie
# between two messages of the same severity (PRECEDENCE.md does not order those).
STATUS = {OK: "", MINOR: "HIGH", MAJOR: "HIHI", INVALID: "UDF"}
T_START = 1_000_000


def definition(latching):
    return AlarmDef.for_pv("x", "A", "P2_PROPERTY", latching=latching)


def pv_update(severity, now):
    return PVUpdate("A", PVState(Connection.CONNECTED, 1.0, severity, STATUS[severity], None, now))


# ------------------------------------------------------------ the reference


class Reference:
    """PRECEDENCE.md rows A1-A9 (acknowledgement) and M1, M4, M6, M8, M9 (what is shown)."""

    def __init__(self, latching):
        self.latching = latching
        self.severity = OK  # the PV's severity; the cause (C3) when >= MINOR
        self.ack_state = None  # None (normal) | UNACK | ACK | RTN_UNACK
        self.highest = None  # the highest severity since the condition began or the last ack
        self.acked = None  # the severity acknowledged, while ACK
        self.ack_in_force = None  # the Ack that made it ACK
        self.start = None  # since_ms: when the current condition began (A1, A6)
        self.ackable_from = None  # an Ack with ack_ms >= this acknowledges the condition
        self.last_ack = None  # the last Ack applied (duplicates change nothing)
        self.shelving = None
        self.disable = None
        self.shown = None  # (state, severity, cause, message, since_ms, ack_state, ack, shelving, disable)
        self.deadline = None

    def condition(self):
        return self.severity if self.severity >= MINOR else None

    def step(self, now, event):
        if isinstance(event, AckSet) and (event.ack is None or event.ack == self.last_ack):
            self._show(now)  # no ack applied, but a timer that ended by now has ended
            return
        if isinstance(event, PVUpdate):
            self.severity = event.state.severity
        elif isinstance(event, ShelvingSet):
            self.shelving = event.shelving
        elif isinstance(event, DisableSet):
            self.disable = event.disable
        self._condition(now)
        if isinstance(event, AckSet):
            self.last_ack = event.ack  # remembered as applied, stale or not
            self._ack(event.ack)
        self._show(now)

    def _condition(self, now):
        cond = self.condition()
        st = self.ack_state
        if cond is not None:
            if st is None or st == "RTN_UNACK":  # A1, A6 (a new condition, new since_ms)
                self.highest = cond if st is None else max(self.highest, cond)
                self.ack_state, self.start, self.ackable_from = "UNACK", now, now
            elif st == "UNACK":
                self.highest = max(self.highest, cond)
            elif cond > self.acked:  # A7: the escalation is a later alarm than the one acked
                self.ack_state, self.highest, self.ackable_from = "UNACK", cond, now
                self.acked = self.ack_in_force = None
        elif st == "UNACK" and self.latching:  # A3
            self.ack_state = "RTN_UNACK"
        elif st in ("UNACK", "ACK"):  # A4, A8
            self.ack_state = self.highest = self.acked = self.ack_in_force = self.start = None

    def _ack(self, ack):
        st = self.ack_state
        if ack.unack:
            if st == "ACK":  # A9 (any other state: nothing)
                self.ack_state, self.acked, self.ack_in_force = "UNACK", None, None
                # Not older than the unack itself, nor than the condition.
                self.ackable_from = max(self.start, ack.ack_ms)
        elif st in ("UNACK", "RTN_UNACK") and ack.ack_ms >= self.ackable_from:
            if st == "RTN_UNACK":  # A5
                self.ack_state = self.highest = self.start = None
            else:  # A2: at the current severity, even when the latched one is higher
                cond = self.condition()
                self.ack_state, self.acked, self.highest, self.ack_in_force = "ACK", cond, cond, ack

    def _show(self, now):
        st = self.ack_state
        disabled = self.disable is not None and (self.disable.until_ms is None or now < self.disable.until_ms)
        shelved = self.shelving is not None and (
            self.shelving.expiration_ms is None or now < self.shelving.expiration_ms
        )
        ack = self.ack_in_force if st == "ACK" else None
        if st is None:
            severity = None
        elif self.latching or st == "RTN_UNACK":
            severity = self.highest  # latching: the highest cause since the last ack
        else:
            severity = self.condition()
        self.deadline = None
        if disabled:  # M1
            d = self.disable
            self.deadline = d.until_ms
            if st is None:
                self.shown = ("DISABLED", OK, "NONE", f"disabled: {d.reason}", d.set_ms, None, None, None, d)
            else:
                message = f"A {severity.name} {STATUS[severity]}"
                self.shown = ("DISABLED", severity, "PV_ALARM", message, self.start, st, ack, None, d)
        elif st is None:  # M9
            self.shown = None
        else:
            message = f"A {severity.name} {STATUS[severity]}"
            # M4 says "a condition and a shelving in force"; a latched return (RTN_UNACK)
            # is shown SHELVED too: "ack_state is set in every row with a condition (or
            # RTN_UNACK), also under ... SHELVED", and "shelving never hides an alarm".
            if shelved:  # M4
                sh = self.shelving
                self.deadline = sh.expiration_ms
                self.shown = ("SHELVED", severity, "PV_ALARM", message, self.start, st, ack,
                              (sh.kind, sh.user, sh.reason, sh.expiration_ms), None)  # fmt: skip
            else:  # M6, M8
                self.shown = ("ACTIVE", severity, "PV_ALARM", message, self.start, st, ack, None, None)


def view(shown):
    """The fields of Shown that the reference predicts, in its tuple order."""
    if shown is None:
        return None
    shelving = None
    if shown.state == "SHELVED":
        shelving = (shown.shelving_kind, shown.shelved_by, shown.shelf_reason, shown.shelf_expiration_ms)
    return (shown.state, shown.severity, shown.cause, shown.message, shown.since_ms, shown.ack_state,
            shown.ack, shelving, shown.disable)  # fmt: skip


# ------------------------------------------------------------ the inputs


@st.composite
def histories(draw):
    """(latching, [(now_ms, event)]) with a non-decreasing clock; the first event sets the
    definition. A reference runs alongside to know when a timer ends (Ticks at that time)."""
    latching = draw(st.booleans())
    now = T_START
    ref = Reference(latching)
    out = [(now, DefinitionSet(definition(latching)))]
    ref.step(now, out[0][1])
    last = {"ack": None, "shelve": None, "disable": None}
    for _ in range(draw(st.integers(1, 40))):
        kind = draw(st.sampled_from(["pv", "pv", "pv", "ack", "ack", "shelve", "disable", "tick", "deadline"]))
        if kind == "deadline" and ref.deadline is not None:
            now = max(now, ref.deadline)  # a Tick exactly when a timer ends
        else:
            now += draw(st.integers(0, 4))
        if kind == "pv":
            event = pv_update(draw(st.sampled_from([OK, OK, MINOR, MAJOR, INVALID])), now)
        elif kind == "ack":
            if last["ack"] is not None and draw(st.integers(0, 4)) == 0:
                event = AckSet(last["ack"])  # a redelivered record
            else:
                # Now or somewhat earlier: often before the current condition began (stale).
                ack_ms = now - draw(st.sampled_from([0, 0, 1, 2, 3, 5, 8, 13, 1000]))
                record = Ack(draw(st.sampled_from(["ann", "bo"])), "host", "", ack_ms, draw(st.booleans()))
                event = AckSet(record)
                last["ack"] = record
        elif kind in ("shelve", "disable"):
            choice = draw(st.sampled_from(["new", "new", "clear", "repeat"]))
            if choice == "clear":
                record = None
            elif choice == "repeat":
                record = last[kind]  # a redelivered record
            else:
                until = draw(st.one_of(st.none(), st.integers(-2, 12).map(lambda d: now + d)))
                user = draw(st.sampled_from(["ann", "bo"]))
                reason = draw(st.sampled_from(["maint", "stale"]))
                if kind == "shelve":  # indefinite or timed (never one-shot)
                    record = Shelving(user, reason, "", until, False, now)
                else:
                    record = Disable(user, "host", reason, "", until, now)
            last[kind] = record
            event = ShelvingSet(record) if kind == "shelve" else DisableSet(record)
        else:
            event = Tick()
        ref.step(now, event)
        out.append((now, event))
    return latching, out


def run_all(history):
    states = []
    state = AlarmState()
    for now, event in history:
        state = step(state, event, now)
        states.append(state)
    return states


# ---------------------------------------------------------------- properties


@settings(max_examples=300, deadline=None)
@given(histories())
def test_shown_matches_reference_after_every_event(example):
    latching, history = example
    ref = Reference(latching)
    for i, ((now, event), state) in enumerate(zip(history, run_all(history))):
        ref.step(now, event)
        assert view(state.shown) == ref.shown, f"after event {i}: {event} at {now}"
        # "next_deadline: the shelving expiry (while SHELVED), the disable's until_ms (while DISABLED)"
        assert next_deadline(state) == ref.deadline, f"after event {i}: {event} at {now}"


@settings(max_examples=100, deadline=None)
@given(histories())
def test_replay_is_deterministic(example):
    _, history = example
    assert run_all(history) == run_all(list(history))


@settings(max_examples=100, deadline=None)
@given(histories())
def test_each_event_is_idempotent(example):
    _, history = example
    state = AlarmState()
    for now, event in history:
        once = step(state, event, now)
        assert step(once, event, now) == once, f"{event} at {now}"
        state = once


@settings(max_examples=100, deadline=None)
@given(histories())
def test_tick_at_next_deadline_progresses(example):
    _, history = example
    for state, (now, _) in zip(run_all(history), history):
        deadline = next_deadline(state)
        if deadline is None:
            continue
        assert deadline > now
        after = step(state, Tick(), deadline)
        later = next_deadline(after)
        assert after.shown != state.shown or later is None or later > deadline
