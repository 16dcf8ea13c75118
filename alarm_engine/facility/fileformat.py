"""The facility file: monitored PVs, alarms and locations, with defaults, checked as records.

    version: 1
    defaults: {category: Cooling}            # every alarm of this file
    monitored-defaults: {mask: [VALUE, ALARM]}
    locations:
      CEBAF: {}
      Hall A: {parent: CEBAF, defaults: {priority: P2_PROPERTY}}
    monitored:
      IOC1:FLOW: {mask: [VALUE, ALARM, LOG]}
    alarms:
      Hall A temperature: {pv: IOC1:TEMP, location: Hall A}
      Low flow: {rule: "`IOC1:FLOW` < 40", rule-severity: MINOR, location: Hall A}
      PSS trip: {external: PSS, location: Hall A, priority: P1_LIFE}
    sections:                                # groups with defaults of their own
      - defaults: {location: Hall A, category: Vacuum}
        alarms: {...}
        monitored: {...}

An alarm's fields are the fields of the alarms schema (location, category, priority,
docUrl, edmPath, description, and any field the schema gains), plus a shorthand for its
producer: `pv: NAME`, `rule: EXPRESSION` (with `rule-severity`), `external: SOURCE`, or
the schema's own `producer`. A field not given on the alarm comes from, in this order: its
section's defaults, the defaults of its location and then of each ancestor, the file's
defaults, the schema's default. Every PV an alarm reads is monitored (with the
monitored-defaults) unless the file says `monitor-alarm-pvs: false`.

Locations form a tree (`parent`). They are written to the alarm-locations topic when the
engine has one (its schema then says which fields an entry takes); otherwise they serve
the file alone: defaults, and a check that every alarm names a known location.

Validation is that of the topics' records (the same JSON reading against the Avro schemas,
then records.validate: rules parse, texts bounded, configured location/category lists), and
every problem is reported, each as FILE:LINE: field: reason. Nothing here does I/O but
reading the files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alarm_engine import records
from alarm_engine.codec import BadRecord, JsonReader, load_schema
from alarm_engine.config import VALUE_SCHEMAS, Settings
from alarm_engine.facility import pvname, source
from alarm_engine.facility.source import Mapping, Problem

LOCATIONS = "alarm-locations"
#: The configuration topics a file describes, in the order apply writes them.
# The alarm-locations topic exists (config.MANAGEMENT_TOPICS), but files do not write it yet:
# apply, diff and export of the location tree against the topic are still to come.
CONFIG_TOPICS = (LOCATIONS, "monitored-pvs", "alarms")
#: Fields apply fills in from the environment when a schema has them; a diff ignores them.
META_FIELDS = ("user", "host")

TOP_KEYS = ("version", "defaults", "monitored-defaults", "monitor-alarm-pvs", "locations", "monitored",
            "alarms", "sections")
SECTION_KEYS = ("name", "defaults", "monitored-defaults", "monitored", "alarms")
PRODUCER_KEYS = ("pv", "rule", "external", "producer")
RULE_SEVERITY = "rule-severity"


def schemas() -> dict[str, dict]:
    return {t: load_schema(VALUE_SCHEMAS[t]) for t in CONFIG_TOPICS}


def field_names(schema: dict) -> list[str]:
    return [f["name"] for f in schema["fields"]]


def has_default(schema: dict, name: str) -> bool:
    return any(f["name"] == name and "default" in f for f in schema["fields"])


def _label(section: str, key: str | None = None, fld: str | None = None) -> str:
    out = section if key is None else f"{section}[{key}]"
    return out if fld is None else f"{out}.{fld}"


@dataclass
class Desired:
    """What the files say each configuration topic should hold: topic → key → datum."""

    records: dict[str, dict[str, dict]]
    #: (topic, key) → "FILE:LINE" where the entry is defined (implied PVs: the alarm's)
    origins: dict[tuple[str, str], str] = field(default_factory=dict)
    #: location → parent (None for a root), whether or not a topic holds them
    locations: dict[str, str | None] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def count(self) -> int:
        return sum(len(v) for v in self.records.values())


@dataclass
class _Source:
    """A mapping of defaults and where it was written."""

    values: Mapping
    file: str
    label: str


class _Builder:
    def __init__(self, settings: Settings, topic_schemas: dict[str, dict]):
        self.settings = settings
        self.schemas = topic_schemas
        self.readers = {t: JsonReader(s) for t, s in topic_schemas.items()}
        # Defaults as data, once (shared by every datum: records are never changed in place).
        self.schema_defaults = {t: {f["name"]: self.readers[t].default_of(f["name"]) for f in s["fields"] if "default" in f}
                         for t, s in topic_schemas.items()}
        self._implied_datum: dict[int, dict | None] = {}
        self._inherited: dict[tuple, dict] = {}
        self.alarm_fields = field_names(topic_schemas["alarms"])
        self.alarm_field_set = set(self.alarm_fields) - {"producer"}
        self.monitor_fields = field_names(topic_schemas["monitored-pvs"])
        self.location_fields = (field_names(topic_schemas[LOCATIONS]) if LOCATIONS in topic_schemas
                                else ["parent"])
        self.problems: list[Problem] = []
        self.records: dict[str, dict[str, dict]] = {t: {} for t in topic_schemas}
        self.origins: dict[tuple[str, str], str] = {}
        self.locations: dict[str, tuple[Mapping, str, int]] = {}  # name → (entry, file, line)
        self.location_defaults: dict[str, _Source] = {}
        self.implied: dict[str, tuple[str, Mapping]] = {}  # PV → (origin, monitored-defaults)
        self.alarm_locations: list[tuple[str, int, str, str]] = []  # (file, line, alarm, location)
        self.warnings: list[str] = []
        self._checked: dict[tuple[int, str], tuple[Any, bool]] = {}
        self._groups: list = []
        self.parents: dict[str, str | None] = {}

    def problem(self, file: str, line: int, label: str, reason: str) -> None:
        self.problems.append(Problem(file, line, label, reason))

    # --- shapes ---------------------------------------------------------------------

    def mapping(self, value, file: str, line: int, label: str, allow_list: bool = False):
        if value is None:
            return Mapping(line)
        if isinstance(value, Mapping):
            return value
        if allow_list and isinstance(value, list):
            return value
        kind = "a list" if isinstance(value, list) else json.dumps(value)[:40]
        self.problem(file, line, label, f"expected a mapping of names to entries, got {kind}")
        return None

    def known_keys(self, m: Mapping, allowed, file: str, label: str) -> None:
        for key in m:
            if key not in allowed:
                self.problem(file, m.line_of(key), _label(label, fld=key) if label else key,
                             f"unknown field (fields: {', '.join(allowed)})")

    # --- the document ---------------------------------------------------------------

    def file(self, doc, file: str) -> None:
        doc = self.mapping(doc, file, 1, "")
        if doc is None:
            return
        self.known_keys(doc, TOP_KEYS, file, "")
        version = doc.get("version", 1)
        if version != 1:
            self.problem(file, doc.line_of("version"), "version", f"unknown file version {version!r} (this is 1)")
        monitor_pvs = doc.get("monitor-alarm-pvs", True)
        if not isinstance(monitor_pvs, bool):
            self.problem(file, doc.line_of("monitor-alarm-pvs"), "monitor-alarm-pvs", "expected true or false")
            monitor_pvs = True
        top_defaults = self.defaults(doc, "defaults", file, "defaults")
        top_monitor = self.monitor_defaults(doc, file, "monitored-defaults")
        locs = self.mapping(doc.get("locations"), file, doc.line_of("locations"), "locations")
        if locs:
            for name, entry in locs.items():
                self.location(name, entry, locs.line_of(name), file)
        groups = [(doc, "", None, top_monitor)]
        sections = doc.get("sections")
        if sections is not None and not isinstance(sections, list):
            self.problem(file, doc.line_of("sections"), "sections", "expected a list of sections")
            sections = None
        for i, sec in enumerate(sections or ()):
            label = f"sections[{i}]"
            sec = self.mapping(sec, file, getattr(sections, "line", 0) or doc.line_of("sections"), label)
            if sec is None:
                continue
            self.known_keys(sec, SECTION_KEYS, file, label)
            sec_defaults = self.defaults(sec, "defaults", file, f"{label}.defaults")
            sec_monitor = self.monitor_defaults(sec, file, f"{label}.monitored-defaults")
            groups.append((sec, f"{label}.", sec_defaults, sec_monitor or top_monitor))
        self._groups.append((file, groups, top_defaults, monitor_pvs))

    def defaults(self, m: Mapping, key: str, file: str, label: str, allow_location: bool = True):
        d = self.mapping(m.get(key), file, m.line_of(key), label)
        if not d:
            return None
        allowed = [f for f in self.alarm_fields if f != "producer" and (allow_location or f != "location")]
        allowed.append(RULE_SEVERITY)
        self.known_keys(d, allowed, file, label)
        return _Source(d, file, label)

    def monitor_defaults(self, m: Mapping, file: str, label: str):
        d = self.mapping(m.get("monitored-defaults"), file, m.line_of("monitored-defaults"), label)
        if not d:
            return None
        self.known_keys(d, self.monitor_fields, file, label)
        return _Source(d, file, label)

    def location(self, name: str, entry, line: int, file: str) -> None:
        label = _label("locations", name)
        entry = self.mapping(entry, file, line, label)
        if entry is None:
            return
        if name in self.locations:
            first = self.locations[name]
            self.problem(file, line, label, f"location defined twice (also at {first[1]}:{first[2]})")
            return
        self.locations[name] = (entry, file, line)
        self.known_keys(entry, [*self.location_fields, "defaults"], file, label)
        parent = entry.get("parent")
        if parent is not None and not isinstance(parent, str):
            self.problem(file, entry.line_of("parent"), _label("locations", name, "parent"),
                         "expected the name of a location or null")
        d = self.defaults(entry, "defaults", file, _label("locations", name, "defaults"), allow_location=False)
        if d:
            self.location_defaults[name] = d

    # --- checks after every file is read ----------------------------------------------

    def finish(self) -> None:
        self.check_locations()
        for file, groups, top_defaults, monitor_pvs in self._groups:
            for body, prefix, sec_defaults, monitor in groups:
                self.monitored(body, prefix, file, monitor)
            for body, prefix, sec_defaults, monitor in groups:
                self.alarms(body, prefix, file, sec_defaults, top_defaults, monitor, monitor_pvs)
        self.add_implied()
        self.check_masks()
        for (topic, name), origin in list(self.origins.items()):
            if topic == "alarms":
                pv = self.records["alarms"][name]["producer"].get("pv")
                if pv and pv not in self.records["monitored-pvs"]:
                    self.warnings.append(f"{origin}: alarms[{name}]: PV {pv} is not monitored by this file "
                                         f"(monitor-alarm-pvs is false)")
        if self.locations:
            for file, line, alarm, loc in self.alarm_locations:
                if loc and loc not in self.locations:
                    self.problem(file, line, _label("alarms", alarm, "location"),
                                 f"{loc!r} is not one of the file's locations")

    def check_masks(self) -> None:
        """A cycle of maskedBy parents among the file's alarms: each cycle once, at its first alarm."""
        from alarm_engine.masking import cycles

        parents = {n: d.get("maskedBy") for n, d in self.records["alarms"].items()}
        for cycle in cycles(parents):
            file, _, line = self.origins[("alarms", cycle[0])].rpartition(":")
            self.problem(file, int(line), _label("alarms", cycle[0], "maskedBy"),
                         f"maskedBy cycle: {' → '.join(cycle)}")

    def check_locations(self) -> None:
        parents: dict[str, str | None] = {}
        for name, (entry, file, line) in self.locations.items():
            parent = entry.get("parent")
            line = entry.line_of("parent") if "parent" in entry else line
            if isinstance(parent, str) and parent not in self.locations:
                self.problem(file, line, _label("locations", name, "parent"), f"{parent!r} is not a location")
                parent = None
            parents[name] = parent if isinstance(parent, str) else None
        reported: set[str] = set()
        for start in parents:
            path, node = [], start
            while node is not None and node not in path and node not in reported:
                path.append(node)
                node = parents[node]
            if node is not None and node in path:  # a cycle, reported once from its first member
                cycle = path[path.index(node):]
                entry, file, _ = self.locations[cycle[0]]
                self.problem(file, entry.line_of("parent"), _label("locations", cycle[0], "parent"),
                             f"location cycle: {' → '.join(cycle + [cycle[0]])}")
                reported.update(cycle)
            reported.update(path)
        self.parents = parents
        if LOCATIONS in self.schemas:
            reader = self.readers[LOCATIONS]
            for name, (entry, file, line) in self.locations.items():
                datum = self.record(LOCATIONS, reader, {k: v for k, v in entry.items() if k != "defaults"},
                                    entry, file, _label("locations", name))
                if datum is not None:
                    self.records[LOCATIONS][name] = datum
                    self.origins[(LOCATIONS, name)] = f"{file}:{line}"

    def record(self, topic: str, reader: JsonReader, values: dict, lines: Mapping, file: str, label: str):
        """A datum from a flat entry, every field checked; None (and problems) if bad."""
        out, ok = {}, True
        for name in field_names(self.schemas[topic]):
            if name in values:
                try:
                    out[name] = reader.read_field(name, values[name], _label(label, fld=name))
                except BadRecord as e:
                    self.problem(file, lines.line_of(name), _label(label, fld=name), _reason(e, label, name))
                    ok = False
            elif name in self.schema_defaults[topic]:
                out[name] = self.schema_defaults[topic][name]
            elif name not in META_FIELDS:
                self.problem(file, lines.line, label, f"missing required field {name!r}")
                ok = False
        return out if ok else None

    def monitored(self, body: Mapping, prefix: str, file: str, monitor: _Source | None) -> None:
        label = f"{prefix}monitored"
        mons = self.mapping(body.get("monitored"), file, body.line_of("monitored"), label, allow_list=True)
        if not mons:
            return
        items = ([(n, None, getattr(mons, "line", 0)) for n in mons] if isinstance(mons, list)
                 else [(n, e, mons.line_of(n)) for n, e in mons.items()])
        reader = self.readers["monitored-pvs"]
        for pv, entry, line in items:
            plabel = _label(label, pv)
            if not isinstance(pv, str):
                self.problem(file, line, label, f"expected a PV name, got {json.dumps(pv)[:40]}")
                continue
            why = pvname.problem(pv)
            if why:
                self.problem(file, line, plabel, why)
                continue
            entry = self.mapping(entry, file, line, plabel)
            if entry is None:
                continue
            self.known_keys(entry, self.monitor_fields, file, plabel)
            if ("monitored-pvs", pv) in self.origins:
                self.problem(file, line, plabel, f"PV listed twice (also at {self.origins[('monitored-pvs', pv)]})")
                continue
            values = dict(monitor.values) if monitor else {}
            values.update({k: v for k, v in entry.items() if k in self.monitor_fields})
            lines = entry if entry else Mapping(line)
            datum = self.record("monitored-pvs", reader, values, lines, file, plabel)
            if datum is not None:
                try:
                    records.validate("monitored-pvs", pv, datum, self.settings)
                except BadRecord as e:
                    self.problem(file, line, plabel, str(e))
                    continue
                self.records["monitored-pvs"][pv] = datum
                self.origins[("monitored-pvs", pv)] = f"{file}:{line}"

    def alarms(self, body: Mapping, prefix: str, file: str, sec_defaults, top_defaults, monitor,
               monitor_pvs: bool) -> None:
        label = f"{prefix}alarms"
        alarms = self.mapping(body.get("alarms"), file, body.line_of("alarms"), label)
        if not alarms:
            return
        allowed = [*PRODUCER_KEYS, RULE_SEVERITY, *(f for f in self.alarm_fields if f != "producer")]
        for name, entry in alarms.items():
            line = alarms.line_of(name)
            alabel = _label("alarms", name)
            entry = self.mapping(entry, file, line, alabel)
            if entry is None:
                continue
            if ("alarms", name) in self.origins:
                self.problem(file, line, alabel, f"alarm defined twice (also at {self.origins[('alarms', name)]})")
                continue
            why = _key_problem(name)
            if why:
                self.problem(file, line, alabel, why)
                continue
            self.known_keys(entry, allowed, file, alabel)
            datum, pvs = self.alarm(name, entry, file, line, sec_defaults, top_defaults)
            if datum is None:
                continue
            self.records["alarms"][name] = datum
            self.origins[("alarms", name)] = f"{file}:{line}"
            if monitor_pvs:
                for pv in pvs:
                    self.implied.setdefault(pv, (f"{file}:{line}", monitor))

    def inherited(self, sec_defaults, top_defaults, location) -> dict:
        """What alarms of one section and location take from defaults: field → (datum
        value, good, mapping, file, label). Worked out (and checked, and reported) once per
        (section, location), not once per alarm."""
        key = (id(sec_defaults), id(top_defaults), location if isinstance(location, str) else None)
        if key in self._inherited:
            return self._inherited[key]
        chain = [sec_defaults] if sec_defaults else []
        seen = set()
        while isinstance(location, str) and location not in seen:
            seen.add(location)  # a cycle is reported by check_locations
            if location in self.location_defaults:
                chain.append(self.location_defaults[location])
            location = self.parents.get(location)
        if top_defaults:
            chain.append(top_defaults)
        reader = self.readers["alarms"]
        out = {}
        for fname in [*self.alarm_fields, RULE_SEVERITY]:
            for d in chain:
                if fname not in d.values:
                    continue
                value = d.values[fname]
                memo = (id(d.values), fname)
                if memo not in self._checked:
                    try:
                        converted = (value if fname == RULE_SEVERITY else
                                     reader.read_field(fname, value, _label(d.label, fld=fname)))
                        self._checked[memo] = (converted, True)
                    except BadRecord as e:
                        self.problem(d.file, d.values.line_of(fname), _label(d.label, fld=fname),
                                     _reason(e, d.label, fname))
                        self._checked[memo] = (None, False)
                converted, good = self._checked[memo]
                out[fname] = (converted, good, d.values, d.file, d.label)
                break
        # The datum an alarm without fields of its own would have, and what it lacks.
        base, ok, missing = {}, True, []
        for fname in self.alarm_fields:
            if fname == "producer":
                continue
            if fname in out:
                base[fname] = out[fname][0]
                ok = ok and out[fname][1]
            elif fname in self.schema_defaults["alarms"]:
                base[fname] = self.schema_defaults["alarms"][fname]
            elif fname not in META_FIELDS:
                missing.append(fname)
        out = (out, base, ok, missing)
        self._inherited[key] = out
        return out

    def alarm(self, name: str, entry: Mapping, file: str, line: int, sec_defaults, top_defaults):
        alabel = _label("alarms", name)
        given = [k for k in PRODUCER_KEYS if k in entry]
        if len(given) != 1:
            what = f"gives {' and '.join(given)}" if given else "gives none"
            self.problem(file, line, alabel, f"an alarm needs exactly one of pv, rule, external, producer ({what})")
            return None, ()
        kind = given[0]
        if "location" in entry:
            location = entry["location"]
        elif sec_defaults and "location" in sec_defaults.values:
            location = sec_defaults.values["location"]
        elif top_defaults and "location" in top_defaults.values:
            location = top_defaults.values["location"]
        else:
            location = None
        inh, base, base_ok, missing = self.inherited(sec_defaults, top_defaults, location)
        reader = self.readers["alarms"]
        datum = dict(base)
        ok = True
        bad_inherited = not base_ok
        for fname in entry:
            if fname not in self.alarm_field_set:
                continue
            try:
                datum[fname] = reader.read_field(fname, entry[fname], _label(alabel, fld=fname))
            except BadRecord as e:
                self.problem(file, entry.line_of(fname), _label(alabel, fld=fname), _reason(e, alabel, fname))
                ok = False
        if bad_inherited:  # a bad default (reported once) not overridden here
            ok = ok and all(inh[f][1] or f in entry for f in inh if f != RULE_SEVERITY)
        for fname in missing:
            if fname not in entry:
                self.problem(file, line, alabel, f"missing required field {fname!r} (give it on the alarm, "
                                                 f"its section's or location's defaults, or the file's defaults)")
                ok = False
        if isinstance(datum.get("location"), str):
            self.alarm_locations.append((file, entry.line_of("location"), name, datum["location"]))
        producer = self.producer(kind, entry, inh, file, alabel)
        if producer is None or not ok:
            return None, ()
        datum = {"producer": producer, **datum}
        try:
            defn = records.validate("alarms", name, datum, self.settings)
        except BadRecord as e:
            reason = str(e).removeprefix(f"alarm {name!r}: ")
            fld = next((f for f in self.alarm_fields if reason.startswith(f + " ")), kind)
            self.problem(file, entry.line_of(fld), _label("alarms", name, fld), reason)
            return None, ()
        if kind == "pv":
            return datum, (producer["pv"],)  # its name is checked already
        pvs = sorted(defn.pvs())
        bad = False
        for pv in pvs:
            why = pvname.problem(pv)
            if why:
                self.problem(file, entry.line_of(kind), _label("alarms", name, kind), why)
                bad = True
        return (None, ()) if bad else (datum, pvs)

    def producer(self, kind: str, entry: Mapping, inh: dict, file: str, alabel: str):
        value = entry[kind]
        flabel = _label(alabel, fld=kind)
        line = entry.line_of(kind)
        if kind == "producer":
            try:
                return self.readers["alarms"].read_field("producer", value, flabel)
            except BadRecord as e:
                self.problem(file, line, flabel, _reason(e, alabel, kind))
                return None
        if kind == "external":
            if value is True or value is None:
                value = ""
            if not isinstance(value, str):
                self.problem(file, line, flabel, "expected the name of the outside source (text), or true")
                return None
            return {"source": value}
        if not isinstance(value, str):
            self.problem(file, line, flabel, f"expected {'a PV name' if kind == 'pv' else 'a rule expression'} "
                                             f"(text), got {json.dumps(value)[:40]}")
            return None
        if kind == "pv":
            why = pvname.problem(value)
            if why:
                self.problem(file, line, flabel, why)
                return None
            return {"pv": value}
        if RULE_SEVERITY in entry:
            severity, where, sfile, slabel = entry[RULE_SEVERITY], entry, file, alabel
        elif RULE_SEVERITY in inh:
            severity, _, where, sfile, slabel = inh[RULE_SEVERITY]
        else:
            severity = "MAJOR"
        if severity not in ("MINOR", "MAJOR", "INVALID"):
            self.problem(sfile, where.line_of(RULE_SEVERITY), _label(slabel, fld=RULE_SEVERITY),
                         f"{json.dumps(severity)[:40]} is not one of MINOR, MAJOR, INVALID")
            return None
        return {"expression": value, "severity": severity}

    def add_implied(self) -> None:
        reader = self.readers["monitored-pvs"]
        for pv, (origin, monitor) in self.implied.items():
            if pv in self.records["monitored-pvs"] or ("monitored-pvs", pv) in self.origins:
                continue
            memo = id(monitor)  # one datum per monitored-defaults, shared by its PVs
            if memo not in self._implied_datum:
                values = dict(monitor.values) if monitor else {}
                self._implied_datum[memo] = self.record(
                    "monitored-pvs", reader, values, monitor.values if monitor else Mapping(0),
                    monitor.file if monitor else origin, "monitored-defaults")
            datum = self._implied_datum[memo]
            if datum is not None:
                self.records["monitored-pvs"][pv] = datum
                self.origins[("monitored-pvs", pv)] = origin


def _reason(e: BadRecord, label: str, name: str) -> str:
    """The codec's message without the path it starts with (the label says it)."""
    text = str(e)
    head = _label(label, fld=name)
    if text.startswith(head):
        text = text[len(head):].lstrip(": ").lstrip(".")
    return text or str(e)


def build(docs: list[tuple[object, str]], settings: Settings, topic_schemas: dict[str, dict] | None = None):
    """(Desired, problems) from parsed documents [(document, file name)]."""
    b = _Builder(settings, topic_schemas or schemas())
    for doc, file in docs:
        b.file(source.from_plain(doc) if type(doc) is dict else doc, file)
    b.finish()
    desired = Desired(b.records, b.origins, dict(b.parents), b.warnings)
    return desired, b.problems


def load(paths: list[str], settings: Settings, topic_schemas: dict[str, dict] | None = None):
    """(Desired, problems) for files. JSON is read with the json module (fast); if any
    problem is found, JSON files are read again as YAML to give every problem its line."""
    docs, problems, fast = [], [], False
    for path in paths:
        if Path(path).suffix.lower() == ".json":
            doc, probs = _load_json(path)
            fast = fast or probs is None
            if probs is None:
                docs.append((doc, path))
                continue
        else:
            doc, probs = source.load(path)
        problems.extend(probs)
        if doc is not None:
            docs.append((doc, path))
    desired, found = build(docs, settings, topic_schemas)
    problems.extend(found)
    if problems and fast:
        return load_slow(paths, settings, topic_schemas)
    return desired, problems


def load_slow(paths, settings, topic_schemas=None):
    docs, problems = [], []
    for path in paths:
        doc, probs = source.load(path)
        problems.extend(probs)
        if doc is not None:
            docs.append((doc, path))
    desired, found = build(docs, settings, topic_schemas)
    return desired, problems + found


def _key_problem(name: str) -> str | None:
    """Why a name cannot be a record key (codec.decode_key's rule), or None."""
    if not name.strip():
        return "empty name"
    if len(name) > 512:
        return f"name of {len(name)} characters (at most 512)"
    if any(c in name for c in "\x00\n\r"):
        return "name contains a line break or NUL"
    return None


class _Duplicate(Exception):
    pass


def _pairs(pairs):
    m = Mapping(0)
    for k, v in pairs:
        if k in m:
            raise _Duplicate(k)
        m[k] = v
    return m


def _load_json(path: str):
    """(document, None) when the json module reads it cleanly; (None, [...]) to fall back."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f, object_pairs_hook=_pairs), None
    except (_Duplicate, ValueError, RecursionError):
        doc, probs = source.load(path)  # the YAML reader gives the line of the problem
        if not probs:
            probs = []
        return doc, probs
    except OSError as e:
        return None, [Problem(path, 0, "", f"cannot read: {e}")]
