"""The state of one alarm and a pure step function.

The shell feeds events with the time they are handled (`now_ms`) into
`step`, and publishes `state.shown` whenever it differs from the previous
state's (None is a tombstone). `shown` is a pure function of the inputs and of
the times passed in, so replaying the same events gives the same records.

Precedence (also in PRECEDENCE.md; first matching row wins)
-----------------------------------------------------------

Cause (what makes the alarm active), from the definition, inputs, activation:

| # | Condition                                                  | cause           | severity            |
|---|------------------------------------------------------------|-----------------|---------------------|
| C1| any dependency PV is DISCONNECTED                          | DISCONNECTED    | INVALID             |
| C2| else any dependency PV is NEVER_CONNECTED                  | NEVER_CONNECTED | INVALID             |
| C3| else kind 'pv' and the PV's severity >= MINOR              | PV_ALARM        | the PV's severity   |
| C4| else kind 'rule' and the rule evaluates to True            | RULE            | rule_severity       |
|   | (False or unknown: no cause from the rule)                 |                 |                     |
| C5| an activation is present (any kind)                        | EXTERNAL        | MAJOR               |
| C6| C5 and one of C1-C4 both hold: the higher severity wins;   |                 |                     |
|   | on a tie the non-external cause wins                       |                 |                     |

A connection problem beats a value-based cause because the value cannot be
trusted. Dependency PVs missing from the inputs (not yet reported) count as
neither connected nor disconnected: the shell reports NEVER_CONNECTED after
its grace period. Priority shown: the definition's, except for an EXTERNAL
cause whose activation names a priority.

What is shown:

| # | Condition                                                  | shown                       |
|---|------------------------------------------------------------|-----------------------------|
| S1| no definition                                              | None (inputs, shelving and  |
|   |                                                            | activation are kept)        |
| S2| no cause                                                   | None; a ONESHOT shelving in |
|   |                                                            | force is consumed if the    |
|   |                                                            | alarm was SHELVED under it  |
| S3| cause and a shelving in force                              | SHELVED, with the cause's   |
|   |                                                            | severity, cause, message    |
| S4| cause and no shelving in force                             | ACTIVE                      |

A shelving is in force when present, not consumed, and not expired: a timed
shelving is in force for now < expiration_ms (at exactly expiration_ms it
has ended). Shelving never hides an alarm; it only changes its state.
A ShelvingSet with a different record resets consumption; one equal to the
current record is a duplicate delivery and changes nothing.
since_ms is the time of the event at which the current uninterrupted period
with a cause began; it survives severity, cause and shelving changes.

Alarm management (PRECEDENCE.md, "Alarm management"; rows D, A and M):

D  timers turn the cause into the alarm condition: on-delay (the cause held
   continuously delay_ms, at the highest severity seen), count (count cause
   transitions within delay_ms raise at once), off-delay (the last cause stays
   off_delay_ms after it cleared); a disable in force runs no on-delay.
A  ISA-18.2 acknowledgement: normal -> UNACK -> ACK (ack) ; UNACK -> RTN_UNACK
   (latching) or normal when the condition ends; RTN_UNACK -> normal (ack) or
   UNACK (again); ACK -> UNACK on escalation or unack, -> normal when it ends.
   An ack older than the condition's start acknowledges nothing.
M  shown.state: DISABLED (always shown) > SUPPRESSED (filter false) > MASKED
   > SHELVED > on-delay running (not shown) > RTN_UNACK (ACTIVE) > off-delay
   (ACTIVE) > ACTIVE > not shown; ack_state is set whenever there is a condition.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Mapping, Union

from alarm_engine.core.model import (
    Ack,
    Activation,
    AlarmDef,
    Connection,
    Disable,
    PVState,
    Severity,
    Shelving,
)

ACTIVE = "ACTIVE"
SHELVED = "SHELVED"
DISABLED = "DISABLED"
SUPPRESSED = "SUPPRESSED"
MASKED = "MASKED"

# ISA-18.2 acknowledgement states (None: normal).
UNACK = "UNACK"
ACK = "ACK"
RTN_UNACK = "RTN_UNACK"

NONE = "NONE"  # the cause of a DISABLED alarm that has none

PV_ALARM = "PV_ALARM"
RULE = "RULE"
EXTERNAL = "EXTERNAL"
DISCONNECTED = "DISCONNECTED"
NEVER_CONNECTED = "NEVER_CONNECTED"

EXTERNAL_SEVERITY = Severity.MAJOR


@dataclass(frozen=True)
class Shown:
    """What the alarm shows; the value of its active-alarms record."""

    state: str  # ACTIVE | SHELVED | DISABLED | SUPPRESSED | MASKED
    severity: Severity
    cause: str  # PV_ALARM | RULE | EXTERNAL | DISCONNECTED | NEVER_CONNECTED | NONE
    priority: str
    shelving_kind: str | None  # INDEFINITE | TIMED | ONESHOT, when SHELVED
    shelved_by: str | None
    shelf_expiration_ms: int | None
    since_ms: int
    message: str
    shelf_reason: str | None = None
    ack_state: str | None = None  # UNACK | ACK | RTN_UNACK, while there is an alarm condition
    ack: Ack | None = None  # the ack in force, when ack_state == ACK
    disable: Disable | None = None  # when DISABLED


def masks_children(shown: Shown | None) -> bool:
    """Whether an alarm showing `shown` masks the alarms that name it in masked_by."""
    return shown is not None and shown.state == ACTIVE and shown.ack_state in (UNACK, ACK)


@dataclass(frozen=True)
class AlarmCause:
    """Why an alarm is active (before shelving is considered)."""

    cause: str
    severity: Severity
    priority: str
    message: str


def _frozen(inputs: Mapping[str, PVState]) -> Mapping[str, PVState]:
    return MappingProxyType(dict(inputs))


@dataclass(frozen=True)
class AlarmState:
    definition: AlarmDef | None = None
    inputs: Mapping[str, PVState] = field(default_factory=lambda: MappingProxyType({}))
    shelving: Shelving | None = None
    shelving_consumed: bool = False
    activation: Activation | None = None
    first_seen_ms: int | None = None  # when the current definition appeared
    active_since_ms: int | None = None  # start of the current period with a cause
    shown: Shown | None = None
    # Operator records (stored like shelving).
    ack: Ack | None = None  # the last Ack applied (a duplicate equal to it changes nothing)
    disable: Disable | None = None
    parent_masking: bool = False
    # The acknowledgement machine. A cause is the tuple (cause, Severity, priority, message).
    ack_state: str | None = None  # UNACK | ACK | RTN_UNACK | None (normal)
    latched: tuple | None = None  # latching: the highest cause since the last ack
    acked_severity: Severity | None = None  # severity acknowledged, while ACK
    ack_in_force: Ack | None = None  # the ack that made it ACK
    unack_since_ms: int | None = None  # when the unacknowledged condition began
    # On-delay, count and off-delay.
    pending_since_ms: int | None = None  # on-delay running since
    pending: tuple | None = None  # the highest cause seen while the on-delay runs
    count_times: tuple = ()  # now_ms of the latest cause onsets/changes (at most `count`)
    count_last: tuple | None = None  # (severity, message) of the cause last counted; None: no cause
    off_since_ms: int | None = None  # off-delay running since
    kept: tuple | None = None  # off-delay: the last cause, shown while the off-delay runs

    def __post_init__(self) -> None:
        if not isinstance(self.inputs, MappingProxyType):
            object.__setattr__(self, "inputs", _frozen(self.inputs))


_FIELDS: dict[type, frozenset] = {}


def replace(obj, **changes):
    """`dataclasses.replace` for the core's frozen values, without its per-call field
    introspection (a third of a step's CPU on the hot path). Same checks: unknown
    fields are refused, `__post_init__` runs."""
    cls = type(obj)
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = frozenset(f.name for f in fields(cls))
    if not names.issuperset(changes):
        raise TypeError(f"{cls.__name__} has no field(s) {sorted(set(changes) - names)}")
    new = object.__new__(cls)
    new.__dict__.update(obj.__dict__)
    new.__dict__.update(changes)
    post = getattr(new, "__post_init__", None)
    if post is not None:
        post()
    return new


# ------------------------------------------------------------------ events


@dataclass(frozen=True)
class DefinitionSet:
    definition: AlarmDef | None  # None: the alarm was removed


@dataclass(frozen=True)
class PVUpdate:
    pv: str
    state: PVState | None  # None: forget the PV (no longer monitored)


@dataclass(frozen=True)
class ShelvingSet:
    shelving: Shelving | None  # None: unshelved


@dataclass(frozen=True)
class ActivationSet:
    activation: Activation | None  # None: cleared


@dataclass(frozen=True)
class Tick:
    """Re-evaluate at now_ms (e.g. at next_deadline)."""


@dataclass(frozen=True)
class AckSet:
    ack: Ack | None  # None changes nothing


@dataclass(frozen=True)
class DisableSet:
    disable: Disable | None  # None: enabled


@dataclass(frozen=True)
class ParentSet:
    masking: bool  # the masked_by parent masks its children now


Event = Union[
    DefinitionSet, PVUpdate, ShelvingSet, ActivationSet, Tick, AckSet, DisableSet, ParentSet
]


# ------------------------------------------------------------------- cause


def _connection_cause(defn: AlarmDef, inputs: Mapping[str, PVState]) -> AlarmCause | None:
    lost, never = [], []
    for pv in defn.sorted_pvs():
        st = inputs.get(pv)
        if st is not None and st.connection is Connection.DISCONNECTED:
            lost.append(pv)
        elif st is not None and st.connection is Connection.NEVER_CONNECTED:
            never.append(pv)
    if not lost and not never:
        return None
    cause = DISCONNECTED if lost else NEVER_CONNECTED
    names = lost + never
    message = f"{names[0]} {'disconnected' if lost else 'never connected'}"
    if len(names) > 1:
        message += f" (+{len(names) - 1} more not connected)"
    return AlarmCause(cause, Severity.INVALID, defn.priority, message)


def _value_cause(defn: AlarmDef, inputs: Mapping[str, PVState]) -> AlarmCause | None:
    if defn.kind == "pv":
        st = inputs.get(defn.pv)
        if st is None or st.severity < Severity.MINOR:
            return None
        message = f"{defn.pv} {st.severity.name} {st.status}".rstrip()
        return AlarmCause(PV_ALARM, st.severity, defn.priority, message)
    if defn.kind == "rule" and defn.rule.evaluate(inputs) is True:
        return AlarmCause(RULE, defn.rule_severity, defn.priority, f"rule true: {defn.expression}")
    return None


def find_cause(
    defn: AlarmDef, inputs: Mapping[str, PVState], activation: Activation | None
) -> AlarmCause | None:
    """Rows C1-C6 of the precedence table."""
    own = _connection_cause(defn, inputs) or _value_cause(defn, inputs)
    if activation is None:
        return own
    external = AlarmCause(
        EXTERNAL,
        EXTERNAL_SEVERITY,
        activation.priority or defn.priority,
        f"external: {activation.note}" if activation.note else "externally active",
    )
    if own is None or external.severity > own.severity:
        return external
    return own


# -------------------------------------------------------------------- step


def shelving_in_force(state: AlarmState, now_ms: int) -> bool:
    sh = state.shelving
    return sh is not None and not state.shelving_consumed and not sh.expired(now_ms)


def disable_in_force(state: AlarmState, now_ms: int) -> bool:
    d = state.disable
    return d is not None and not d.expired(now_ms)


def _apply(state: AlarmState, event: Event, now_ms: int) -> AlarmState:
    if isinstance(event, PVUpdate):
        inputs = dict(state.inputs)
        if event.state is None:
            inputs.pop(event.pv, None)
        else:
            inputs[event.pv] = event.state
        return replace(state, inputs=MappingProxyType(inputs))
    if isinstance(event, DefinitionSet):
        defn = event.definition
        if defn is None:
            first = None
        elif state.definition is None:
            first = now_ms
        else:
            first = state.first_seen_ms  # an edited definition is the same alarm
        return replace(state, definition=defn, first_seen_ms=first)
    if isinstance(event, ShelvingSet):
        if event.shelving == state.shelving:
            return state  # duplicate delivery must not revive a consumed one-shot
        return replace(state, shelving=event.shelving, shelving_consumed=False)
    if isinstance(event, ActivationSet):
        return replace(state, activation=event.activation)
    if isinstance(event, Tick):
        return state
    if isinstance(event, AckSet):
        if event.ack is None or event.ack == state.ack:
            return state
        return replace(state, ack=event.ack)
    if isinstance(event, DisableSet):
        return state if event.disable == state.disable else replace(state, disable=event.disable)
    if isinstance(event, ParentSet):
        masking = bool(event.masking)
        return state if masking == state.parent_masking else replace(state, parent_masking=masking)
    raise TypeError(f"not an alarm event: {event!r}")


def _delayed(state: AlarmState, defn: AlarmDef, raw: tuple | None, now_ms: int, ch: dict):
    """On-delay, count and off-delay: the alarm condition from the raw cause.

    Writes the timer fields into `ch`; returns the condition's cause or None."""
    was_on = state.ack_state in (UNACK, ACK)  # a condition held at the last step
    count_times = state.count_times
    if defn.delay_ms and defn.count:
        key = None if raw is None else (raw[1], raw[3])
        if key is not None and key != state.count_last:
            count_times = (count_times + (now_ms,))[-defn.count:]
        ch["count_last"] = key
        cutoff = now_ms - defn.delay_ms
        count_times = tuple(t for t in count_times if t >= cutoff)
    if raw is not None:
        ch["off_since_ms"] = None
        ch["kept"] = raw if defn.off_delay_ms else None
        if not defn.delay_ms or was_on or state.off_since_ms is not None:
            ch["pending_since_ms"] = ch["pending"] = None
            ch["count_times"] = count_times
            return raw
        if disable_in_force(state, now_ms):
            # Out of service: no on-delay runs; it starts anew once enabled.
            ch["pending_since_ms"] = ch["pending"] = None
            ch["count_times"] = count_times
            return None
        since, pending = state.pending_since_ms, state.pending
        if since is None:
            since, pending = now_ms, raw
        elif raw[1] > pending[1]:
            pending = raw  # escalation keeps the highest, without restarting the delay
        if now_ms - since >= defn.delay_ms or (defn.count and len(count_times) >= defn.count):
            ch["pending_since_ms"] = ch["pending"] = None
            ch["count_times"] = ()
            return pending
        ch["pending_since_ms"], ch["pending"] = since, pending
        ch["count_times"] = count_times
        return None
    ch["pending_since_ms"] = ch["pending"] = None  # a clear cancels the on-delay
    ch["count_times"] = count_times
    if defn.off_delay_ms and (was_on or state.off_since_ms is not None) and state.kept is not None:
        off = state.off_since_ms if state.off_since_ms is not None else now_ms
        if now_ms - off < defn.off_delay_ms:
            ch["off_since_ms"] = off
            return state.kept
    ch["off_since_ms"] = ch["kept"] = None
    return None


def _ack_machine(state: AlarmState, defn: AlarmDef, cond: tuple | None, ack: Ack | None,
                 now_ms: int, ch: dict) -> None:
    """ISA-18.2 acknowledgement states, with Phoebus latching; writes into `ch`."""
    st, latched = state.ack_state, state.latched
    acked, in_force, unack_since = state.acked_severity, state.ack_in_force, state.unack_since_ms
    latching = defn.latching
    if cond is not None:
        if st is None or st == RTN_UNACK:
            if st is None or latched is None or cond[1] > latched[1]:
                latched = cond
            st, acked, in_force, unack_since = UNACK, None, None, now_ms
        elif st == UNACK:
            if latched is None or cond[1] > latched[1]:
                latched = cond
        elif cond[1] > acked:  # ACK, escalated above what was acknowledged
            st, latched, acked, in_force, unack_since = UNACK, cond, None, None, now_ms
    elif st == UNACK and latching:
        st = RTN_UNACK
    elif st is not None and (st != RTN_UNACK or not latching):  # (no longer latching: gone)
        st, latched, acked, in_force, unack_since = None, None, None, None, None
    if ack is not None:
        if ack.unack:
            if st == ACK:
                # The latch keeps what was acknowledged (the highest since the last ack), and
                # only an ack given at or after both the condition's start and this unack counts.
                st, acked, in_force = UNACK, None, None
                unack_since = ack.ack_ms if unack_since is None else max(unack_since, ack.ack_ms)
        elif st in (UNACK, RTN_UNACK) and ack.ack_ms >= unack_since:
            if st == RTN_UNACK:
                st, latched, acked, in_force, unack_since = None, None, None, None, None
            else:
                # Acknowledged at the current severity (lower than the latched one, perhaps).
                st, latched, acked, in_force = ACK, cond, cond[1], ack
    if not latching:
        latched = None  # only a latching alarm shows more than its current cause
    ch["ack_state"], ch["latched"], ch["acked_severity"] = st, latched, acked
    ch["ack_in_force"], ch["unack_since_ms"] = in_force, unack_since


def _update(state: AlarmState, fresh: bool, **changes) -> AlarmState:
    # A state made by this very step and not yet seen by anyone is changed in place:
    # one copy per step instead of two on the hot path.
    if fresh:
        state.__dict__.update(changes)
        return state
    return replace(state, **changes)


def _settle_plain(state: AlarmState, defn: AlarmDef, now_ms: int, fresh: bool) -> AlarmState:
    """`_settle` for an alarm without management fields, timers, disable or masking:
    rows S2-S4 plus A1, A4, A7, A8 (the hot path)."""
    cause = find_cause(defn, state.inputs, state.activation)
    in_force = shelving_in_force(state, now_ms)
    if cause is None:
        was_shelved = state.shown is not None and state.shown.state == SHELVED
        consumed = state.shelving_consumed or (in_force and state.shelving.oneshot and was_shelved)
        if state.ack_state is None:
            return _update(state, fresh, shelving_consumed=consumed, active_since_ms=None, shown=None)
        return _update(state, fresh, shelving_consumed=consumed, active_since_ms=None, shown=None,
                       ack_state=None, acked_severity=None, ack_in_force=None, unack_since_ms=None,
                       latched=None)
    since = state.active_since_ms if state.active_since_ms is not None else now_ms
    st = state.ack_state
    changes = {}
    if st is None or (st == ACK and cause.severity > state.acked_severity):
        st = UNACK
        changes = {"ack_state": UNACK, "acked_severity": None, "ack_in_force": None,
                   "unack_since_ms": now_ms, "latched": None}
    sh = state.shelving if in_force else None
    shown = Shown(
        state=SHELVED if sh else ACTIVE,
        severity=cause.severity,
        cause=cause.cause,
        priority=cause.priority,
        shelving_kind=sh.kind if sh else None,
        shelved_by=sh.user if sh else None,
        shelf_expiration_ms=sh.expiration_ms if sh else None,
        since_ms=since,
        message=cause.message,
        shelf_reason=sh.reason if sh else None,
        ack_state=st,
        ack=state.ack_in_force if st == ACK else None,
    )
    return _update(state, fresh, active_since_ms=since, shown=shown, **changes)


def _settle(state: AlarmState, now_ms: int, ack: Ack | None = None, fresh: bool = False) -> AlarmState:
    """Recompute the cause-derived fields and `shown` (rows S1-S4, M1-M8)."""
    defn = state.definition
    if defn is None:
        return replace(state, active_since_ms=None, shown=None)
    if (ack is None and defn._plain and state.disable is None and not state.parent_masking
            and state.pending_since_ms is None and state.off_since_ms is None
            and state.ack_state != RTN_UNACK):
        return _settle_plain(state, defn, now_ms, fresh)
    found = find_cause(defn, state.inputs, state.activation)
    raw = None if found is None else (found.cause, found.severity, found.priority, found.message)
    ch: dict = {}
    if defn._plain and state.pending_since_ms is None and state.off_since_ms is None:
        cond = raw
    else:
        cond = _delayed(state, defn, raw, now_ms, ch)
    _ack_machine(state, defn, cond, ack, now_ms, ch)
    st = ch["ack_state"]
    shown_cause = ch["latched"] or cond  # latching (and RTN_UNACK): the highest since the ack
    disabled = state.disable is not None and not state.disable.expired(now_ms)
    in_force = shelving_in_force(state, now_ms)
    if shown_cause is None:
        was_shelved = state.shown is not None and state.shown.state == SHELVED
        consumed = state.shelving_consumed or (in_force and state.shelving.oneshot and was_shelved)
        ch["shelving_consumed"] = consumed
        ch["active_since_ms"] = None
        if not disabled:
            ch["shown"] = None
            return replace(state, **ch)
    if state.active_since_ms is None or (cond is not None and state.ack_state == RTN_UNACK):
        since = now_ms  # a new condition (also a re-activation from RTN_UNACK)
    else:
        since = state.active_since_ms
    if shown_cause is not None:
        ch["active_since_ms"] = since
    sh = None
    if disabled:
        d = state.disable
        under = shown_cause or raw
        if under is None:
            under = (NONE, Severity.NO_ALARM, defn.priority, f"disabled: {d.reason}".rstrip(": "))
            since = d.set_ms
        elif shown_cause is None:
            since = d.set_ms
        display = DISABLED
    elif state.parent_masking or defn.filter is not None:
        filt = defn.filter_rule
        if filt is not None and filt.evaluate(state.inputs) is False:
            display = SUPPRESSED
        elif state.parent_masking:
            display = MASKED
        else:
            display = None
    else:
        display = None
    if display is None:
        if in_force:
            sh, display = state.shelving, SHELVED
        else:
            display = ACTIVE
    if not disabled:
        under = shown_cause
        pending = ch["pending_since_ms"] if "pending_since_ms" in ch else state.pending_since_ms
        if pending is not None:
            if cond is None:  # on-delay pending beats RTN_UNACK: not shown
                ch["shown"] = None
                return replace(state, **ch)
    shown = Shown(
        state=display,
        severity=under[1],
        cause=under[0],
        priority=under[2],
        shelving_kind=sh.kind if sh else None,
        shelved_by=sh.user if sh else None,
        shelf_expiration_ms=sh.expiration_ms if sh else None,
        since_ms=since,
        message=under[3],
        shelf_reason=sh.reason if sh else None,
        ack_state=st,
        ack=ch["ack_in_force"] if st == ACK else None,
        disable=state.disable if disabled else None,
    )
    ch["shown"] = shown
    return replace(state, **ch)


def apply_control(state: AlarmState, event: Event, now_ms: int) -> AlarmState:
    """Apply a definition, shelving, activation, ack, disable or parent masking without
    evaluating: for the side that keeps an alarm's operator records while another
    place evaluates it."""
    if isinstance(event, (PVUpdate, Tick)):
        return state
    return _apply(state, event, now_ms)


def with_input(state: AlarmState, event: PVUpdate) -> AlarmState:
    """Record a PV's state without evaluating: for an alarm about to be evaluated
    here, whose evaluation (a `step`) comes later."""
    return _apply(state, event, 0)


def step(state: AlarmState, event: Event, now_ms: int) -> AlarmState:
    """Apply one event at time now_ms (non-decreasing across calls)."""
    new = _apply(state, event, now_ms)
    if type(event) is AckSet:
        if new is state:  # a duplicate (or None): no ack, but time counts as for any event
            return _settle(state, now_ms, fresh=False)
        return _settle(new, now_ms, new.ack)
    return _settle(new, now_ms, fresh=new is not state)


def next_deadline(state: AlarmState) -> int | None:
    """When `shown` can change by itself: the expiration of the shelving that makes the
    alarm SHELVED, the end of a disable in force, of a running on-delay or off-delay.
    The shell should step a Tick then; that Tick ends the timer, so the result is later
    or None afterwards and a shell cannot loop on a past deadline."""
    times = []
    shown = state.shown
    if shown is not None and shown.state == SHELVED and state.shelving is not None:
        if state.shelving.expiration_ms is not None:
            times.append(state.shelving.expiration_ms)
    if state.disable is not None and state.disable.until_ms is not None and shown is not None \
            and shown.state == DISABLED:
        times.append(state.disable.until_ms)
    defn = state.definition
    if defn is not None:
        if state.pending_since_ms is not None:
            times.append(state.pending_since_ms + defn.delay_ms)
        if state.off_since_ms is not None:
            times.append(state.off_since_ms + defn.off_delay_ms)
    return min(times) if times else None
