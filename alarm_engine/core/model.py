"""Plain values of the alarm core: severities, PV states, definitions, shelvings,
acknowledgements and disables.

Everything here is immutable and free of I/O. Times are integer milliseconds
since the Unix epoch and are always passed in, never read from a clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:  # rules imports this module; the runtime import is lazy
    from alarm_engine.core.rules import Rule

#: Alarm priorities, most urgent first (the AlarmPriority enum of the schemas).
PRIORITIES = ("P1_LIFE", "P2_PROPERTY", "P3_PRODUCTIVITY", "P4_DIAGNOSTIC")

KINDS = ("pv", "rule", "external")

PVValue = Union[float, int, str, tuple, None]


class Severity(IntEnum):
    """EPICS alarm severity; the integer order is the EPICS order."""

    NO_ALARM = 0
    MINOR = 1
    MAJOR = 2
    INVALID = 3


class Connection(Enum):
    CONNECTED = "CONNECTED"
    DISCONNECTED = "DISCONNECTED"  # was connected, then lost
    NEVER_CONNECTED = "NEVER_CONNECTED"  # sent by the shell only after its grace period


@dataclass(frozen=True)
class PVState:
    """The latest monitor state of one PV."""

    connection: Connection
    value: PVValue = None
    severity: Severity = Severity.NO_ALARM
    status: str = ""
    ioc_time_ms: int | None = None
    received_ms: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.connection, Connection):
            raise TypeError(f"connection must be a Connection, not {self.connection!r}")
        # Accept plain ints for severity and lists for waveforms, but store
        # canonical forms so that equal states compare (and hash) equal.
        object.__setattr__(self, "severity", Severity(self.severity))
        if isinstance(self.value, list):
            object.__setattr__(self, "value", tuple(self.value))


def _check_priority(priority: str | None, what: str) -> None:
    if priority is not None and priority not in PRIORITIES:
        raise ValueError(f"{what} must be one of {', '.join(PRIORITIES)}, not {priority!r}")


@dataclass(frozen=True)
class AlarmDef:
    """The definition of one alarm.

    kind 'pv': active while `pv` has an EPICS alarm severity.
    kind 'rule': active while `expression` (see rules.py) holds.
    kind 'external': active while an outside source says so (Activation).

    A rule expression is parsed on construction, so an AlarmDef with a bad
    expression cannot exist: the constructor raises rules.RuleError.
    """

    name: str
    kind: str
    pv: str | None
    expression: str | None
    priority: str
    rule_severity: Severity = Severity.MAJOR
    location: str = ""
    category: str = ""
    doc_url: str = ""
    edm_path: str = ""
    description: str = ""
    # Alarm management (ISA-18.2); see PRECEDENCE.md. Appended, so positional calls keep working.
    latching: bool = False
    delay_ms: int = 0  # on-delay; 0 = none
    count: int = 0  # with delay_ms > 0: `count` cause transitions within delay_ms raise at once
    off_delay_ms: int = 0
    filter: str | None = None  # enabling filter (rule language); false suppresses the alarm
    masked_by: str | None = None  # the parent alarm's name
    rationale: str = ""
    consequence: str = ""
    corrective_action: str = ""
    response_time_s: int = 0  # 0 = not given
    displays: tuple = ()  # ((title, url), ...)
    _rule: "Rule | None" = field(default=None, init=False, repr=False, compare=False)
    _filter_rule: "Rule | None" = field(default=None, init=False, repr=False, compare=False)
    # True when no management field changes evaluation: step() may skip that work.
    _plain: bool = field(default=True, init=False, repr=False, compare=False)
    # pvs() once: the step asks for it on every event of the alarm.
    _pvs: frozenset = field(default=frozenset(), init=False, repr=False, compare=False)
    _sorted_pvs: tuple = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        _check_priority(self.priority, "priority")
        if (self.kind == "pv") != bool(self.pv):
            raise ValueError("a 'pv' alarm needs a pv name, and only 'pv' alarms take one")
        if (self.kind == "rule") != (self.expression is not None):
            raise ValueError("a 'rule' alarm needs an expression, and only 'rule' alarms take one")
        severity = Severity(self.rule_severity)
        if severity == Severity.NO_ALARM:
            raise ValueError("rule_severity must be MINOR, MAJOR or INVALID")
        object.__setattr__(self, "rule_severity", severity)
        if self.kind == "rule":
            from alarm_engine.core.rules import parse  # lazy: rules imports this module

            object.__setattr__(self, "_rule", parse(self.expression))
        for name in ("delay_ms", "count", "off_delay_ms", "response_time_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, not {value!r}")
        object.__setattr__(self, "latching", bool(self.latching))
        # Lists (from JSON) become tuples so that the definition stays hashable.
        displays = tuple(tuple(d) for d in self.displays)
        for d in displays:
            if len(d) != 2 or not all(isinstance(x, str) for x in d):
                raise ValueError(f"a display is a (title, url) pair of strings, not {d!r}")
        object.__setattr__(self, "displays", displays)
        if self.filter is not None:
            from alarm_engine.core.rules import parse

            object.__setattr__(self, "_filter_rule", parse(self.filter))
        plain = not (self.latching or self.delay_ms or self.off_delay_ms or self.filter is not None)
        object.__setattr__(self, "_plain", plain)
        pvs = (frozenset((self.pv,)) if self.kind == "pv" else
               self._rule.pvs if self.kind == "rule" else frozenset())
        object.__setattr__(self, "_pvs", pvs)
        object.__setattr__(self, "_sorted_pvs", tuple(sorted(pvs)))

    @classmethod
    def for_pv(cls, name: str, pv: str, priority: str, **metadata: str) -> "AlarmDef":
        return cls(name, "pv", pv, None, priority, **metadata)

    @classmethod
    def for_rule(
        cls,
        name: str,
        expression: str,
        priority: str,
        rule_severity: Severity = Severity.MAJOR,
        **metadata: str,
    ) -> "AlarmDef":
        return cls(name, "rule", None, expression, priority, rule_severity, **metadata)

    @classmethod
    def external(cls, name: str, priority: str, **metadata: str) -> "AlarmDef":
        return cls(name, "external", None, None, priority, **metadata)

    @property
    def rule(self) -> "Rule | None":
        """The parsed expression of a 'rule' alarm, else None."""
        return self._rule

    @property
    def filter_rule(self) -> "Rule | None":
        """The parsed enabling filter, else None."""
        return self._filter_rule

    def input_pvs(self) -> frozenset[str]:
        """Every PV the alarm must be told about: its dependencies and its filter's."""
        if self._filter_rule is None:
            return self.pvs()
        return self.pvs() | self._filter_rule.pvs

    def pvs(self) -> frozenset[str]:
        """Names of the PVs this alarm depends on."""
        return self._pvs

    def sorted_pvs(self) -> tuple[str, ...]:
        """pvs() in name order."""
        return self._sorted_pvs


@dataclass(frozen=True)
class Shelving:
    """An operator's shelving of an alarm.

    INDEFINITE: no expiration, not oneshot; ends only when unshelved.
    TIMED: in force while now < expiration_ms.
    ONESHOT: ends when the alarm returns to normal, or at expiration_ms if
    one is given, whichever comes first.
    """

    user: str
    reason: str = ""
    comment: str = ""
    expiration_ms: int | None = None
    oneshot: bool = False
    set_ms: int = 0
    host: str = ""

    @property
    def kind(self) -> str:
        if self.oneshot:
            return "ONESHOT"
        if self.expiration_ms is not None:
            return "TIMED"
        return "INDEFINITE"

    def expired(self, now_ms: int) -> bool:
        # Shelved for t < expiration: at exactly the expiration it has ended.
        return self.expiration_ms is not None and now_ms >= self.expiration_ms


@dataclass(frozen=True)
class Ack:
    """An operator's acknowledgement (or, with unack, its withdrawal) given at ack_ms.

    It acknowledges only an alarm condition that began at or before ack_ms."""

    user: str
    host: str = ""
    comment: str = ""
    ack_ms: int = 0
    unack: bool = False


@dataclass(frozen=True)
class Disable:
    """An alarm taken out of service; until_ms (if given) ends it by itself."""

    user: str
    host: str = ""
    reason: str = ""
    comment: str = ""
    until_ms: int | None = None
    set_ms: int = 0

    def expired(self, now_ms: int) -> bool:
        return self.until_ms is not None and now_ms >= self.until_ms


@dataclass(frozen=True)
class Activation:
    """An outside source says the alarm is active (`alarm-engine set-active`)."""

    priority: str | None = None  # None: show the definition's priority
    note: str = ""

    def __post_init__(self) -> None:
        _check_priority(self.priority, "activation priority")
