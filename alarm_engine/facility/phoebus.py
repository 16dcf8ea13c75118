"""Import a Phoebus alarm configuration (the XML of its -export; alarm_configuration.xsd).

    <config name="Accelerator">
      <component name="Hall A">            → location "Hall A"
        <component name="Vacuum">          → location "Hall A/Vacuum" (parent "Hall A")
          <pv name="VAC:G1">               → alarm "VAC:G1" {pv: VAC:G1}, monitored PV VAC:G1,
            <description>..</description>     location "Hall A/Vacuum", category "Vacuum"
            <enabled>true</enabled>           (the component that holds it)
            ...
      <xi:include href="hall_b.xml"/>      → XInclude, as Phoebus' reader does (local files only)

Phoebus has no category or priority: the category is the name of the component that holds
the PV, the priority the schema's default. Latching, enabled / enable date, delay, count,
filter, guidance and displays are carried into fields of the same meaning when the alarms
schema has them (and the value fits), else reported. Without a displays field, the first
screen goes to edmPath and the first web link to docUrl. Commands and automated actions are reported, never run.
Like Phoebus, PVs of a component are read before its subcomponents, and a PV already seen
elsewhere is ignored (and reported).
"""

from __future__ import annotations

import collections
import os
import re
import urllib.parse
from xml.etree import ElementInclude, ElementTree

from alarm_engine import records
from alarm_engine.codec import BadRecord, JsonReader
from alarm_engine.facility import pvname
from alarm_engine.facility.fileformat import schemas as config_schemas

XI = "{http://www.w3.org/2001/XInclude}include"
PV_CHILDREN = {"description", "enabled", "latching", "annunciating", "delay", "count", "filter",
               "guidance", "display", "command", "automated_action"}
#: Phoebus setting → (alarm schema field, factor) candidates, the first the schema has wins.
CANDIDATES = {
    "latching": (("latching", 1),),
    "enabled": (("enabled", 1),),
    "delay": (("delaySeconds", 1), ("onDelay", 1), ("delay", 1), ("onDelaySeconds", 1), ("onDelayMs", 1000)),
    "count": (("count", 1), ("onDelayCount", 1), ("delayCount", 1)),
    "filter": (("filter", 1), ("enablingFilter", 1)),
    "guidance": (("guidance", 1),),
    "displays": (("displays", 1),),
}


class Report:
    """What did not map, by kind, with a count and a few examples."""

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()
        self.examples: dict[str, list[str]] = collections.defaultdict(list)
        self.order: list[str] = []

    def add(self, kind: str, where: str) -> None:
        if kind not in self.counts:
            self.order.append(kind)
        self.counts[kind] += 1
        if len(self.examples[kind]) < 3:
            self.examples[kind].append(where)

    def lines(self) -> list[str]:
        out = []
        for kind in self.order:
            ex = ", ".join(self.examples[kind])
            more = ", ..." if self.counts[kind] > len(self.examples[kind]) else ""
            out.append(f"{kind}: {self.counts[kind]} ({ex}{more})")
        return out


def _loader(root_dir: str):
    def load(href, parse, encoding=None):
        url = urllib.parse.urlparse(href)
        if url.scheme not in ("", "file"):
            raise ElementInclude.FatalIncludeError(f"XInclude of {href!r}: only local files are read")
        path = os.path.realpath(url.path)
        return ElementInclude.default_loader(path, parse, encoding)
    return load


def _text(el, tag: str) -> str | None:
    child = el.find(tag)
    return None if child is None else (child.text or "").strip()


def _title_details(el) -> tuple[str, str]:
    # Phoebus writes <details>; its XSD says <detail>: read both.
    return (_text(el, "title") or "", _text(el, "details") or _text(el, "detail") or "")


def _rule_filter(text: str) -> str | None:
    """A Phoebus enabling filter ('PV' > 5 && 'B' == 1) in the rule language, or None."""
    from alarm_engine.core.rules import parse

    rule = re.sub(r"'([^']*)'", r"`\1`", text)
    rule = rule.replace("&&", " and ").replace("||", " or ")
    rule = re.sub(r"!(?!=)", " not ", rule)
    try:
        parse(rule)
    except Exception:
        return None
    return rule


def _candidate(alarm_schema: dict, setting: str):
    names = {f["name"] for f in alarm_schema["fields"]}
    for name, factor in CANDIDATES.get(setting, ()):
        if name in names:
            return name, factor
    return None


def import_tree(root, source_name: str, alarm_schema: dict | None = None) -> tuple[dict, Report]:
    """(facility document, report) from a parsed <config> element (XIncludes resolved)."""
    alarm_schema = alarm_schema or config_schemas()["alarms"]
    reader = JsonReader(alarm_schema)
    report = Report()
    if root.tag != "config":
        raise ValueError(f"{source_name}: expected a <config> element, found <{root.tag}>")
    config = root.get("name") or "config"
    locations: dict[str, dict] = {}
    sections: list[dict] = []
    seen: dict[str, str] = {}

    def put(entry: dict, setting: str, value, where: str, what: str) -> None:
        target = _candidate(alarm_schema, setting)
        if target is None:
            report.add(f"not imported: {what} (the alarms schema has no field for it)", where)
            return
        name, factor = target
        if factor != 1 and isinstance(value, (int, float)):
            value = value * factor
        try:
            reader.read_field(name, value, name)
        except BadRecord as e:
            report.add(f"not imported: {what} ({e})", where)
            return
        entry[name] = value

    def component(el, path: list[str], inherited: dict[str, list]) -> None:
        name = el.get("name")
        if not name:
            report.add("ignored: component without a name", "/" + "/".join([config, *path]))
            return
        here = [*path, name]
        loc = "/".join(here)
        where = "/" + "/".join([config, *here])
        if loc in locations:
            report.add("ignored: duplicate component (as Phoebus does)", where)
            return
        locations[loc] = {"parent": "/".join(path)} if path else {}
        lists = {k: list(v) for k, v in inherited.items()}
        for tag, key in (("guidance", "guidance"), ("display", "displays"), ("command", "commands"),
                         ("automated_action", "actions")):
            own = [_title_details(c) for c in el.findall(tag)]
            lists[key] = own + lists.get(key, [])  # own first, then the ancestors' (inherited)
            if key in ("commands", "actions"):
                for t, _ in own:
                    report.add(f"not imported, never run: {'command' if key == 'commands' else 'automated action'}"
                               f" of a component", f"{where}: {t}")
        for child in el:
            if child.tag not in ("component", "pv", "guidance", "display", "command", "automated_action"):
                report.add(f"ignored: unknown element <{child.tag}>", where)
        alarms: dict[str, dict] = {}
        for pv_el in el.findall("pv"):
            pv(pv_el, here, where, lists, alarms)
        if alarms:
            sections.append({"name": where, "defaults": {"location": loc, "category": name},
                             "alarms": alarms})
        for sub in el.findall("component"):
            component(sub, here, lists)

    def pv(el, here: list[str], parent_where: str, lists: dict[str, list], alarms: dict) -> None:
        name = (el.get("name") or "").strip()
        where = f"{parent_where}/{name}"
        if not name:
            report.add("ignored: pv without a name", parent_where)
            return
        if name in seen:
            report.add("ignored: duplicate PV (Phoebus keeps the first)", f"{where} (first at {seen[name]})")
            return
        why = pvname.problem(name)
        if why:
            report.add(f"not imported: invalid PV name", f"{where}: {why}")
            return
        seen[name] = where
        entry: dict = {"pv": name}
        for child in el:
            if child.tag not in PV_CHILDREN:
                report.add(f"ignored: unknown element <{child.tag}> in a pv", where)
        desc = _text(el, "description")
        if desc:
            entry["description"] = desc
        enabled = _text(el, "enabled")
        # Out of service is an operator's record here (disabled-alarms: who, why, until when),
        # not part of the definition: the report says what to run after apply.
        if enabled and enabled.lower() == "false":
            report.add("not imported: disabled (imported as enabled; after apply: "
                       "alarm-engine disable NAME --reason R)", where)
        elif enabled and enabled.lower() != "true":
            report.add("not imported: enable date (imported as enabled; after apply: "
                       "alarm-engine disable NAME --reason R --until DATE)", f"{where}: {enabled}")
        latching = (_text(el, "latching") or "true").lower() != "false"  # Phoebus' default: true
        if latching:
            put(entry, "latching", True, where, "latching")
        if (_text(el, "annunciating") or "false").lower() == "true":
            report.add("not imported: annunciating (the engine has no annunciator)", where)
        for setting, what in (("delay", "delay"), ("count", "count")):
            text = _text(el, setting)
            if text:
                try:
                    value = int(float(text))
                except ValueError:
                    report.add(f"not imported: {what} {text!r} is not a number", where)
                    continue
                if value > 0:
                    put(entry, setting, value, where, what)
        filt = _text(el, "filter")
        if filt:
            rule = _rule_filter(filt)
            if rule is None:
                report.add("not imported: filter (not expressible in the rule language)", f"{where}: {filt}")
            else:
                put(entry, "filter", rule, where, "filter")
        own = {key: [_title_details(c) for c in el.findall(tag)]
               for tag, key in (("guidance", "guidance"), ("display", "displays"), ("command", "commands"),
                                ("automated_action", "actions"))}
        guidance = own["guidance"] + lists.get("guidance", [])
        displays = own["displays"] + lists.get("displays", [])
        if guidance:
            # Phoebus' guidance is titled free text, inherited from the components above:
            # what the operator should do, so the corrective action of the guidance record.
            text = "\n".join(f"{t}: {d}" if t and d else (t or d) for t, d in guidance)
            put(entry, "guidance", {"rationale": "", "consequence": "", "correctiveAction": text,
                                    "responseTimeSeconds": 0}, where, "guidance")
        if displays:
            # A web link (or what export wrote as "Documentation") is the docUrl, a screen the
            # edmPath; one of each. The rest go to displays when the schema has them.
            extra = []
            for title, details in displays:
                doc = details.startswith(("http://", "https://")) or title == "Documentation"
                key = "docUrl" if doc else "edmPath"
                if key in entry:
                    extra.append((title, details))
                else:
                    entry[key] = details
            links = []
            for title, details in extra:
                try:
                    records.display_url("display", details)
                    links.append({"title": title, "url": details})
                except BadRecord:
                    report.add("not imported: display that is not an http(s) URL or relative path",
                               f"{where}: {title}")
            if links and _candidate(alarm_schema, "displays"):
                put(entry, "displays", links, where, "displays")
            elif links:
                report.add("not imported: displays beyond one screen (edmPath) and one web link (docUrl)", where)
        for t, _ in own["commands"]:
            report.add("not imported, never run: command", f"{where}: {t}")
        for t, _ in own["actions"]:
            report.add("not imported, never run: automated action", f"{where}: {t}")
        alarms[name] = entry

    for child in root:
        if child.tag == "component":
            component(child, [], {})
        elif child.tag == "pv":
            report.add("ignored: pv directly under <config> (Phoebus needs a component)", child.get("name", ""))
        else:
            report.add(f"ignored: unknown element <{child.tag}> in <config>", f"/{config}")
    doc = {"version": 1, "locations": {k: (v or None) for k, v in locations.items()}, "sections": sections}
    if alarm_schema and not any(f["name"] == "priority" and "default" in f for f in alarm_schema["fields"]):
        doc["defaults"] = {"priority": "P3_PRODUCTIVITY"}
    report.add("note: Phoebus has no priority; every alarm has the default priority", f"/{config}")
    return doc, report


def import_file(path: str, alarm_schema: dict | None = None) -> tuple[dict, Report]:
    tree = ElementTree.parse(path)
    root = tree.getroot()
    ElementInclude.include(root, loader=_loader(os.path.dirname(os.path.abspath(path))),
                           base_url=os.path.abspath(path), max_depth=10)
    return import_tree(root, path, alarm_schema)
