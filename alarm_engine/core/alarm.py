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
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Mapping, Union

from alarm_engine.core.model import Activation, AlarmDef, Connection, PVState, Severity, Shelving

ACTIVE = "ACTIVE"
SHELVED = "SHELVED"

PV_ALARM = "PV_ALARM"
RULE = "RULE"
EXTERNAL = "EXTERNAL"
DISCONNECTED = "DISCONNECTED"
NEVER_CONNECTED = "NEVER_CONNECTED"

EXTERNAL_SEVERITY = Severity.MAJOR


@dataclass(frozen=True)
class Shown:
    """What the alarm shows; the value of its active-alarms record."""

    state: str  # ACTIVE | SHELVED
    severity: Severity
    cause: str  # PV_ALARM | RULE | EXTERNAL | DISCONNECTED | NEVER_CONNECTED
    priority: str
    shelving_kind: str | None  # INDEFINITE | TIMED | ONESHOT, when SHELVED
    shelved_by: str | None
    shelf_expiration_ms: int | None
    since_ms: int
    message: str
    shelf_reason: str | None = None


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


Event = Union[DefinitionSet, PVUpdate, ShelvingSet, ActivationSet, Tick]


# ------------------------------------------------------------------- cause


def _connection_cause(defn: AlarmDef, inputs: Mapping[str, PVState]) -> AlarmCause | None:
    lost, never = [], []
    for pv in sorted(defn.pvs()):
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


def _apply(state: AlarmState, event: Event, now_ms: int) -> AlarmState:
    if isinstance(event, DefinitionSet):
        defn = event.definition
        if defn is None:
            first = None
        elif state.definition is None:
            first = now_ms
        else:
            first = state.first_seen_ms  # an edited definition is the same alarm
        return replace(state, definition=defn, first_seen_ms=first)
    if isinstance(event, PVUpdate):
        inputs = dict(state.inputs)
        if event.state is None:
            inputs.pop(event.pv, None)
        else:
            inputs[event.pv] = event.state
        return replace(state, inputs=MappingProxyType(inputs))
    if isinstance(event, ShelvingSet):
        if event.shelving == state.shelving:
            return state  # duplicate delivery must not revive a consumed one-shot
        return replace(state, shelving=event.shelving, shelving_consumed=False)
    if isinstance(event, ActivationSet):
        return replace(state, activation=event.activation)
    if isinstance(event, Tick):
        return state
    raise TypeError(f"not an alarm event: {event!r}")


def _settle(state: AlarmState, now_ms: int) -> AlarmState:
    """Recompute cause-derived fields and `shown` (rows S1-S4)."""
    defn = state.definition
    if defn is None:
        return replace(state, active_since_ms=None, shown=None)
    cause = find_cause(defn, state.inputs, state.activation)
    in_force = shelving_in_force(state, now_ms)
    if cause is None:
        was_shelved = state.shown is not None and state.shown.state == SHELVED
        consumed = state.shelving_consumed or (in_force and state.shelving.oneshot and was_shelved)
        return replace(state, shelving_consumed=consumed, active_since_ms=None, shown=None)
    since = state.active_since_ms if state.active_since_ms is not None else now_ms
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
    )
    return replace(state, active_since_ms=since, shown=shown)


def apply_control(state: AlarmState, event: Event, now_ms: int) -> AlarmState:
    """Apply a definition, shelving or activation without evaluating: for the side
    that keeps an alarm's operator records while another place evaluates it."""
    if isinstance(event, (PVUpdate, Tick)):
        return state
    return _apply(state, event, now_ms)


def with_input(state: AlarmState, event: PVUpdate) -> AlarmState:
    """Record a PV's state without evaluating: for an alarm about to be evaluated
    here, whose evaluation (a `step`) comes later."""
    return _apply(state, event, 0)


def step(state: AlarmState, event: Event, now_ms: int) -> AlarmState:
    """Apply one event at time now_ms (non-decreasing across calls)."""
    return _settle(_apply(state, event, now_ms), now_ms)


def next_deadline(state: AlarmState) -> int | None:
    """When `shown` will change by itself: the expiration of the shelving that
    currently makes the alarm SHELVED. The shell should step a Tick then.

    Only a SHELVED alarm can change with time alone; once the Tick has made
    it ACTIVE this returns None, so a shell cannot loop on a past deadline.
    """
    if state.shown is None or state.shown.state != SHELVED or state.shelving is None:
        return None
    return state.shelving.expiration_ms
