"""alarm-engine: the operator command line.

One subcommand per script of the original tool set (set-/list- for each
topic, --unset for tombstones, dump-schemas), plus topic set-up, dead
letters and the worker. Errors print one line and exit non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import os
import re
import sys
import time
from datetime import datetime, timezone

from alarm_engine.config import VALUE_SCHEMAS, Settings

EXIT_USAGE = 2
EXIT_FAILED = 1


class CLIError(Exception):
    """A failure to report in one line."""


# --- argument parsing helpers ----------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}


def parse_duration_ms(text: str) -> int:
    """'90s', '15m', '1h30m', '2d' → milliseconds."""
    compact = text.replace(" ", "").lower()
    parts = _DURATION.findall(compact)
    if not parts or "".join(n + u for n, u in parts) != compact:
        raise CLIError(f"bad duration {text!r}: use e.g. 90s, 15m, 1h30m, 2d")
    total = sum(float(n) * _UNIT_MS[u] for n, u in parts)
    if total <= 0 or total > 366 * _UNIT_MS["d"]:
        raise CLIError(f"bad duration {text!r}: must be more than 0 and at most a year")
    return int(total)


def parse_time_ms(text: str) -> int:
    """An ISO 8601 time (local time when no zone is given) or epoch milliseconds."""
    if text.isdigit():
        return int(text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise CLIError(f"bad time {text!r}: use ISO 8601 (2026-11-28T06:00, 2026-11-28T06:00Z) or epoch ms") from None
    if when.tzinfo is None:
        when = when.astimezone()
    return int(when.timestamp() * 1000)


def login_user() -> str | None:
    """Who runs the command: $USER, $LOGNAME or the account name (getpass)."""
    import getpass

    try:
        return os.environ.get("USER") or getpass.getuser()
    except Exception:  # no name for this uid (a bare container)
        return None


def format_ms(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).astimezone().strftime("%Y-%m-%d %H:%M:%S")


# --- building records -------------------------------------------------------

def monitored_record(args) -> dict:
    mask = [m.strip().upper() for m in args.mask.split(",") if m.strip()]
    return {"mask": mask, "topic": None}


def alarm_record(args) -> dict:
    given = [x for x in (args.pv, args.rule, args.external) if x]
    if len(given) != 1:
        raise CLIError("give exactly one of --pv PV, --rule EXPRESSION or --external")
    if args.pv:
        producer = {"pv": args.pv}
    elif args.rule:
        producer = {"expression": args.rule, "severity": args.rule_severity}
    else:
        producer = {"source": args.source}
    missing = [f"--{n}" for n in ("location", "category") if not getattr(args, n)]
    if missing:
        raise CLIError(f"missing required option {', '.join(missing)}")
    return {
        "producer": producer, "location": args.location, "category": args.category,
        "docUrl": args.doc_url, "edmPath": args.edm_path, "priority": args.priority,
        "description": args.description,
        **alarm_management(args),
    }


def _display(text: str) -> dict:
    title, sep, url = text.partition("=")
    if not sep or not title.strip() or not url.strip():
        raise CLIError(f"bad --display {text!r}: use TITLE=URL")
    return {"title": title.strip(), "url": url.strip()}


def alarm_management(args) -> dict:
    """The alarm-management fields of set-alarm (latching, delays, filter, mask, guidance)."""
    guidance = None
    if args.rationale or args.consequence or args.corrective_action or args.response_time:
        guidance = {"rationale": args.rationale, "consequence": args.consequence,
                    "correctiveAction": args.corrective_action,
                    "responseTimeSeconds": parse_duration_ms(args.response_time) // 1000 if args.response_time else 0}
    return {
        "latching": args.latching,
        "delaySeconds": parse_duration_ms(args.delay) / 1000 if args.delay else 0.0,
        "count": args.count,
        "offDelaySeconds": parse_duration_ms(args.off_delay) / 1000 if args.off_delay else 0.0,
        "filter": args.filter, "maskedBy": args.masked_by, "guidance": guidance,
        "displays": [_display(d) for d in args.display],
    }


def shelved_record(args, now_ms: int) -> dict:
    if not args.user:
        raise CLIError("missing required option --user")
    if args.duration and args.expiration:
        raise CLIError("give --duration or --expiration, not both")
    expiration = None
    if args.duration:
        expiration = now_ms + parse_duration_ms(args.duration)
    elif args.expiration:
        expiration = parse_time_ms(args.expiration)
        if expiration <= now_ms:
            raise CLIError(f"expiration {format_ms(expiration)} is in the past")
    import socket

    return {"user": args.user, "reason": args.reason, "comment": args.comment,
            "expiration": expiration, "oneshot": args.oneshot, "duration": None,
            "host": socket.gethostname()}


def activation_record(args) -> dict:
    return {"priority": args.priority, "note": args.note}


SETTERS = {
    "set-monitored": ("monitored-pvs", "PV name", lambda a, now: monitored_record(a)),
    "set-alarm": ("alarms", "alarm name", lambda a, now: alarm_record(a)),
    "set-shelved": ("shelved-alarms", "alarm name", shelved_record),
    "set-active": ("alarm-activations", "alarm name", lambda a, now: activation_record(a)),
}

LISTERS = {
    "list-monitored": "monitored-pvs",
    "list-alarms": "alarms",
    "list-shelved": "shelved-alarms",
    "list-activations": "alarm-activations",
    "list-active": "active-alarms",
    "list-pv-state": "pv-state",
    "list-dead-letters": "dead-letters",
    "list-acks": "alarm-acks",
    "list-disabled": "disabled-alarms",
    "list-locations": "alarm-locations",
    "list-summaries": "alarm-summaries",
}


# --- showing records --------------------------------------------------------

def _producer_text(p: dict) -> str:
    if "pv" in p:
        return f"pv {p['pv']}"
    if "expression" in p:
        return f"rule [{p['severity']}] {p['expression']}"
    if "jar" in p:
        return f"jar {p['jar']} (unsupported)"
    return f"external {p.get('source', '')}".strip()


def _row(topic: str, key: str, v: dict, now_ms: int) -> list[str]:
    if topic == "monitored-pvs":
        return [key, ",".join(v["mask"]) or "VALUE,ALARM"]
    if topic == "alarms":
        return [key, v["priority"], v["location"], v["category"], _producer_text(v["producer"])]
    if topic == "shelved-alarms":
        exp = v["expiration"]
        if exp is None and isinstance(v.get("duration"), dict) and "expiration" in v["duration"]:
            exp = v["duration"]["expiration"]
        if exp is not None and exp <= now_ms:
            until = f"expired {format_ms(exp)}"
        else:
            until = format_ms(exp) if exp else "-"
        return [key, v["user"], "oneshot" if v["oneshot"] else "", until, v["reason"], v["comment"]]
    if topic == "alarm-activations":
        return [key, v["priority"] or "-", v["note"]]
    if topic == "active-alarms":
        shelf = v.get("shelving") or {}
        extra = f"{shelf.get('kind', '')} by {shelf.get('user', '')}" if shelf else ""
        ack = v.get("ackState") or ""
        if v.get("disabled"):
            extra = f"disabled by {v['disabled']['user']}"
        elif v.get("ack") and ack == "ACK":
            extra = (extra + "; " if extra else "") + f"acked by {v['ack']['user']}"
        return [key, v["state"], ack, v["severity"], v["priority"], v["cause"], format_ms(v["since"]),
                v["message"], extra]
    if topic == "pv-state":
        return [key, v["connection"], str(v["value"]), v["severity"], v["status"], format_ms(v["iocTimestamp"])]
    if topic == "dead-letters":
        return [key, f"{v['sourceTopic']}[{v['partition']}]@{v['offset']}", v["reason"]]
    if topic == "alarm-acks":
        return [key, "unack" if v["unack"] else "ack", v["user"], v["host"], format_ms(v["time"]), v["comment"]]
    if topic == "disabled-alarms":
        return [key, v["user"], v["host"], format_ms(v["until"]) if v["until"] else "-", v["reason"], v["comment"]]
    if topic == "alarm-locations":
        return [key, v["parent"] or "-", v["description"]]
    if topic == "alarm-summaries":
        states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(v["states"].items()) if n)
        return [key, v["level"], str(v["alarms"]), str(v["unacknowledged"]), str(v["defined"]), states]
    return [key, json.dumps(v)]


HEADERS = {
    "monitored-pvs": ["PV", "MASK"],
    "alarms": ["ALARM", "PRIORITY", "LOCATION", "CATEGORY", "PRODUCER"],
    "shelved-alarms": ["ALARM", "USER", "ONESHOT", "UNTIL", "REASON", "COMMENT"],
    "alarm-activations": ["ALARM", "PRIORITY", "NOTE"],
    "active-alarms": ["ALARM", "STATE", "ACK", "SEVERITY", "PRIORITY", "CAUSE", "SINCE", "MESSAGE", "BY"],
    "pv-state": ["PV", "CONNECTION", "VALUE", "SEVERITY", "STATUS", "IOC TIME"],
    "dead-letters": ["KEY", "FROM", "REASON"],
    "alarm-acks": ["ALARM", "ACTION", "USER", "HOST", "TIME", "COMMENT"],
    "disabled-alarms": ["ALARM", "USER", "HOST", "UNTIL", "REASON", "COMMENT"],
    "alarm-locations": ["LOCATION", "PARENT", "DESCRIPTION"],
    "alarm-summaries": ["LOCATION", "LEVEL", "SHOWN", "UNACK", "DEFINED", "STATES"],
}


def print_table(headers: list[str], rows: list[list[str]], out=None) -> None:
    out = out or sys.stdout
    widths = [max([len(h)] + [len(str(r[i])) for r in rows]) for i, h in enumerate(headers)]
    for line in [headers] + rows:
        out.write("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() + "\n")


def _jsonable(v):
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    return v


# --- commands ---------------------------------------------------------------

def _codec(settings):
    from alarm_engine.registry import make_codec

    return make_codec(settings)


async def cmd_set(args, settings: Settings) -> int:
    from alarm_engine import records
    from alarm_engine.kafka_io import produce

    topic, _, build = SETTERS[args.command]
    now_ms = int(time.time() * 1000)
    value = None
    if not args.unset:
        datum = build(args, now_ms)
        records.validate(topic, args.name, datum, settings)
        codec = _codec(settings)
        if topic == "alarms" and datum.get("maskedBy"):
            await _refuse_mask_cycle(settings, codec, args.name, datum["maskedBy"])
        value = codec.encode(topic, datum)
    await produce(settings, settings.topic(topic), [(args.name.encode(), value)], headers=_who(args))
    what = "tombstone" if value is None else "record"
    print(f"{args.command}: wrote {what} for {args.name!r} to {settings.topic(topic)}")
    return 0


async def cmd_list(args, settings: Settings) -> int:
    from alarm_engine.codec import BadRecord, decode_key
    from alarm_engine.kafka_io import replay

    topic = LISTERS[args.command]
    codec = _codec(settings)
    state: dict[str, dict] = {}
    bad = 0

    def show_change(key, value):
        if args.json:
            print(json.dumps({"key": key, "value": _jsonable(value)}), flush=True)
        elif value is None:
            print(f"{key}: removed", flush=True)
        else:
            print("  ".join(_row(topic, key, value, int(time.time() * 1000))), flush=True)

    def decode_dead_letter_key(raw):
        return raw.decode("utf-8", errors="replace") if raw else ""

    caught_up = False
    partitions_of: dict[str, set[int]] = collections.defaultdict(set)  # keys written with another partitioner
    async for rec in replay(settings, settings.topic(topic), follow=args.follow):
        if rec is None:
            # The replay reached the end offsets: the state is complete.
            caught_up = True
            _warn_split_keys(topic, partitions_of, settings)
            _print_state(args, topic, state)
            continue
        if rec.key is not None:
            partitions_of[rec.key.decode("utf-8", "replace")].add(rec.partition)
        try:
            key = decode_dead_letter_key(rec.key) if topic == "dead-letters" else decode_key(rec.key)
            value = codec.decode(topic, rec.value)
        except BadRecord as e:
            bad += 1
            print(f"warning: {rec.topic}[{rec.partition}]@{rec.offset}: skipped: {e}", file=sys.stderr)
            continue
        if value is None:
            state.pop(key, None)
        else:
            state[key] = value
        if caught_up:
            show_change(key, value)
    if bad:
        print(f"warning: {bad} record(s) could not be read (see above)", file=sys.stderr)
    return 0


async def _refuse_mask_cycle(settings: Settings, codec, name: str, parent: str) -> None:
    from alarm_engine.facility.state import read
    from alarm_engine.masking import mask_cycle

    alarms = (await read(settings, codec, ["alarms"])).topics["alarms"]
    parents = {k: (v or {}).get("maskedBy") for k, v in alarms.items() if k != name}
    cycle = mask_cycle(parents, name, parent)
    if cycle:
        raise CLIError(f"refused: maskedBy would form a cycle: {' -> '.join(cycle)}")


def _warn_split_keys(topic: str, partitions_of: dict, settings: Settings) -> None:
    from alarm_engine.partitioning import CHECKED_TOPICS, split_key_warning, split_keys

    if topic in CHECKED_TOPICS:
        for key, found in sorted(split_keys(partitions_of).items()):
            print(split_key_warning(settings.topic(topic), key, found, settings.partitions), file=sys.stderr)


def _print_state(args, topic: str, state: dict) -> None:
    if args.json:
        print(json.dumps({k: _jsonable(state[k]) for k in sorted(state)}, indent=2), flush=True)
        return
    now_ms = int(time.time() * 1000)
    rows = [_row(topic, k, state[k], now_ms) for k in sorted(state)]
    print_table(HEADERS[topic], rows)
    print(f"({len(rows)} {'entry' if len(rows) == 1 else 'entries'})", flush=True)


async def cmd_dump_schemas(args, settings: Settings) -> int:
    from alarm_engine.codec import load_schema

    names = [args.topic] if args.topic else list(VALUE_SCHEMAS)
    for topic in names:
        if topic not in VALUE_SCHEMAS:
            raise CLIError(f"unknown topic {topic!r}; one of {', '.join(VALUE_SCHEMAS)}")
        subject = f"{settings.topic(topic)}-value"
        if args.local:
            schema, source = load_schema(VALUE_SCHEMAS[topic]), "schemas/"
        else:
            from alarm_engine.registry import client

            found = client(settings).get_schema(subject)
            if not found:
                raise CLIError(f"subject {subject} is not registered (run: alarm-engine register-schemas)")
            schema, source = found.schema.raw_schema, f"registry id {found.schema_id} version {found.version}"
            if isinstance(schema, str):
                schema = json.loads(schema)
        print(f"# {subject} ({source})")
        print(json.dumps(schema, indent=2))
    return 0


async def cmd_register(args, settings: Settings) -> int:
    from alarm_engine.registry import register_all

    ids = register_all(settings)
    for topic, sid in ids.items():
        print(f"{settings.topic(topic)}-value: id {sid}")
    return 0


async def cmd_topics(args, settings: Settings) -> int:
    from alarm_engine.topics import describe, ensure_topics

    if args.action == "create":
        extra = None
        if args.fast_compaction:
            from alarm_engine.stack import FAST_COMPACTION

            extra = FAST_COMPACTION
        created = await ensure_topics(settings, extra_config=extra)
        from alarm_engine.history import ensure_topic as ensure_history

        if await ensure_history(settings):  # append-only: its own cleanup policy
            created.append(settings.topic("alarm-history"))
        print(f"created {len(created)} topic(s){': ' + ', '.join(created) if created else ''}; "
              f"{settings.partitions} partition(s) for new ones")
    else:
        for name, info in sorted((await describe(settings)).items()):
            state = "missing" if info["error"] else f"{info['partitions']} partition(s)"
            print(f"{name}: {state}")
    return 0


def cmd_worker(args, settings: Settings) -> int:
    """The worker under a supervisor (alarm_engine/supervise.py) that restarts it with
    exponential backoff whenever it exits non-zero (e.g. Kafka unreachable at start-up).
    ALARM_ENGINE_SUPERVISE=0 runs it in this process, unsupervised, as before."""
    argv = ["faust", "-A", "alarm_engine", "worker", "-l", args.loglevel]
    # Settings given as options reach the worker through its environment.
    os.environ.update({"BOOTSTRAP_SERVERS": settings.bootstrap, "SCHEMA_REGISTRY": settings.registry_url,
                       "ALARM_ENGINE_TOPIC_PREFIX": settings.topic_prefix})
    if os.environ.get("ALARM_ENGINE_SUPERVISE", "1").strip().lower() in ("0", "no", "false", "off"):
        from faust.cli.faust import cli as faust_cli

        sys.argv = argv
        return faust_cli()
    from alarm_engine.supervise import supervise

    return supervise([sys.executable, "-m", *argv])


# --- parser -----------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alarm-engine",
        description="Operator tools for the alarm engine. Broker and registry come from "
                    "--bootstrap-servers/--registry or BOOTSTRAP_SERVERS/SCHEMA_REGISTRY.",
    )
    p.add_argument("--bootstrap-servers", help="Kafka bootstrap servers (env BOOTSTRAP_SERVERS, default 127.0.0.1:9092)")
    p.add_argument("--registry", help="schema registry URL, Confluent API (env SCHEMA_REGISTRY, "
                                      "default http://127.0.0.1:8081/apis/ccompat/v7)")
    p.add_argument("--topic-prefix", help="prefix of every topic name (env ALARM_ENGINE_TOPIC_PREFIX)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def setter(name, help_text, key_help):
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.add_argument("name", help=key_help)
        sp.add_argument("--unset", action="store_true", help="remove the record (write a tombstone)")
        return sp

    sp = setter("set-monitored", "Monitor a PV (or stop with --unset).", "EPICS CA PV name")
    sp.add_argument("--mask", default="VALUE,ALARM",
                    help="CA monitor mask, comma-separated of VALUE, ALARM, LOG, ATTRIBUTE (default VALUE,ALARM)")

    sp = setter("set-alarm", "Define an alarm (or remove it with --unset).", "alarm name")
    sp.add_argument("--pv", help="the alarm is this PV's EPICS alarm severity")
    sp.add_argument("--rule", help="the alarm is active while this expression holds, e.g. '`T:1` > 80'")
    sp.add_argument("--rule-severity", default="MAJOR", choices=["MINOR", "MAJOR", "INVALID"],
                    help="severity shown while the rule holds (default MAJOR)")
    sp.add_argument("--external", action="store_true", help="the alarm is activated by set-active")
    sp.add_argument("--source", default="", help="with --external: who activates it")
    sp.add_argument("--location", help="where the alarm is (checked against ALARM_ENGINE_LOCATIONS if set)")
    sp.add_argument("--category", help="kind of equipment (checked against ALARM_ENGINE_CATEGORIES if set)")
    sp.add_argument("--priority", default="P3_PRODUCTIVITY",
                    choices=["P1_LIFE", "P2_PROPERTY", "P3_PRODUCTIVITY", "P4_DIAGNOSTIC"])
    sp.add_argument("--doc-url", default="", help="documentation URL")
    sp.add_argument("--edm-path", default="", help="operator screen path")
    sp.add_argument("--description", default="", help="what is wrong and what to do")
    sp.add_argument("--latching", action=argparse.BooleanOptionalAction, default=None,
                    help="shown until acknowledged, at the highest severity since the last ack "
                         "(default: ALARM_ENGINE_LATCHING)")
    sp.add_argument("--delay", help="on-delay: shown only once the cause held this long (e.g. 10s)")
    sp.add_argument("--count", type=int, default=0,
                    help="with --delay: this many activations within the delay show it at once")
    sp.add_argument("--off-delay", help="stays shown this long after the cause cleared (e.g. 30s)")
    sp.add_argument("--filter", help="enabling filter in the rule language; SUPPRESSED while false")
    sp.add_argument("--masked-by", help="parent alarm: MASKED while the parent is shown active")
    sp.add_argument("--rationale", default="", help="guidance: why the alarm exists")
    sp.add_argument("--consequence", default="", help="guidance: what happens without action")
    sp.add_argument("--corrective-action", default="", help="guidance: what to do")
    sp.add_argument("--response-time", help="guidance: how soon to act (e.g. 5m)")
    sp.add_argument("--display", action="append", default=[], metavar="TITLE=URL",
                    help="a related display or page (repeatable)")

    sp = setter("set-shelved", "Shelve an alarm (or unshelve with --unset).", "alarm name")
    sp.add_argument("--user", default=login_user(), help="who shelves (default: the login name)")
    sp.add_argument("--reason", default="", help="why: one of ALARM_ENGINE_SHELVE_REASONS (default Stale, "
                    "Chattering, Fleeting, Maintenance, Nuisance, Other)")
    sp.add_argument("--comment", default="", help="free text")
    sp.add_argument("--duration", help="shelve for this long: 90s, 15m, 1h30m, 2d")
    sp.add_argument("--expiration", help="shelve until this time: ISO 8601 or epoch ms")
    sp.add_argument("--oneshot", action="store_true", help="end the shelving when the alarm returns to normal")

    sp = setter("set-active", "Activate an external alarm (or clear it with --unset).", "alarm name")
    sp.add_argument("--priority", choices=["P1_LIFE", "P2_PROPERTY", "P3_PRODUCTIVITY", "P4_DIAGNOSTIC"],
                    help="priority to show (default: the alarm definition's)")
    sp.add_argument("--note", default="", help="message shown with the alarm")

    list_help = {
        "list-monitored": "Show the monitored PVs.",
        "list-alarms": "Show the alarm definitions.",
        "list-shelved": "Show the shelved alarms.",
        "list-activations": "Show the external activations (set-active).",
        "list-active": "Show the active alarms, as the engine computed them.",
        "list-pv-state": "Show the latest state of each monitored PV.",
        "list-dead-letters": "Show records the engine rejected, with the reason.",
        "list-acks": "Show the latest acknowledgement (or unack) of each alarm.",
        "list-disabled": "Show the disabled (out of service) alarms.",
        "list-locations": "Show the tree of locations (alarm-locations).",
        "list-summaries": "Show each location's summary: the highest level at or below it, counts.",
    }
    for name, text in list_help.items():
        sp = sub.add_parser(name, help=text, description=text + " Replays the compacted topic from the "
                            "beginning to its end and prints the final state.")
        sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
        sp.add_argument("--follow", "-f", action="store_true", help="then keep printing changes")

    sp = sub.add_parser("dump-schemas", help="Print the Avro value schemas.",
                        description="Print the Avro value schemas as registered (they are self-documenting).")
    sp.add_argument("topic", nargs="?", help=f"one of {', '.join(VALUE_SCHEMAS)} (default all)")
    sp.add_argument("--local", action="store_true", help="print the files in schemas/ instead of the registry's")

    sub.add_parser("register-schemas", help="Register every value schema in the registry.")

    sp = sub.add_parser("topics", help="Create (idempotently) or describe the topics.")
    sp.add_argument("action", choices=["create", "describe"])
    sp.add_argument("--partitions", type=int, help="partitions of new topics (env ALARM_ENGINE_PARTITIONS)")
    sp.add_argument("--fast-compaction", action="store_true",
                    help="tiny segments so compaction runs within seconds (tests, demos)")

    sp = sub.add_parser("status", help="Show the workers from their heartbeats; exit 1 if none is alive "
                        "or a partition has no live owner.")
    sp.add_argument("--json", action="store_true", help="print JSON instead of a table")

    sp = sub.add_parser("worker", help="Run an engine worker (same as: faust -A alarm_engine worker).")
    sp.add_argument("--loglevel", "-l", default="info")

    from alarm_engine.facility.commands import add_parsers as add_facility_parsers

    add_facility_parsers(sub)  # apply, check, export, import-phoebus, import-jaws, facility-schema

    from alarm_engine.window_cli import add_commands  # web, web-user, history, kpi

    add_commands(sub)

    from alarm_engine.management_cli import add_commands as add_management_commands

    add_management_commands(sub)  # ack, unack, disable, enable, set-location
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = Settings.from_env(
        bootstrap=args.bootstrap_servers, registry_url=args.registry, topic_prefix=args.topic_prefix,
        partitions=getattr(args, "partitions", None),
    )
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # aiokafka logs why a connection failed (refused, SASL, TLS) and then raises a bare
    # "unable to bootstrap": keep its log out of the console and put the cause into the
    # one-line error instead.
    kafka_log = logging.getLogger("aiokafka")
    kafka_log.setLevel(logging.ERROR)
    kafka_log.propagate = False
    kafka_log.handlers[:] = [_kafka_errors]
    _kafka_errors.messages.clear()
    if args.command == "worker":
        return cmd_worker(args, settings)
    from alarm_engine.status import cmd_status

    handler = {
        "status": cmd_status,
        **{k: cmd_set for k in SETTERS}, **{k: cmd_list for k in LISTERS},
        "dump-schemas": cmd_dump_schemas, "register-schemas": cmd_register, "topics": cmd_topics,
        **_facility_handlers(),
        **_window_handlers(),
        **_management_handlers(),
    }[args.command]
    try:
        return asyncio.run(handler(args, settings))
    except KeyboardInterrupt:
        return 130
    except CLIError as e:
        print(f"alarm-engine {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # one line, never a traceback, for an operator at the console
        print(f"alarm-engine {args.command}: {describe_error(e, settings)}", file=sys.stderr)
        if os.environ.get("ALARM_ENGINE_DEBUG"):
            raise
        return EXIT_FAILED


def _facility_handlers() -> dict:
    from alarm_engine.facility.commands import HANDLERS

    return HANDLERS


def _management_handlers() -> dict:
    from alarm_engine.management_cli import HANDLERS

    return HANDLERS


def _window_handlers() -> dict:
    from alarm_engine.window_cli import HANDLERS

    return HANDLERS


def _who(args) -> list[tuple[str, bytes]]:
    """Kafka headers naming who wrote an operator record and from where (for alarm-history)."""
    import socket

    user = getattr(args, "user", None) or login_user() or ""
    return [("user", user.encode()), ("host", socket.gethostname().encode()), ("client", b"alarm-engine cli")]


class _KafkaErrors(logging.Handler):
    """Keeps the error lines aiokafka logs, so a failure can say its cause."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages: collections.deque[str] = collections.deque(maxlen=20)  # a --follow may run for days

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


_kafka_errors = _KafkaErrors()
_REFUSED = ("SaslAuthenticationFailed", "Authentication failed", "SSL", "certificate")


def describe_error(e: Exception, settings: Settings) -> str:
    from aiokafka.errors import KafkaConnectionError, KafkaError

    from alarm_engine.codec import BadRecord, RegistryUnavailable
    from alarm_engine.registry import RegistryError

    if isinstance(e, BadRecord):
        return f"invalid record: {e}"
    if isinstance(e, KafkaConnectionError):
        refused = [m for m in _kafka_errors.messages if any(word in m for word in _REFUSED)]
        if refused:  # the broker answered: the credentials or certificates are wrong
            cause = refused[-1].split(": ", 1)[-1]
            return f"Kafka at {settings.bootstrap} refused the connection: {cause}"
        return f"cannot reach Kafka at {settings.bootstrap}: {e}"
    if isinstance(e, KafkaError):
        return f"Kafka error ({settings.bootstrap}): {e.__class__.__name__}: {e}"
    if isinstance(e, RegistryError):
        return str(e)  # says which registry already
    if isinstance(e, RegistryUnavailable):
        return f"cannot read the records: {e} at {settings.registry_url_redacted()}"
    if isinstance(e, LookupError):
        return str(e.args[0]) if e.args else str(e)
    name = e.__class__.__name__
    if "ConnectError" in name or "ConnectTimeout" in name or "ClientError" in name or "Registry" in name:
        return f"schema registry at {settings.registry_url_redacted()}: {e}"
    return f"{name}: {e}"


if __name__ == "__main__":
    sys.exit(main())
