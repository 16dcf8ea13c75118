"""The JSON Schema of facility files, derived from the topics' Avro schemas (for editors).

`python -m alarm_engine.facility.jsonschema > alarm_engine/facility/facility.schema.json`
writes the shipped file; a unit test checks that it is up to date with schemas/.
"""

from __future__ import annotations

import json
import sys

from alarm_engine.facility.fileformat import (LOCATIONS, META_FIELDS, PRODUCER_KEYS, RULE_SEVERITY,
                                              schemas as config_schemas)


def _avro(t, names: dict):
    if isinstance(t, str) and t in names:
        t = names[t]
    if isinstance(t, list):
        return {"anyOf": [_avro(b, names) for b in t]}
    kind = t if isinstance(t, str) else t["type"]
    if isinstance(kind, (dict, list)):
        return _avro(kind, names)
    simple = {"null": {"type": "null"}, "boolean": {"type": "boolean"}, "int": {"type": "integer"},
              "long": {"type": "integer"}, "float": {"type": "number"}, "double": {"type": "number"},
              "string": {"type": "string"}, "bytes": {"type": "string"}}
    if kind in simple:
        return dict(simple[kind])
    if kind == "enum":
        names[t["name"]] = t
        return {"enum": list(t["symbols"]), **({"description": t["doc"]} if "doc" in t else {})}
    if kind == "array":
        return {"type": "array", "items": _avro(t["items"], names)}
    if kind == "map":
        return {"type": "object", "additionalProperties": _avro(t["values"], names)}
    if kind == "record":
        names[t["name"]] = t
        return _record(t, names)
    raise ValueError(f"unsupported Avro type {kind}")


def _record(t: dict, names: dict, skip=()) -> dict:
    props, required = {}, []
    for f in t["fields"]:
        if f["name"] in skip:
            continue
        p = _avro(f["type"], names)
        if "doc" in f:
            p["description"] = f["doc"]
        props[f["name"]] = p
        if "default" not in f and f["name"] not in META_FIELDS:
            required.append(f["name"])
    out = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        out["required"] = required
    return out


def build() -> dict:
    schemas = config_schemas()
    names: dict = {}
    alarm = _record(schemas["alarms"], names)
    producer = alarm["properties"].pop("producer")
    alarm.pop("required", None)  # may come from defaults
    alarm["properties"] = {
        "pv": {"type": "string", "description": "A per-PV alarm: this PV's EPICS alarm severity."},
        "rule": {"type": "string", "description": "A rule alarm: active while this expression holds."},
        RULE_SEVERITY: {"enum": ["MINOR", "MAJOR", "INVALID"], "description": "Severity while the rule holds."},
        "external": {"type": ["string", "boolean"], "description": "An external alarm, activated by "
                                                                   "alarm-activations; the source's name."},
        "producer": producer,
        **alarm["properties"],
    }
    alarm["oneOf"] = [{"required": [k]} for k in PRODUCER_KEYS]
    defaults = {"type": "object", "additionalProperties": False,
                "properties": {k: v for k, v in alarm["properties"].items()
                               if k not in PRODUCER_KEYS},
                "description": "Alarm fields for every alarm this applies to."}
    loc_defaults = {**defaults, "properties": {k: v for k, v in defaults["properties"].items() if k != "location"}}
    monitored = _record(schemas["monitored-pvs"], names)
    if LOCATIONS in schemas:
        location = _record(schemas[LOCATIONS], names)
    else:
        location = {"type": "object", "additionalProperties": False,
                    "properties": {"parent": {"type": ["string", "null"]}}}
    location["properties"]["defaults"] = loc_defaults
    entries = lambda s: {"type": "object", "additionalProperties": {"anyOf": [s, {"type": "null"}]}}  # noqa: E731
    monitored_list = {"anyOf": [entries(monitored), {"type": "array", "items": {"type": "string"}}]}
    section = {"type": "object", "additionalProperties": False, "properties": {
        "name": {"type": "string"}, "defaults": defaults, "monitored-defaults": monitored,
        "monitored": monitored_list, "alarms": entries(alarm)}}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "alarm_engine facility file",
        "description": "Monitored PVs, alarms and locations of a facility (alarm-engine apply).",
        "type": "object", "additionalProperties": False,
        "properties": {
            "version": {"const": 1},
            "defaults": defaults,
            "monitored-defaults": monitored,
            "monitor-alarm-pvs": {"type": "boolean", "description": "Monitor every PV an alarm reads (true)."},
            "locations": entries(location),
            "monitored": monitored_list,
            "alarms": entries(alarm),
            "sections": {"type": "array", "items": section},
        },
    }


def text() -> str:
    return json.dumps(build(), indent=1) + "\n"


if __name__ == "__main__":
    sys.stdout.write(text())
