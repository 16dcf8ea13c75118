"""Random event sequences against an independent, history-based reference model.

The reference does not step a state: it looks at the whole (time, event)
history and answers "what should be shown after event i?" directly from the
precedence table in alarm_engine/core/PRECEDENCE.md.
"""

from hypothesis import given, settings
from hypothesis import strategies as st

from alarm_engine.core.alarm import (
    ActivationSet,
    AlarmState,
    DefinitionSet,
    PVUpdate,
    ShelvingSet,
    Shown,
    Tick,
    next_deadline,
    step,
)
from alarm_engine.core.model import Activation, AlarmDef, Connection, PVState, Severity, Shelving

CONNECTED, DISCONNECTED, NEVER = Connection.CONNECTED, Connection.DISCONNECTED, Connection.NEVER_CONNECTED

DEFINITIONS = [
    None,
    AlarmDef.for_pv("x", "A", "P2_PROPERTY"),
    AlarmDef.for_pv("x", "A", "P4_DIAGNOSTIC"),  # an edit of the one above
    AlarmDef.for_pv("x", "B", "P3_PRODUCTIVITY"),
    AlarmDef.for_rule("x", "`A` > 5 or `B` == 1", "P1_LIFE", rule_severity=Severity.MINOR),
    AlarmDef.for_rule("x", "`A` > 5 or `B` == 1", "P1_LIFE", rule_severity=Severity.INVALID),
    AlarmDef.external("x", "P3_PRODUCTIVITY"),
]
ACTIVATIONS = [None, Activation(), Activation("P1_LIFE", "boom")]
T_START = 1_000_000


@st.composite
def histories(draw):
    """A list of (now_ms, event) with a non-decreasing clock."""
    now = T_START
    last_shelving = None
    out = []
    for _ in range(draw(st.integers(1, 40))):
        now += draw(st.integers(0, 4))
        kind = draw(st.sampled_from(["pv", "pv", "pv", "shelve", "tick", "def", "act"]))
        if kind == "pv":
            event = PVUpdate(
                draw(st.sampled_from("ABC")),
                PVState(
                    draw(st.sampled_from([CONNECTED, CONNECTED, CONNECTED, DISCONNECTED, NEVER])),
                    draw(st.sampled_from([None, 0, 1, 7])),
                    draw(st.sampled_from(list(Severity))),
                    draw(st.sampled_from(["", "HIHI", "LOW"])),
                    None,
                    now,
                ),
            )
        elif kind == "shelve":
            choice = draw(st.sampled_from(["new", "new", "clear", "repeat"]))
            if choice == "clear":
                shelving = None
            elif choice == "repeat":
                shelving = last_shelving  # a redelivered record
            else:
                expiration = draw(st.one_of(st.none(), st.integers(-2, 12).map(lambda d: now + d)))
                shelving = Shelving(
                    draw(st.sampled_from(["ann", "bo"])),
                    draw(st.sampled_from(["", "Stale"])),
                    "",
                    expiration,
                    draw(st.booleans()),
                    now,
                )
            last_shelving = shelving
            event = ShelvingSet(shelving)
        elif kind == "def":
            event = DefinitionSet(draw(st.sampled_from(DEFINITIONS)))
        elif kind == "act":
            event = ActivationSet(draw(st.sampled_from(ACTIVATIONS)))
        else:
            event = Tick()
        out.append((now, event))
    return out


# ------------------------------------------------------------ the reference


def ref_cause(defn, inputs, activation):
    """(cause, severity, priority, message) or None, straight from the table."""
    deps = {"pv": [defn.pv], "rule": ["A", "B"], "external": []}[defn.kind]
    down = [(p, inputs[p].connection) for p in sorted(deps) if p in inputs and inputs[p].connection != CONNECTED]
    down.sort(key=lambda item: item[1] != DISCONNECTED)  # disconnected ones first
    own = None
    if down:
        name, conn = down[0]
        text = f"{name} disconnected" if conn == DISCONNECTED else f"{name} never connected"
        if len(down) > 1:
            text += f" (+{len(down) - 1} more not connected)"
        own = (conn.value, Severity.INVALID, defn.priority, text)
    elif defn.kind == "pv":
        st_ = inputs.get(defn.pv)
        if st_ is not None and st_.severity >= Severity.MINOR:
            own = ("PV_ALARM", st_.severity, defn.priority, f"{defn.pv} {st_.severity.name} {st_.status}".strip())
    elif defn.kind == "rule":
        a = inputs["A"].value if "A" in inputs else None
        b = inputs["B"].value if "B" in inputs else None
        if (a is not None and a > 5) or (b is not None and b == 1):
            own = ("RULE", defn.rule_severity, defn.priority, f"rule true: {defn.expression}")
    if activation is None:
        return own
    ext = (
        "EXTERNAL",
        Severity.MAJOR,
        activation.priority or defn.priority,
        f"external: {activation.note}" if activation.note else "externally active",
    )
    if own is None or ext[1] > own[1]:
        return ext
    return own


def reference(history):
    """What should be shown after the last event, and whether the shelving is consumed."""
    snapshots = []  # (now, definition, inputs, activation, shelving, index where it was set)
    defn, inputs, activation, shelving, set_at = None, {}, None, None, None
    for i, (now, event) in enumerate(history):
        if isinstance(event, DefinitionSet):
            defn = event.definition
        elif isinstance(event, PVUpdate):
            inputs = {**inputs, event.pv: event.state}
        elif isinstance(event, ActivationSet):
            activation = event.activation
        elif isinstance(event, ShelvingSet) and event.shelving != shelving:
            shelving, set_at = event.shelving, i
        snapshots.append((now, defn, inputs, activation))
    causes = [ref_cause(d, inp, act) if d is not None else None for (_, d, inp, act) in snapshots]
    times = [snap[0] for snap in snapshots]

    def unexpired(t):
        return shelving.expiration_ms is None or t < shelving.expiration_ms

    # A one-shot is consumed at the first event after which there is no cause
    # (with a definition), while just before it the alarm was shown SHELVED
    # under this shelving, both moments within its expiration.
    consumed = False
    if shelving is not None and shelving.oneshot:
        for j in range(set_at + 1, len(history)):
            if (
                causes[j - 1] is not None
                and unexpired(times[j - 1])
                and causes[j] is None
                and snapshots[j][1] is not None
                and unexpired(times[j])
            ):
                consumed = True
                break

    last = len(history) - 1
    if causes[last] is None:
        return None, consumed
    start = last
    while start > 0 and causes[start - 1] is not None:
        start -= 1
    cause, severity, priority, message = causes[last]
    if shelving is not None and not consumed and unexpired(times[last]):
        return (
            Shown("SHELVED", severity, cause, priority, shelving.kind, shelving.user,
                  shelving.expiration_ms, times[start], message, shelving.reason, "UNACK"),
            consumed,
        )  # fmt: skip
    return Shown("ACTIVE", severity, cause, priority, None, None, None, times[start], message,
                 ack_state="UNACK"), consumed


def run_all(history):
    states = []
    state = AlarmState()
    for now, event in history:
        state = step(state, event, now)
        states.append(state)
    return states


# ---------------------------------------------------------------- properties


@settings(max_examples=400, deadline=None)
@given(histories())
def test_shown_matches_reference_after_every_event(history):
    states = run_all(history)
    for i, state in enumerate(states):
        expected, consumed = reference(history[: i + 1])
        assert state.shown == expected, f"after event {i}: {history[i]}"
        assert state.shelving_consumed == consumed


@settings(max_examples=150, deadline=None)
@given(histories())
def test_replay_is_deterministic(history):
    assert run_all(history) == run_all(list(history))


@settings(max_examples=150, deadline=None)
@given(histories())
def test_each_event_is_idempotent(history):
    state = AlarmState()
    for now, event in history:
        once = step(state, event, now)
        assert step(once, event, now) == once
        state = once


@settings(max_examples=150, deadline=None)
@given(histories())
def test_emitted_records_never_repeat(history):
    emitted = []
    previous = None
    for state in run_all(history):
        if state.shown != previous:  # the shell's emission rule
            emitted.append(state.shown)
        previous = state.shown
    assert all(a != b for a, b in zip(emitted, emitted[1:]))
    # since_ms never changes within a run of non-tombstone records.
    for a, b in zip(emitted, emitted[1:]):
        if a is not None and b is not None:
            assert a.since_ms == b.since_ms


@settings(max_examples=150, deadline=None)
@given(histories())
def test_next_deadline_is_exactly_when_shown_changes_by_itself(history):
    for state, (now, _) in zip(run_all(history), history):
        deadline = next_deadline(state)
        if deadline is None:
            # Nothing changes by time alone.
            assert step(state, Tick(), now + 10**6).shown == state.shown
            continue
        assert deadline > now and state.shown.state == "SHELVED"
        assert step(state, Tick(), deadline - 1).shown == state.shown
        after = step(state, Tick(), deadline)
        assert after.shown.state == "ACTIVE" and next_deadline(after) is None
