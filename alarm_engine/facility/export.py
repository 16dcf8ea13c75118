"""The current configuration as a facility file (pure: state in, document or text out).

The document is the smallest file that apply takes back to the same records: fields equal
to their default are left out, a value most alarms share becomes a file default, and PVs
that alarms read are left to `monitor-alarm-pvs` when that reproduces them exactly.
Phoebus XML can hold less (per-PV alarms in a component tree only): what it cannot hold is
returned as notes.
"""

from __future__ import annotations

import collections
import json
from xml.sax.saxutils import escape, quoteattr

import yaml

from alarm_engine import records
from alarm_engine.codec import BadRecord, JsonReader
from alarm_engine.config import Settings
from alarm_engine.facility import source
from alarm_engine.facility.fileformat import LOCATIONS, META_FIELDS, RULE_SEVERITY, has_default


def _shared(values: list, n: int):
    """The value more than half of n entries share, if any."""
    if n < 2 or not values:
        return None
    (value, count), = collections.Counter(json.dumps(v, sort_keys=True) for v in values).most_common(1)
    return json.loads(value) if count * 2 > n else None


def _defaults(schema: dict) -> dict:
    reader = JsonReader(schema)
    return {f["name"]: reader.default_of(f["name"]) for f in schema["fields"] if "default" in f}


def _producer_entry(p: dict) -> dict | None:
    if "pv" in p:
        return {"pv": p["pv"]}
    if "expression" in p:
        out = {"rule": p["expression"]}
        if p.get("severity", "MAJOR") != "MAJOR":
            out[RULE_SEVERITY] = p["severity"]
        return out
    if "source" in p:
        return {"external": p["source"] or True}
    return None


def document(topics: dict[str, dict[str, dict | None]], schemas: dict[str, dict],
             settings: Settings | None = None) -> tuple[dict, list[str]]:
    """(file document, notes on what was left out)."""
    settings = settings or Settings()
    notes: list[str] = []
    doc: dict = {"version": 1}
    alarm_schema = schemas["alarms"]
    alarm_defaults = _defaults(alarm_schema)
    fields = [f["name"] for f in alarm_schema["fields"] if f["name"] not in ("producer", *META_FIELDS)]
    alarms: dict[str, dict] = {}
    implied: set[str] = set()
    good = {}
    for name, datum in sorted(topics.get("alarms", {}).items()):
        if datum is None:
            notes.append(f"alarm {name!r}: its record could not be read; not exported")
            continue
        if _producer_entry(datum["producer"]) is None:
            notes.append(f"alarm {name!r}: producer {datum['producer']} cannot be applied (jar rules are "
                         f"refused); not exported")
            continue
        try:
            implied |= records.validate("alarms", name, datum, settings).pvs()
        except BadRecord as e:
            notes.append(f"alarm {name!r}: {e}; exported as it is, apply will refuse it")
        good[name] = datum
    file_defaults = {}
    for f in fields:
        shared = _shared([d[f] for d in good.values() if f in d], len(good))
        if shared is not None and (f not in alarm_defaults or shared != alarm_defaults[f]):
            file_defaults[f] = shared
    for name, datum in good.items():
        entry = _producer_entry(datum["producer"])
        for f in fields:
            if f not in datum:
                continue
            effective = file_defaults.get(f, alarm_defaults.get(f, _MISSING))
            if datum[f] != effective:
                entry[f] = datum[f]
        alarms[name] = entry

    mon_schema = schemas["monitored-pvs"]
    mon_defaults = _defaults(mon_schema)
    mon_fields = [f["name"] for f in mon_schema["fields"] if f["name"] not in META_FIELDS]
    monitored_state = {k: v for k, v in topics.get("monitored-pvs", {}).items() if v is not None}
    for pv in topics.get("monitored-pvs", {}):
        if topics["monitored-pvs"][pv] is None:
            notes.append(f"monitored PV {pv!r}: its record could not be read; not exported")
    mon_file_defaults = {}
    for f in mon_fields:
        shared = _shared([d[f] for d in monitored_state.values() if f in d], len(monitored_state))
        if shared is not None and shared != mon_defaults.get(f, _MISSING):
            mon_file_defaults[f] = shared
    effective_mon = {f: mon_file_defaults.get(f, mon_defaults.get(f)) for f in mon_fields}

    def mon_entry(datum):
        return {f: datum[f] for f in mon_fields if f in datum and datum[f] != effective_mon[f]} or None

    auto = all(pv in monitored_state for pv in implied)
    monitored = {}
    for pv, datum in sorted(monitored_state.items()):
        entry = mon_entry(datum)
        if auto and pv in implied and entry is None:
            continue  # monitor-alarm-pvs gives it back as it is
        monitored[pv] = entry
    if not auto:
        doc["monitor-alarm-pvs"] = False
    if file_defaults:
        doc["defaults"] = file_defaults
    if mon_file_defaults:
        doc["monitored-defaults"] = mon_file_defaults
    if LOCATIONS in schemas and LOCATIONS in topics:
        loc_defaults = _defaults(schemas[LOCATIONS])
        locs = {}
        for name, datum in sorted(topics[LOCATIONS].items()):
            if datum is None:
                notes.append(f"location {name!r}: its record could not be read; not exported")
                continue
            locs[name] = {f: v for f, v in datum.items()
                          if f not in META_FIELDS and v != loc_defaults.get(f, _MISSING)} or None
        if locs:
            doc["locations"] = locs
    if monitored:
        doc["monitored"] = monitored
    doc["alarms"] = alarms
    return doc, notes


_MISSING = object()


class _Dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):
    pass


def _str(dumper, text: str):
    # Quote a string that our reader (YAML 1.2 core rules) would read as something else.
    node = yaml.ScalarNode("tag:yaml.org,2002:str", text, style=None)
    if source.scalar(node) != text or text != text.strip() or text == "":
        return dumper.represent_scalar("tag:yaml.org,2002:str", text, style='"')
    return dumper.represent_scalar("tag:yaml.org,2002:str", text)


_Dumper.add_representer(str, _str)


def to_yaml(doc: dict) -> str:
    header = "# alarm_engine facility file (alarm-engine export); apply with: alarm-engine apply FILE\n"
    return header + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, allow_unicode=True,
                              default_flow_style=None, width=1_000_000)


def to_json(doc: dict) -> str:
    return json.dumps(doc, indent=1, ensure_ascii=False) + "\n"


def to_phoebus_xml(topics: dict[str, dict[str, dict | None]], config_name: str,
                   parents: dict[str, str | None] | None = None) -> tuple[str, list[str]]:
    """A Phoebus alarm configuration (alarm_configuration.xsd): one component per location
    (nested when the locations' parents are known), a pv element per per-PV alarm."""
    notes = []
    parents = dict(parents or {})
    leaves: dict[str, list[tuple[str, dict]]] = collections.defaultdict(list)
    skipped = collections.Counter()
    for name, datum in sorted(topics.get("alarms", {}).items()):
        if datum is None:
            continue
        pv = datum["producer"].get("pv")
        if pv is None:
            skipped["rule or external"] += 1
            continue
        if name != pv:
            skipped["named other than their PV (Phoebus names an alarm by its PV)"] += 1
        leaves[datum["location"]].append((pv, datum))
    for loc in list(leaves):
        # Without a locations topic, a path "Hall A/Vacuum" (as import-phoebus writes it)
        # still nests under "Hall A".
        while loc not in parents:
            parent = loc.rsplit("/", 1)[0] if "/" in loc else None
            parents[loc] = parent
            if parent is None:
                break
            loc = parent
    for what, n in skipped.items():
        notes.append(f"{n} alarm(s) {what}: " + ("not exported" if what == "rule or external" else
                                                  "exported under the PV's name"))
    notes.append("category, priority and the monitor masks have no place in Phoebus' format: not exported")
    children: dict[str | None, list[str]] = collections.defaultdict(list)
    for loc, parent in parents.items():
        children[parent if parent in parents else None].append(loc)
    out = ['<?xml version="1.0" encoding="UTF-8"?>', f"<config name={quoteattr(config_name)}>"]

    def element(tag, text, indent):
        out.append(f"{indent}<{tag}>{escape(str(text))}</{tag}>")

    def component(loc, depth, seen):
        indent = "  " * depth
        parent = parents.get(loc)
        short = loc[len(parent) + 1:] if parent and loc.startswith(parent + "/") else loc
        out.append(f"{indent}<component name={quoteattr(short)}>")
        for pv, d in sorted(leaves.get(loc, ())):
            out.append(f"{indent}  <pv name={quoteattr(pv)}>")
            if d.get("description"):
                element("description", d["description"], indent + "    ")
            element("enabled", "true", indent + "    ")
            element("latching", "true" if d.get("latching") else "false", indent + "    ")
            for title, key in (("Documentation", "docUrl"), ("Screen", "edmPath")):
                if d.get(key):
                    out.append(f"{indent}    <display>")
                    element("title", title, indent + "      ")
                    element("details", d[key], indent + "      ")
                    out.append(f"{indent}    </display>")
            out.append(f"{indent}  </pv>")
        for child in sorted(children.get(loc, ())):
            if child not in seen:
                component(child, depth + 1, seen | {child})
        out.append(f"{indent}</component>")

    for root in sorted(children.get(None, ())):
        component(root, 1, {root})
    out.append("</config>")
    return "\n".join(out) + "\n", notes
