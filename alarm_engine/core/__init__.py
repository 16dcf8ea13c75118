"""The pure functional core: no I/O, no Kafka, no CA, no clock reads.

model: values (Severity, Connection, PVState, AlarmDef, Shelving, Activation).
rules: the safe rule expression language (parse -> Rule).
alarm: one alarm's state and the step function; see PRECEDENCE.md.
"""

from alarm_engine.core.alarm import (
    ActivationSet,
    AlarmCause,
    AlarmState,
    DefinitionSet,
    Event,
    PVUpdate,
    ShelvingSet,
    Shown,
    Tick,
    apply_control,
    find_cause,
    next_deadline,
    shelving_in_force,
    step,
    with_input,
)
from alarm_engine.core.model import (
    PRIORITIES,
    Activation,
    AlarmDef,
    Connection,
    PVState,
    Severity,
    Shelving,
)
from alarm_engine.core.rules import Rule, RuleError, parse

__all__ = [
    "PRIORITIES",
    "Activation",
    "ActivationSet",
    "AlarmCause",
    "AlarmDef",
    "AlarmState",
    "Connection",
    "DefinitionSet",
    "Event",
    "PVState",
    "PVUpdate",
    "Rule",
    "RuleError",
    "Severity",
    "Shelving",
    "ShelvingSet",
    "Shown",
    "Tick",
    "apply_control",
    "find_cause",
    "next_deadline",
    "parse",
    "shelving_in_force",
    "step",
    "with_input",
]
