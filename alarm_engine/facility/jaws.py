"""Import JAWS alarm, action (class), location and system files into a facility file.

JAWS' bulk files (its set_* scripts' --file) have one record a line, `KEY=VALUE`, the value
in Avro's JSON encoding (unions tagged with the full type name, e.g.
{"org.jlab.jaws.entity.EPICSSource": {"pv": "IOC:X"}}). The kind of each record is told by
its fields, so the files may be given in any order and mixed:

    alarm     {action|alarmclass, source, location[], device, managedby, maskedby, screencommand}
    action    {system|category, priority, rationale, correctiveaction, latchable, filterable,
               ondelayseconds, offdelayseconds}
    location  {parent}
    system    {team}

The older kafka-alarm-system records ({producer: DirectCAAlarm{pv}, location, category,
docurl, edmpath, ...}) are read too. Mapping: EPICSSource → per-PV alarm (and monitored PV);
Source (no source information) → external alarm; CALCSource → not imported (JAWS' CALC
expressions are not this engine's rule language); the action gives priority (P1_CRITICAL →
P1_LIFE, P2_MAJOR → P2_PROPERTY, P3_MINOR → P3_PRODUCTIVITY, P4_INCIDENTAL → P4_DIAGNOSTIC),
category (its system), description and guidance (its rationale and corrective action),
delaySeconds and offDelaySeconds (its on- and off-delay), latching; the first location is the
alarm's; screencommand → edmPath. What has no field in the alarms schema is reported.
"""

from __future__ import annotations

import json

from alarm_engine.codec import BadRecord, JsonReader
from alarm_engine.facility.fileformat import schemas as config_schemas
from alarm_engine.facility.phoebus import Report

PRIORITIES = {"P1_CRITICAL": "P1_LIFE", "P2_MAJOR": "P2_PROPERTY", "P3_MINOR": "P3_PRODUCTIVITY",
              "P4_INCIDENTAL": "P4_DIAGNOSTIC",
              # already this engine's names (older kafka-alarm-system files)
              "P1_LIFE": "P1_LIFE", "P2_PROPERTY": "P2_PROPERTY", "P3_PRODUCTIVITY": "P3_PRODUCTIVITY",
              "P4_DIAGNOSTIC": "P4_DIAGNOSTIC"}
#: JAWS field → (alarm schema field candidates); carried when the schema has one and the value fits.
OPTIONAL = {
    "latchable": ("latching",),
    "maskedby": ("maskedBy", "maskedby"),
    "ondelayseconds": ("delaySeconds", "onDelay", "onDelaySeconds"),
    "offdelayseconds": ("offDelay", "offDelaySeconds"),
    "filterable": ("filterable",),
}


_PRIMITIVES = ("string", "long", "int", "boolean", "double", "float", "bytes")


def _untag(value):
    """(type short name, record) of an Avro-JSON union value; (None, value) if untagged."""
    if isinstance(value, dict) and len(value) == 1:
        (tag, inner), = value.items()
        if "." in tag or tag[:1].isupper() or tag in _PRIMITIVES:
            return tag.rsplit(".", 1)[-1], inner
    return None, value


def _kind(v: dict) -> str | None:
    if "source" in v or "producer" in v:
        return "alarm"
    if "team" in v:
        return "system"
    if "priority" in v and ("system" in v or "category" in v or "rationale" in v):
        return "action"
    if set(v) <= {"parent"} and "parent" in v:
        return "location"
    return None


def read_lines(text: str, name: str, report: Report) -> list[tuple[str, str, dict]]:
    """(kind, key, value) of each record line."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip().strip('"')
        where = f"{name}:{n}"
        if not sep or not key:
            report.add("ignored: not a KEY=VALUE line", where)
            continue
        if not value.strip():
            report.add("ignored: tombstone (KEY= with no value)", f"{where} {key}")
            continue
        try:
            v = json.loads(value)
        except ValueError as e:
            report.add("ignored: value is not JSON", f"{where}: {e}")
            continue
        if not isinstance(v, dict):
            report.add("ignored: value is not a JSON object", where)
            continue
        kind = _kind(v)
        if kind is None:
            report.add("ignored: record of unknown kind", f"{where} {key}")
            continue
        out.append((kind, key, v))
    return out


def convert(recs: list[tuple[str, str, dict]], report: Report, alarm_schema: dict | None = None) -> dict:
    alarm_schema = alarm_schema or config_schemas()["alarms"]
    fields = {f["name"] for f in alarm_schema["fields"]}
    reader = JsonReader(alarm_schema)
    by_kind: dict[str, dict[str, dict]] = {"alarm": {}, "action": {}, "location": {}, "system": {}}
    for kind, key, v in recs:
        if key in by_kind[kind]:
            report.add(f"ignored: earlier {kind} record replaced by a later one (as compaction does)", key)
        by_kind[kind][key] = v
    for name, v in by_kind["system"].items():
        report.add("not imported: system team (no such field)", f"{name}: team {v.get('team')}")

    def carry(entry: dict, jaws_field: str, value, where: str) -> None:
        target = next((f for f in OPTIONAL.get(jaws_field, ()) if f in fields), None)
        if target is None:
            report.add(f"not imported: {jaws_field} (the alarms schema has no field for it)", where)
            return
        try:
            reader.read_field(target, value, target)
        except BadRecord as e:
            report.add(f"not imported: {jaws_field} ({e})", where)
            return
        entry[target] = value

    def guide(entry: dict, action: dict, where: str) -> None:
        """The action's rationale and corrective action: the alarm's guidance record."""
        value = {"rationale": _untag(action.get("rationale"))[1] or "", "consequence": "",
                 "correctiveAction": _untag(action.get("correctiveaction"))[1] or "", "responseTimeSeconds": 0}
        if "guidance" not in fields:
            report.add("not imported: rationale (the alarms schema has no guidance field)", where)
            return
        try:
            reader.read_field("guidance", value, "guidance")
        except BadRecord as e:
            report.add(f"not imported: rationale and corrective action ({e})", where)
            return
        entry["guidance"] = value

    locations = {}
    for name, v in by_kind["location"].items():
        parent = v.get("parent")
        _, parent = _untag(parent)  # Avro JSON may tag the string branch: {"string": "CEBAF"}
        locations[name] = {"parent": parent} if parent else None
    for name, loc in list(locations.items()):
        if loc and loc["parent"] not in locations:
            report.add("note: parent location not in the files, added as a root", f"{name} → {loc['parent']}")
            locations[loc["parent"]] = None
    alarms = {}
    for name, v in sorted(by_kind["alarm"].items()):
        entry: dict = {}
        if "producer" in v:  # kafka-alarm-system (2021) registration
            tag, inner = _untag(v["producer"])
            if "pv" in inner:
                entry["pv"] = inner["pv"]
            elif "expression" in inner:
                report.add("not imported: CALC/rule producer (not this engine's rule language)", name)
                continue
            else:
                entry["external"] = "kafka-alarm-system"
            loc = _untag(v.get("location"))[1]
            entry["location"] = loc or ""
            cat = _untag(v.get("category"))[1]
            entry["category"] = cat or ""
            for src, dst in (("docurl", "docUrl"), ("edmpath", "edmPath")):
                val = _untag(v.get(src))[1]
                if val:
                    entry[dst] = val
            prio = _untag(v.get("priority"))[1]
            if prio in PRIORITIES:
                entry["priority"] = PRIORITIES[prio]
            if v.get("latching"):
                carry(entry, "latchable", bool(v["latching"]), name)
            for other in ("maxshelveduration", "filterable", "screenpath", "pointofcontactusername"):
                if v.get(other) is not None:
                    report.add(f"not imported: {other}", name)
            if locations and entry["location"] and entry["location"] not in locations:
                locations[entry["location"]] = None
            alarms[name] = entry
            continue
        tag, src = _untag(v.get("source") or {})
        if tag == "EPICSSource" or (tag is None and "pv" in src):
            entry["pv"] = src["pv"]
        elif tag == "CALCSource" or (tag is None and "expression" in src):
            report.add("not imported: CALCSource (JAWS CALC expressions are not this engine's rule "
                       "language; define a rule alarm)", f"{name}: {src.get('expression')}")
            continue
        else:
            entry["external"] = "JAWS"
        action_name = v.get("action") or v.get("alarmclass") or "base"
        action = by_kind["action"].get(action_name)
        if action is None:
            report.add("note: action not in the files; category is the action's name, priority the default",
                       f"{name}: {action_name}")
            entry["category"] = action_name
        else:
            entry["category"] = _untag(action.get("system") or action.get("category"))[1] or action_name
            prio = action.get("priority")
            if prio in PRIORITIES:
                entry["priority"] = PRIORITIES[prio]
            elif prio:
                report.add(f"not imported: priority {prio!r}", name)
            if action.get("correctiveaction"):
                entry["description"] = action["correctiveaction"]
            if action.get("rationale") or action.get("correctiveaction"):
                guide(entry, action, name)
            if action.get("latchable"):
                carry(entry, "latchable", True, name)
            for f in ("ondelayseconds", "offdelayseconds"):
                if action.get(f):
                    carry(entry, f, action[f], name)
            if action.get("filterable") is False:
                carry(entry, "filterable", False, name)
        locs = v.get("location") or []
        locs = [_untag(x)[1] for x in (locs if isinstance(locs, list) else [locs])]
        entry["location"] = locs[0] if locs else ""
        if len(locs) > 1:
            report.add("not imported: locations after the first (an alarm has one location)",
                       f"{name}: {', '.join(locs[1:])}")
        for loc in locs[:1]:
            if locations and loc not in locations:
                report.add("note: location not in the files, added as a root", f"{name}: {loc}")
                locations[loc] = None
        screen = _untag(v.get("screencommand"))[1]
        if screen:
            entry["edmPath"] = screen
        if v.get("maskedby"):
            carry(entry, "maskedby", _untag(v["maskedby"])[1], name)
        for f in ("device", "managedby"):
            if _untag(v.get(f))[1]:
                report.add(f"not imported: {f} (no such field)", f"{name}: {_untag(v[f])[1]}")
        alarms[name] = entry
    doc: dict = {"version": 1}
    if locations:
        doc["locations"] = locations
    doc["alarms"] = alarms
    return doc


def import_files(paths: list[str], alarm_schema: dict | None = None) -> tuple[dict, Report]:
    report = Report()
    recs = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            recs += read_lines(f.read(), path, report)
    return convert(recs, report, alarm_schema), report
