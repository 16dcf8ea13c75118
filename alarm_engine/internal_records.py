"""The engine's own topics are validated like the operators' ones.

alarm-deps (keyed by PV, read by the PV's home) and alarm-inputs (keyed by alarm,
read by the alarm agent) carry JSON that the engine writes (engine.py, pv_home.py);
anyone with write access can write there too. A record that does not fit one of the
shapes below is rejected to dead-letters with a schema-level reason ("alarm-deps:
value.alarm: expected a string, got 5"), never stored, never an "internal error".
pv-state goes through the codec (Avro or strict JSON against
schemas/pv-state-value.avsc) and then `records.pv_state` (limits).

alarm-deps, chosen by the field present besides "alarm" (a non-empty string):
  {"alarm", "uses": boolean}                       a rule alarm reads / stops reading the PV
  {"alarm", "tick": long}                          re-evaluate a per-PV alarm (a timer is due)
  {"alarm", "control": null | object, "ts": long?, "move": long?}
                                                   a per-PV alarm's control (pv_home checks the
                                                   object), or its release (null)
alarm-inputs, chosen the same way:
  {"tick": long}                                   re-evaluate the alarm
  {"released": string, "move": long}               the PV's home has let the alarm go
  {"pv": string, "state": null | pv-state value}   a PV the alarm reads changed
  {"parent": string, "masking": boolean}           the alarm's maskedBy parent masks it / no longer
  {"child": string, "watch": boolean}              (keyed by the parent) the child names this alarm
                                                   as its maskedBy parent / no longer does
No tombstones on either.
"""

from __future__ import annotations

import json

from alarm_engine import records
from alarm_engine.codec import BadRecord, JsonReader, load_schema

MAX_NAME = 1024

_PV_STATE = load_schema("pv-state-value")


def _record(name: str, *fields) -> JsonReader:
    return JsonReader({"type": "record", "name": name, "fields": [
        {"name": f, "type": t, **({"default": None} if isinstance(t, list) and "null" in t else {})}
        for f, t in fields]})


# One reader per shape; the shape is chosen by the field that names it, so that a
# reason names the field at fault rather than "matches none of".
DEPS = {
    "uses": _record("Uses", ("alarm", "string"), ("uses", "boolean")),
    "tick": _record("DepTick", ("alarm", "string"), ("tick", "long")),
    "control": _record("Control", ("alarm", "string"), ("control", "null"), ("ts", ["null", "long"]),
                       ("move", ["null", "long"])),
}
_control_set = JsonReader({"type": "record", "name": "ControlSet", "fields": [
    {"name": "alarm", "type": "string"}, {"name": "ts", "type": ["null", "long"], "default": None},
    {"name": "move", "type": ["null", "long"], "default": None}]})
INPUTS = {
    "tick": _record("Tick", ("tick", "long")),
    "released": _record("Released", ("released", "string"), ("move", "long")),
    "pv": _record("PVInput", ("pv", "string"), ("state", ["null", _PV_STATE])),
    "parent": _record("ParentMasking", ("parent", "string"), ("masking", "boolean")),
    "child": _record("ChildWatch", ("child", "string"), ("watch", "boolean")),
}


def _object(topic: str, value: bytes | None) -> dict:
    if value is None:
        raise BadRecord(f"{topic}: a tombstone is not a valid record here")
    try:
        obj = json.loads(value.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BadRecord(f"{topic}: value is not UTF-8: {e}") from None
    except (ValueError, RecursionError) as e:
        raise BadRecord(f"{topic}: malformed JSON: {e}") from None
    if not isinstance(obj, dict):
        raise BadRecord(f"{topic}: value: expected an object, got {type(obj).__name__}")
    return obj


def _name(topic: str, field: str, text: str) -> None:
    if not text or len(text) > MAX_NAME:
        raise BadRecord(f"{topic}: value.{field}: must be 1 to {MAX_NAME} characters")


def _shape(topic: str, obj: dict, readers: dict[str, JsonReader]) -> str:
    for field in readers:
        if field in obj:
            return field
    unknown = sorted(set(obj) - {"alarm"})
    if unknown:
        raise BadRecord(f"{topic}: value: unknown field {unknown[0]!r} (expected one of {', '.join(readers)})")
    raise BadRecord(f"{topic}: value: none of the fields {', '.join(readers)}")


def alarm_deps(value: bytes | None) -> dict:
    obj = _object("alarm-deps", value)
    shape = _shape("alarm-deps", obj, DEPS)
    try:
        if shape == "control" and obj["control"] is not None:
            # The control object itself is checked where it is applied (pv_home).
            datum = _control_set.read({k: v for k, v in obj.items() if k != "control"})
            datum["control"] = obj["control"]
            if not isinstance(datum["control"], dict):
                raise BadRecord(f"value.control: expected an object or null, got {type(obj['control']).__name__}")
        else:
            datum = DEPS[shape].read(obj)
    except BadRecord as e:
        raise BadRecord(f"alarm-deps: {e}") from None
    _name("alarm-deps", "alarm", datum["alarm"])
    return datum


def alarm_input(value: bytes | None) -> dict:
    obj = _object("alarm-inputs", value)
    shape = _shape("alarm-inputs", obj, INPUTS)
    try:
        datum = INPUTS[shape].read(obj)
    except BadRecord as e:
        raise BadRecord(f"alarm-inputs: {e}") from None
    if shape == "pv":
        _name("alarm-inputs", "pv", datum["pv"])
        if datum["state"] is not None:
            records.pv_state(datum["state"])  # the limits of a pv-state record
    elif shape in ("released", "parent", "child"):
        _name("alarm-inputs", shape, datum[shape])
    return datum


VALIDATORS = {"alarm-deps": alarm_deps, "alarm-inputs": alarm_input}
