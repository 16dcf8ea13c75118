"""The facility file: format, defaults, validation errors, plan, export round trip, importers."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest

from alarm_engine import cli
from alarm_engine.config import Settings
from alarm_engine.facility import apply, diff, export, fileformat, jaws, jsonschema, phoebus, pvname, source

DATA = Path(__file__).resolve().parents[1] / "data"
EXAMPLE = str(DATA / "facility" / "example.yaml")
BAD = str(DATA / "facility" / "bad.yaml")
S = Settings()
# The alarm-management fields of an alarm record, at their schema defaults.
MGMT = {"latching": None, "delaySeconds": 0.0, "count": 0, "offDelaySeconds": 0.0, "filter": None,
        "maskedBy": None, "guidance": None, "displays": []}


def load(*paths):
    return fileformat.load([str(p) for p in paths], S)


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


# --- the format -----------------------------------------------------------------------

def test_example_file_gives_records_with_defaults_in_their_order():
    desired, problems = load(EXAMPLE)
    assert problems == []
    alarms, mons = desired.records["alarms"], desired.records["monitored-pvs"]
    assert alarms["Hall A temperature"] == {
        "producer": {"pv": "IOC1:TEMP"}, "location": "Hall A", "category": "Cooling",  # file default
        "docUrl": "", "edmPath": "", "priority": "P2_PROPERTY",  # Hall A's location default
        "description": "Cooling water too warm: check the pump.", **MGMT}
    assert alarms["Low flow at high power"]["producer"] == {
        "expression": "`RF:POWER` > 5 and `CW:FLOW` < 40", "severity": "MINOR"}
    assert alarms["Low flow at high power"]["category"] == "RF"  # own value beats the file's default
    assert alarms["PSS trip"]["producer"] == {"source": "PSS"} and alarms["PSS trip"]["priority"] == "P1_LIFE"
    # A section's defaults, and an alarm's own field over them.
    assert alarms["Gauge 1"]["location"] == "Hall B" and alarms["Gauge 1"]["docUrl"] == "/docs/vacuum"
    assert alarms["Gauge 1"]["priority"] == "P3_PRODUCTIVITY"  # the schema's default (Hall B has none)
    assert alarms["Gauge 2"]["priority"] == "P4_DIAGNOSTIC"
    # Every PV an alarm reads is monitored; an explicit entry keeps its own mask.
    assert set(mons) == {"RF:POWER", "IOC1:TEMP", "CW:FLOW", "VAC:G1", "VAC:G2"}
    assert mons["RF:POWER"]["mask"] == ["VALUE", "ALARM", "LOG"]
    assert mons["CW:FLOW"] == {"mask": ["VALUE", "ALARM"], "topic": None}
    assert desired.locations == {"CEBAF": None, "Hall A": "CEBAF", "Hall B": "CEBAF"}
    assert desired.origins[("alarms", "PSS trip")] == f"{EXAMPLE}:25"


def test_section_defaults_win_over_location_defaults_and_location_over_file(tmp_path):
    f = write(tmp_path, "f.yaml", """
defaults: {category: FileCat, priority: P4_DIAGNOSTIC, description: from the file}
locations:
  Top: {defaults: {description: from Top, priority: P1_LIFE}}
  Mid: {parent: Top, defaults: {priority: P2_PROPERTY}}
sections:
  - defaults: {location: Mid, category: SectionCat}
    alarms:
      A: {external: true}
      B: {external: x, priority: P3_PRODUCTIVITY}
""")
    desired, problems = load(f)
    assert problems == []
    a, b = desired.records["alarms"]["A"], desired.records["alarms"]["B"]
    assert (a["category"], a["priority"], a["description"]) == ("SectionCat", "P2_PROPERTY", "from Top")
    assert a["producer"] == {"source": ""} and b["priority"] == "P3_PRODUCTIVITY"


def test_yaml_1_2_scalars_keep_pv_names_and_numbers_apart(tmp_path):
    doc, problems = source.parse("a: ON\nb: 1:30\nc: 12\nd: '12'\ne: 1.5e3\nf: null\ng: yes\nh: 0x1F\n", "x")
    assert problems == []
    assert doc == {"a": "ON", "b": "1:30", "c": 12, "d": "12", "e": 1500.0, "f": None, "g": "yes", "h": 31}


def test_merge_keys_and_aliases_are_read(tmp_path):
    f = write(tmp_path, "f.yaml", """
alarms:
  A: &a {pv: "X:1", location: L, category: C}
  B:
    <<: *a
    pv: "X:2"
""")
    desired, problems = load(f)
    assert problems == []
    assert desired.records["alarms"]["B"]["producer"] == {"pv": "X:2"}
    assert desired.records["alarms"]["B"]["location"] == "L"


def test_json_file_reads_the_same_as_yaml(tmp_path):
    doc, _ = source.load(EXAMPLE)
    f = write(tmp_path, "example.json", json.dumps(doc, indent=1))
    desired_json, problems = load(f)
    desired_yaml, _ = load(EXAMPLE)
    assert problems == [] and desired_json.records == desired_yaml.records


def test_json_file_errors_carry_lines(tmp_path):
    f = write(tmp_path, "f.json", '{\n "alarms": {\n  "A": {"pv": "X:1", "location": "L",\n'
                                  '        "category": "C", "priority": "P9"}\n },\n "alarms": {}\n}\n')
    _, problems = load(f)
    assert [str(p) for p in problems] == [
        f"{f}:6: alarms: duplicate key (first at line 2)",
        f'{f}:4: alarms[A].priority: "P9" is not one of P1_LIFE, P2_PROPERTY, P3_PRODUCTIVITY, P4_DIAGNOSTIC']


def test_every_problem_of_a_bad_file_is_one_line_with_file_line_and_field():
    desired, problems = load(BAD)
    got = sorted((p.line, p.field, p.reason.split(" ")[0]) for p in problems)
    assert [str(p).startswith(f"{BAD}:{p.line}: ") for p in problems] == [True] * len(problems)
    assert got == sorted([
        (2, "colour", "unknown"),
        (4, "locations[A].parent", "location"),  # the cycle A → C → B → A, once
        (7, "locations[D].parent", "'Nowhere'"),
        (9, "alarms[Unknown field].severity", "unknown"),
        (10, "alarms[Bad rule].rule", "unexpected"),
        (11, "alarms[Bad PV].pv", "PV"),
        (12, "alarms[Bad rule PV].rule", "record"),
        (13, "alarms[Two producers]", "an"),
        (14, "alarms[No category]", "missing"),
        (15, "alarms[Bad priority].priority", '"P9_WHATEVER"'),
        (16, "alarms[Unknown location].location", "'Hall"),
        (17, "alarms[Bad field name].pv", "field"),
        (18, "alarms[Bad rule PV]", "duplicate"),
        (20, "monitored[IOC:T 1]", "PV"),
        (21, "monitored[IOC:T2].mask", "[1]:"),
    ])
    cycle = next(p for p in problems if p.line == 4)
    assert cycle.reason == "location cycle: A → C → B → A"


def test_a_bad_default_is_reported_once_not_per_alarm(tmp_path):
    alarms = "".join(f"  A{i}: {{pv: 'X:{i}', location: L}}\n" for i in range(50))
    f = write(tmp_path, "f.yaml", f"defaults: {{category: C, priority: P7}}\nalarms:\n{alarms}")
    _, problems = load(f)
    assert [str(p) for p in problems] == [
        f'{f}:1: defaults.priority: "P7" is not one of P1_LIFE, P2_PROPERTY, P3_PRODUCTIVITY, P4_DIAGNOSTIC']


def test_duplicates_across_files_and_sections(tmp_path):
    a = write(tmp_path, "a.yaml", "alarms:\n  A: {external: s, location: L, category: C}\n"
                                  "monitored: [X:1]\n")
    b = write(tmp_path, "b.yaml", "sections:\n  - alarms:\n      A: {external: s, location: L, category: C}\n"
                                  "    monitored: {X:1: {}}\n")
    _, problems = load(a, b)
    assert sorted(str(p) for p in problems) == sorted([
        f"{b}:3: alarms[A]: alarm defined twice (also at {a}:2)",
        f"{b}:4: sections[0].monitored[X:1]: PV listed twice (also at {a}:3)"])


def test_location_limits_of_the_engine_apply_to_the_file(tmp_path):
    f = write(tmp_path, "f.yaml", "alarms:\n  A: {external: s, location: Nowhere, category: C}\n")
    _, problems = fileformat.load([f], Settings(locations=("Hall A",)))
    assert [str(p) for p in problems] == [f"{f}:2: alarms[A].location: location 'Nowhere' is not one of Hall A"]


@pytest.mark.parametrize("name, ok", [
    ("IOC1:TEMP", True), ("IOC1:TEMP.VAL", True), ("IOC1:TEMP.HIHI", True), ("IOC:X.DESC$", True),
    ("SR{RF}Cav-1:T", True), ('T:1.VAL{"dbnd":{"abs":1}}', True), ("a:b-c_d;e<f>[g]", True),
    ("", False), ("IOC 1", False), ("IOC\t1", False), ('IOC"1', False), ("IOC'1", False), ("IOC$1", False),
    ("IOC:X.val", False), ("a.b.c", False), ("Température", False), ("IOC`1", False), ("x" * 513, False),
    (".VAL", False), ("T:1.VAL{x", False),
])
def test_epics_pv_names(name, ok):
    assert (pvname.problem(name) is None) == ok, pvname.problem(name)


# --- the plan ---------------------------------------------------------------------------

def _desired():
    desired, problems = load(EXAMPLE)
    assert not problems
    return desired.records


def test_plan_into_empty_topics_adds_everything_locations_and_pvs_before_alarms():
    want = _desired()
    p = diff.plan({}, want, prune=False)
    order = p.ordered()
    assert len(order) == 13 and all(v is not None for _, _, v in order)  # 3 locations, 5 PVs, 5 alarms
    topics = [t for t, _, _ in order]
    assert topics.count("alarm-locations") == 3
    assert topics.index("alarms") > max(i for i, t in enumerate(topics) if t in ("monitored-pvs", "alarm-locations"))


def test_plan_of_the_same_state_writes_nothing_whoever_applies():
    want = _desired()
    have = {t: {k: {**v, "user": "someone", "host": "elsewhere"} for k, v in recs.items()}
            for t, recs in want.items()}
    p = diff.plan(have, want, prune=True)
    assert p.ordered() == [] and p.writes() == 0
    assert [line.split(":")[0] for line in diff.summary(p)] == ["alarm-locations", "monitored-pvs", "alarms"]
    assert diff.summary(p)[1].startswith("monitored-pvs: 0 added, 0 changed, 0 removed")


def test_plan_changed_removed_and_prune():
    want = _desired()
    have = json.loads(json.dumps(want))
    have["alarms"]["PSS trip"]["priority"] = "P2_PROPERTY"
    have["alarms"]["Old alarm"] = have["alarms"]["Gauge 1"]
    have["monitored-pvs"]["OLD:PV"] = have["monitored-pvs"]["VAC:G1"]
    have["alarms"]["Unreadable"] = None
    have["alarms"]["Gauge 2"] = None  # the file has it: rewritten
    kept = diff.plan(have, want, prune=False)
    assert [(t, k) for t, k, _ in kept.ordered()] == [("alarms", "Gauge 2"), ("alarms", "PSS trip")]
    lines = diff.summary(kept)
    assert "alarms: 0 added, 2 changed, 2 not in the files (kept; --prune removes them), 3 unchanged" in lines
    assert "  ~ PSS trip: priority: 'P2_PROPERTY' → 'P1_LIFE'" in lines
    pruned = diff.plan(have, want, prune=True)
    assert [(t, k, v) for t, k, v in pruned.ordered() if v is None] == [
        ("alarms", "Old alarm", None), ("alarms", "Unreadable", None), ("monitored-pvs", "OLD:PV", None)]


def test_summary_lists_the_first_n_entries():
    want = {"alarms": {f"A{i:03d}": {"x": i} for i in range(25)}}
    lines = diff.summary(diff.plan({}, want, False), show=3)
    assert lines[:5] == ["alarms: 25 added, 0 changed, 0 not in the files (kept; --prune removes them), 0 unchanged",
                         "  + A000", "  + A001", "  + A002", "  + ... and 22 more"]


# --- export: the round trip ---------------------------------------------------------------

def _random_state(seed: int, n: int = 300):
    rng = random.Random(seed)
    mons, alarms = {}, {}
    for i in range(n):
        pv = f"R{seed}:PV{i}"
        mask = rng.choice([["VALUE", "ALARM"], ["VALUE", "ALARM"], ["VALUE", "ALARM", "LOG"], []])
        if rng.random() < 0.9:
            mons[pv] = {"mask": mask, "topic": None}
        kind = rng.random()
        if kind < 0.7:
            producer = {"pv": pv}
        elif kind < 0.9:
            producer = {"expression": f"`{pv}` > {rng.randint(0, 9)} or `R{seed}:PV{(i + 1) % n}` < 0",
                        "severity": rng.choice(["MINOR", "MAJOR", "INVALID"])}
        else:
            producer = {"source": rng.choice(["", "PSS", "ON"])}
        alarms[f"Alarm {i}: ON"] = {
            "producer": producer, "location": rng.choice(["Hall A", "Hall B", "1:30", "yes"]),
            "category": rng.choice(["Vacuum", "RF", "Vacuum", "Vacuum"]),
            "docUrl": rng.choice(["", "", "/docs/x", "12"]), "edmPath": "",
            "priority": rng.choice(["P1_LIFE", "P3_PRODUCTIVITY", "P3_PRODUCTIVITY"]),
            "description": rng.choice(["", "  leading blanks", "null", "a: b", "multi\nline"]), **MGMT}
    return {"alarm-locations": {}, "monitored-pvs": mons, "alarms": alarms}


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_export_gives_a_file_that_applies_back_to_the_same_records(tmp_path, seed, fmt):
    state = _random_state(seed)
    doc, notes = export.document(state, fileformat.schemas(), S)
    assert notes == []
    text = export.to_yaml(doc) if fmt == "yaml" else export.to_json(doc)
    f = write(tmp_path, f"export.{fmt}", text)
    desired, problems = load(f)
    assert problems == []
    assert desired.records == state
    assert diff.plan(state, desired.records, prune=True).ordered() == []


def test_export_factors_shared_values_and_implied_pvs():
    state = {"monitored-pvs": {f"P{i}": {"mask": ["VALUE", "ALARM"], "topic": None} for i in range(100)},
             "alarms": {f"A{i}": {"producer": {"pv": f"P{i}"}, "location": "Hall A", "category": "Vacuum",
                                  "docUrl": "", "edmPath": "", "priority": "P3_PRODUCTIVITY",
                                  "description": ""} for i in range(100)}}
    doc, _ = export.document(state, fileformat.schemas(), S)
    assert doc["defaults"] == {"location": "Hall A", "category": "Vacuum"}
    assert "monitored" not in doc and "monitor-alarm-pvs" not in doc
    assert doc["alarms"]["A7"] == {"pv": "P7"}


def test_export_without_implied_pv_says_so():
    state = {"alarm-locations": {}, "monitored-pvs": {}, "alarms": {"A": {
        "producer": {"pv": "P"}, "location": "L", "category": "C", "docUrl": "", "edmPath": "",
        "priority": "P3_PRODUCTIVITY", "description": "", **MGMT}}}
    doc, _ = export.document(state, fileformat.schemas(), S)
    assert doc["monitor-alarm-pvs"] is False
    desired, problems = fileformat.build([(doc, "x")], S)
    assert problems == [] and desired.records == state
    assert desired.warnings == ["x:0: alarms[A]: PV P is not monitored by this file (monitor-alarm-pvs is false)"]


# --- importers --------------------------------------------------------------------------

def test_import_phoebus_nested_components_xinclude_and_report():
    doc, report = phoebus.import_file(str(DATA / "phoebus" / "accelerator.xml"))
    desired, problems = fileformat.build([(doc, "imported")], S)
    assert problems == []
    alarms = desired.records["alarms"]
    assert set(alarms) == {"INJ:VAC:G1", "INJ:VAC:G2", "INJ:VAC:G3", "INJ:RF:KLY1", "HB:VAC:G1", "HB:TARGET:TEMP"}
    assert alarms["INJ:RF:KLY1"]["location"] == "Injector/RF/Klystron"
    assert alarms["INJ:RF:KLY1"]["category"] == "Klystron"
    assert alarms["HB:VAC:G1"]["location"] == "Hall B/Vacuum"  # from the XIncluded file
    assert alarms["INJ:VAC:G1"]["description"] == "Injector gauge 1 pressure"
    assert alarms["INJ:VAC:G1"]["edmPath"] == "/opr/inj/overview.bob"  # the component's display, inherited
    assert alarms["INJ:VAC:G2"]["docUrl"] == "https://docs.example.org/gauges"
    assert set(desired.records["monitored-pvs"]) == set(alarms)
    assert desired.locations == {"Injector": None, "Injector/Vacuum": "Injector", "Injector/RF": "Injector",
                                 "Injector/RF/Klystron": "Injector/RF", "Hall B": None,
                                 "Hall B/Vacuum": "Hall B"}
    text = "\n".join(report.lines())
    for expected in ["never run: command of a component: 1 (/Accelerator/Injector: Restart IOC)",
                     "never run: automated action: 1 (/Accelerator/Injector/Vacuum/INJ:VAC:G1: Mail the vacuum",
                     "never run: command: 1 (/Accelerator/Injector/Vacuum/INJ:VAC:G3: Open valve)",
                     "ignored: duplicate PV (Phoebus keeps the first): 1 (/Accelerator/Injector/RF/Klystron/INJ:VAC:G1",
                     "not imported: disabled (imported as enabled; after apply: alarm-engine disable NAME",
                     "not imported: enable date (imported as enabled; after apply: alarm-engine disable NAME "
                     "--reason R --until DATE): 1 (/Accelerator/Injector/Vacuum/INJ:VAC:G3: 2026-12-24T08:00:00)",
                     "not imported: annunciating"]:
        assert expected in text, expected
    # The alarms schema has latching, delaySeconds, count, filter and guidance: carried into them.
    assert "not imported: latching" not in text and "not imported: delay" not in text
    assert "not imported: guidance" not in text
    # Guidance, the component's inherited first: the corrective action.
    assert alarms["INJ:VAC:G1"]["guidance"]["correctiveAction"].startswith("Injector: Call the injector expert.")


def test_import_phoebus_carries_settings_into_the_management_fields():
    doc, report = phoebus.import_file(str(DATA / "phoebus" / "accelerator.xml"))
    g1 = doc["sections"][0]["alarms"]["INJ:VAC:G1"]
    # Phoebus' 'PV' quoting becomes the rule language's backquotes.
    assert (g1["latching"], g1["delaySeconds"], g1["filter"]) == (True, 10, "`INJ:BEAM` > 0")
    desired, problems = fileformat.build([(doc, "imported")], S)
    assert problems == []
    assert desired.records["alarms"]["INJ:VAC:G1"]["filter"] == "`INJ:BEAM` > 0"


def test_import_phoebus_carries_settings_into_fields_the_schema_has():
    schema = json.loads(json.dumps(fileformat.schemas()["alarms"]))
    # Another name for the on-delay: the importer finds it among its candidates.
    schema["fields"] = [f for f in schema["fields"] if f["name"] != "delaySeconds"]
    schema["fields"] += [{"name": "onDelay", "type": "long", "default": 0}]
    doc, report = phoebus.import_file(str(DATA / "phoebus" / "accelerator.xml"), schema)
    g1 = doc["sections"][0]["alarms"]["INJ:VAC:G1"]
    assert (g1["latching"], g1["onDelay"], g1["filter"]) == (True, 10, "`INJ:BEAM` > 0")
    assert "not imported: latching" not in "\n".join(report.lines())


def test_phoebus_xinclude_of_a_url_is_refused(tmp_path):
    f = write(tmp_path, "c.xml", '<config name="c" xmlns:xi="http://www.w3.org/2001/XInclude">'
                                 '<xi:include href="http://example.org/x.xml"/></config>')
    with pytest.raises(Exception, match="only local files"):
        phoebus.import_file(f)


def _phoebus_xml(n_pvs: int) -> str:
    """A generated configuration: 5 areas × 10 systems × n/50 PVs, nested."""
    out = ['<config name="Generated">']
    per = n_pvs // 50
    for a in range(5):
        out.append(f'<component name="Area{a}">')
        for s in range(10):
            out.append(f'<component name="System{s}">')
            for i in range(per):
                out.append(f'<pv name="A{a}:S{s}:PV{i}"><description>PV {i} of system {s}</description>'
                           f'<enabled>true</enabled><latching>false</latching></pv>')
            out.append("</component>")
        out.append("</component>")
    out.append("</config>")
    return "\n".join(out)


def test_import_phoebus_25000_pvs(tmp_path):
    f = write(tmp_path, "big.xml", _phoebus_xml(25_000))
    doc, report = phoebus.import_file(f)
    out = write(tmp_path, "big.yaml", export.to_yaml(doc))
    desired, problems = load(out)
    assert problems == []
    assert len(desired.records["alarms"]) == 25_000 and len(desired.records["monitored-pvs"]) == 25_000
    assert len(desired.locations) == 55
    assert desired.records["alarms"]["A4:S9:PV499"]["location"] == "Area4/System9"
    assert report.lines() == ["note: Phoebus has no priority; every alarm has the default priority: 1 (/Generated)"]


def test_export_to_phoebus_xml_imports_back(tmp_path):
    desired, _ = load(EXAMPLE)
    state = desired.records
    state["alarms"]["VAC:G1"] = {**state["alarms"].pop("Gauge 1"), "location": "Hall B/Vacuum"}
    xml, notes = export.to_phoebus_xml(state, "CEBAF", desired.locations)
    assert any("rule or external" in n for n in notes)
    doc, _ = phoebus.import_file(write(tmp_path, "x.xml", xml))
    back, problems = fileformat.build([(doc, "x")], S)
    assert problems == []
    assert back.records["alarms"]["VAC:G1"]["location"] == "CEBAF/Hall B/Vacuum"
    assert back.records["alarms"]["VAC:G1"]["producer"] == {"pv": "VAC:G1"}
    assert set(back.records["alarms"]) == {"IOC1:TEMP", "VAC:G1", "VAC:G2"}  # rule and external: not in XML
    assert back.records["alarms"]["IOC1:TEMP"]["description"] == "Cooling water too warm: check the pump."
    assert back.records["alarms"]["VAC:G2"]["docUrl"] == "/docs/vacuum"


def test_import_jaws_alarms_actions_locations():
    files = [str(DATA / "jaws" / n) for n in ("alarms", "actions", "locations")]
    doc, report = jaws.import_files(files)
    desired, problems = fileformat.build([(doc, "imported")], S)
    assert problems == []
    a = desired.records["alarms"]
    assert a["inj_gauge1"] == {"producer": {"pv": "INJ:VAC:G1"}, "location": "INJ", "category": "Vacuum",
                               "docUrl": "", "edmPath": "/opr/inj/vacuum.edl", "priority": "P2_PROPERTY",
                               "description": "Close the valves and call vacuum on call",
                               **{**MGMT, "delaySeconds": 5.0,
                                  "guidance": {"rationale": "Beam line vacuum protects the cavities", "consequence": "",
                                               "correctiveAction": "Close the valves and call vacuum on call",
                                               "responseTimeSeconds": 0}}}
    assert a["pss_trip"]["producer"] == {"source": "JAWS"} and a["pss_trip"]["priority"] == "P1_LIFE"
    assert a["nl_gauge1"]["location"] == "NL"
    assert a["old_style"]["producer"] == {"pv": "iocin1:heartbeat"} and a["old_style"]["category"] == "RF"
    assert "hallA_calc" not in a
    assert a["pss_trip"]["guidance"]["rationale"] == "Personnel safety"
    assert desired.locations == {"CEBAF": None, "INJ": "CEBAF", "NL": "CEBAF", "SL": "CEBAF", "HallA": "CEBAF"}
    text = "\n".join(report.lines())
    for expected in ["CALCSource", "locations after the first (an alarm has one location): 1 (nl_gauge1: SL)",
                     "not imported: device",
                     "not imported: managedby", "action not in the files", "not a KEY=VALUE line: 1"]:
        assert expected in text, expected


# --- the JSON Schema, the CLI --------------------------------------------------------------

def test_shipped_json_schema_is_up_to_date_and_checks_files():
    import jsonschema as js

    shipped = (Path(fileformat.__file__).with_name("facility.schema.json")).read_text()
    assert shipped == jsonschema.text(), ("regenerate: python -m alarm_engine.facility.jsonschema > "
                                          "alarm_engine/facility/facility.schema.json")
    schema = json.loads(shipped)
    doc, _ = source.load(EXAMPLE)
    js.validate(json.loads(json.dumps(doc)), schema)
    bad, _ = source.load(BAD)
    assert list(js.Draft202012Validator(schema).iter_errors(json.loads(json.dumps(bad))))


def test_check_command(capsys):
    assert cli.main(["check", EXAMPLE]) == 0
    assert capsys.readouterr().out == "ok: 5 monitored-pvs, 5 alarms; 3 locations\n"
    assert cli.main(["check", BAD]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 16 and err[-1] == "15 problems: nothing was written"


def test_progress_without_a_terminal_prints_plain_lines():
    out = io.StringIO()
    p = apply.Progress("writing", out, min_total=10)
    for i in range(0, 101):
        p(i, 100)
    lines = out.getvalue().splitlines()
    assert lines[0] == "writing: 0/100 (0%)" and lines[-1] == "writing: 100/100 (100%)"
    assert len(lines) == 11 and "\r" not in out.getvalue()


def test_records_carry_user_and_host_where_the_schema_has_them():
    assert apply.with_meta({"a": 1}, {"a"}, "op", "h") == {"a": 1}
    assert apply.with_meta({"a": 1}, {"a", "user", "host"}, "op", "h") == {"a": 1, "user": "op", "host": "h"}
    assert apply.with_meta({"a": 1, "user": "given"}, {"a", "user"}, "op", "h") == {"a": 1, "user": "given"}


def test_a_cycle_of_masks_is_refused_once_at_its_first_alarm(tmp_path):
    f = write(tmp_path, "f.yaml", "defaults: {category: C, location: L}\nalarms:\n"
                                  "  B: {pv: 'X:2', maskedBy: C}\n"
                                  "  A: {pv: 'X:1', maskedBy: B}\n"
                                  "  C: {pv: 'X:3', maskedBy: A}\n"
                                  "  D: {pv: 'X:4', maskedBy: A}\n")
    _, problems = load(f)
    assert [(p.line, p.field, p.reason) for p in problems] == [
        (4, "alarms[A].maskedBy", "maskedBy cycle: A → B → C → A")]


def test_locations_are_applied_exported_and_read_back():
    state = {"alarm-locations": {"Site": {"parent": None, "description": ""},
                                 "Hall": {"parent": "Site", "description": "the experimental hall"}},
             "monitored-pvs": {"P": {"mask": ["VALUE", "ALARM"], "topic": None}},
             "alarms": {"A": {"producer": {"pv": "P"}, "location": "Hall", "category": "C", "docUrl": "",
                              "edmPath": "", "priority": "P3_PRODUCTIVITY", "description": "", **MGMT}}}
    doc, notes = export.document(state, fileformat.schemas(), S)
    assert notes == [] and doc["locations"]["Hall"]["parent"] == "Site"
    desired, problems = fileformat.build([(doc, "x")], S)
    assert problems == [] and desired.records == state
    order = diff.plan({}, desired.records, prune=False).ordered()
    assert [t for t, _, _ in order][:2] == ["alarm-locations", "alarm-locations"]
