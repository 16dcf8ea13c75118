"""The engine's own topics are validated like the operators' ones.

alarm-deps (keyed by PV) and alarm-inputs (keyed by alarm) carry JSON that the
engine writes (engine.py); anyone with write access can write there too. A record
that does not fit its schema below is rejected to dead-letters with a schema-level
reason ("alarm-deps: value.alarm: expected string, got int"), not an "internal
error" with a traceback, and is never stored (`{"alarm": 5, "uses": "x"}` once
put 5 into pv-dependents). pv-state goes through the codec (Avro or strict JSON
against schemas/pv-state-value.avsc) and then `records.pv_state` (limits).

- `alarm_deps(value)`: {"alarm": string (non-empty), "uses": boolean}; no tombstones.
- `alarm_input(value)`: {"tick": long} or {"pv": string, "state": null or a pv-state
  value}; no tombstones.
- `checked(compute)`: an agent's per-record compute that validates these first.
"""

from __future__ import annotations

import json

from alarm_engine import records
from alarm_engine.codec import BadRecord, JsonReader, load_schema

MAX_NAME = 1024

DEPS_SCHEMA = {"type": "record", "name": "AlarmDependency", "fields": [
    {"name": "alarm", "type": "string"}, {"name": "uses", "type": "boolean"}]}

_PV_STATE = load_schema("pv-state-value")
INPUTS_SCHEMA = [
    {"type": "record", "name": "Tick", "fields": [{"name": "tick", "type": "long"}]},
    {"type": "record", "name": "PVInput", "fields": [
        {"name": "pv", "type": "string"}, {"name": "state", "type": ["null", _PV_STATE]}]},
]

_deps = JsonReader(DEPS_SCHEMA)
# The branch is chosen by the field "tick", so that a reason names the field at fault.
_tick, _pv_input = JsonReader(INPUTS_SCHEMA[0]), JsonReader(INPUTS_SCHEMA[1])


def _json(topic: str, value: bytes | None):
    if value is None:
        raise BadRecord(f"{topic}: a tombstone is not a valid record here")
    try:
        return json.loads(value.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BadRecord(f"{topic}: value is not UTF-8: {e}") from None
    except (ValueError, RecursionError) as e:
        raise BadRecord(f"{topic}: malformed JSON: {e}") from None


def _name(topic: str, field: str, text: str) -> None:
    if not text or len(text) > MAX_NAME:
        raise BadRecord(f"{topic}: value.{field}: must be 1 to {MAX_NAME} characters")


def alarm_deps(value: bytes | None) -> dict:
    obj = _json("alarm-deps", value)
    try:
        datum = _deps.read(obj)
    except BadRecord as e:
        raise BadRecord(f"alarm-deps: {e}") from None
    _name("alarm-deps", "alarm", datum["alarm"])
    return datum


def alarm_input(value: bytes | None) -> dict:
    obj = _json("alarm-inputs", value)
    if not isinstance(obj, dict):
        raise BadRecord(f"alarm-inputs: value: expected an object, got {type(obj).__name__}")
    try:
        datum = (_tick if "tick" in obj else _pv_input).read(obj)
    except BadRecord as e:
        raise BadRecord(f"alarm-inputs: {e}") from None
    if "pv" in datum:
        _name("alarm-inputs", "pv", datum["pv"])
        if datum["state"] is not None:
            records.pv_state(datum["state"])  # the limits of a pv-state record
    return datum


VALIDATORS = {"alarm-deps": alarm_deps, "alarm-inputs": alarm_input}


def checked(compute):
    """`compute(topic, key, value, msg)`, which first validates the engine's own topics."""
    def compute_checked(topic, key, value, msg):
        validate = VALIDATORS.get(topic)
        if validate is not None:
            validate(value)
        return compute(topic, key, value, msg)

    return compute_checked
