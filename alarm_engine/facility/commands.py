"""The facility commands of the CLI: apply, export, check, import-phoebus, import-jaws."""

from __future__ import annotations

import sys
from pathlib import Path

SCHEMA_FILE = Path(__file__).with_name("facility.schema.json")


def add_parsers(sub) -> None:
    sp = sub.add_parser("apply", help="Make the topics hold what facility files say (diff first).",
                        description="Validate the files (every problem as FILE:LINE: field: reason; a file "
                                    "with problems is refused whole), read the current state of the "
                                    "configuration topics, print what would change, then write only that.")
    sp.add_argument("files", nargs="+", metavar="FILE", help="YAML or JSON facility files")
    sp.add_argument("--dry-run", "-n", action="store_true", help="print the diff, write nothing")
    sp.add_argument("--prune", action="store_true",
                    help="also remove (tombstone) what the topics hold and the files do not")
    sp.add_argument("--show", type=int, default=10, metavar="N", help="entries listed per kind and topic (10)")

    sp = sub.add_parser("check", help="Validate facility files (no Kafka needed).")
    sp.add_argument("files", nargs="+", metavar="FILE")

    sp = sub.add_parser("export", help="Print the current configuration as a facility file.",
                        description="The current configuration topics as a file that apply takes back "
                                    "unchanged (yaml, json), or as a Phoebus alarm configuration.")
    sp.add_argument("--format", choices=["yaml", "json", "phoebus-xml"], default="yaml")
    sp.add_argument("--output", "-o", metavar="FILE", help="write here instead of standard output")
    sp.add_argument("--config-name", default="Accelerator", help="phoebus-xml: the <config> name")

    sp = sub.add_parser("import-phoebus", help="Convert a Phoebus alarm configuration (XML) to a facility file.")
    sp.add_argument("file", metavar="CONFIG.xml")
    sp.add_argument("--output", "-o", metavar="FILE", help="write here instead of standard output")

    sp = sub.add_parser("import-jaws", help="Convert JAWS alarm/action/location files to a facility file.")
    sp.add_argument("files", nargs="+", metavar="FILE", help="KEY=VALUE files (Avro JSON values)")
    sp.add_argument("--output", "-o", metavar="FILE", help="write here instead of standard output")

    sub.add_parser("facility-schema", help="Print the JSON Schema of facility files (for editors).")


def _write(text: str, output: str | None) -> None:
    if output:
        with open(output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


async def cmd_apply(args, settings) -> int:
    from alarm_engine.facility import apply

    return await apply.run(args.files, settings, dry_run=args.dry_run, prune=args.prune, show=args.show)


async def cmd_check(args, settings) -> int:
    from alarm_engine.facility import apply, fileformat

    desired, problems = fileformat.load(args.files, settings)
    if problems:
        apply.print_problems(problems, sys.stderr)
        return 1
    for w in desired.warnings:
        print(f"warning: {w}", file=sys.stderr)
    counts = ", ".join(f"{len(v):,} {t}" for t, v in desired.records.items() if t != fileformat.LOCATIONS)
    print(f"ok: {counts}; {len(desired.locations):,} locations")
    return 0


async def cmd_export(args, settings) -> int:
    from alarm_engine.facility import export, fileformat, state
    from alarm_engine.registry import make_codec

    schemas = fileformat.schemas()
    current = await state.read(settings, make_codec(settings), list(schemas))
    for line in current.unreadable:
        print(f"warning: unreadable record {line}", file=sys.stderr)
    if args.format == "phoebus-xml":
        parents = None
        if fileformat.LOCATIONS in current.topics:
            parents = {k: (v or {}).get("parent") for k, v in current.topics[fileformat.LOCATIONS].items()}
        text, notes = export.to_phoebus_xml(current.topics, args.config_name, parents)
    else:
        doc, notes = export.document(current.topics, schemas, settings)
        text = export.to_yaml(doc) if args.format == "yaml" else export.to_json(doc)
    _write(text, args.output)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    return 0


def _finish_import(doc: dict, report, output: str | None, settings, what: str) -> int:
    from alarm_engine.facility import export, fileformat

    desired, problems = fileformat.build([(doc, "(imported)")], settings)
    _write(export.to_yaml(doc), output)
    err = sys.stderr
    counts = ", ".join(f"{len(v):,} {t}" for t, v in desired.records.items() if t != fileformat.LOCATIONS)
    err.write(f"{what}: {counts}; {len(desired.locations):,} locations\n")
    lines = report.lines()
    if lines:
        err.write("what did not map:\n" + "".join(f"  {line}\n" for line in lines))
    if problems:
        for p in problems:
            err.write(f"problem in the converted file: {p}\n")
        return 1
    return 0


async def cmd_import_phoebus(args, settings) -> int:
    from alarm_engine.facility import phoebus

    doc, report = phoebus.import_file(args.file)
    return _finish_import(doc, report, args.output, settings, "import-phoebus")


async def cmd_import_jaws(args, settings) -> int:
    from alarm_engine.facility import jaws

    doc, report = jaws.import_files(args.files)
    return _finish_import(doc, report, args.output, settings, "import-jaws")


async def cmd_schema(args, settings) -> int:
    sys.stdout.write(SCHEMA_FILE.read_text(encoding="utf-8"))
    return 0


HANDLERS = {"apply": cmd_apply, "check": cmd_check, "export": cmd_export, "import-phoebus": cmd_import_phoebus,
            "import-jaws": cmd_import_jaws, "facility-schema": cmd_schema}
