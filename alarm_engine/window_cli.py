"""CLI commands of the operator's window: web, web-user, history, kpi.

Registered into the main parser by alarm_engine/cli.py (`add_commands`, `HANDLERS`).
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import sys
import time


def add_commands(sub) -> None:
    sp = sub.add_parser("web", help="Serve the operator's web page and the JSON API (/api/v1).",
                        description="Serve the live alarm page and the JSON API. Reads the topics as a plain "
                                    "consumer; writes (shelve, unshelve) need a login.")
    sp.add_argument("--listen", default=os.environ.get("ALARM_ENGINE_WEB_LISTEN", "127.0.0.1:8088"),
                    help="HOST:PORT to listen on (env ALARM_ENGINE_WEB_LISTEN, default 127.0.0.1:8088)")
    sp.add_argument("--users", help="users file for HTTP basic (env ALARM_ENGINE_WEB_USERS); see web-user")
    sp.add_argument("--anonymous-read", action="store_true",
                    help="let anyone read without a login (env ALARM_ENGINE_WEB_ANONYMOUS_READ=1)")

    sp = sub.add_parser("web-user", help="Add a user to (or change a password in) a web users file.")
    sp.add_argument("file", help="the users file (created with mode 0600)")
    sp.add_argument("name", help="user name")
    sp.add_argument("--password-stdin", action="store_true", help="read the password from standard input")

    sp = sub.add_parser("history", help="Print alarm-history: what alarms showed and what operators did.",
                        description="Print alarm-history entries, oldest first (copies written by a replay "
                                    "are skipped).")
    sp.add_argument("name", nargs="?", help="only this alarm")
    sp.add_argument("--since", default="2h", help="how far back: 90s, 15m, 2h, 7d (default 2h)")
    sp.add_argument("--location", help="only this location (and the locations under it)")
    sp.add_argument("--json", action="store_true", help="one JSON object a line")

    sp = sub.add_parser("kpi", help="Alarm-management KPIs (ISA-18.2) from alarm-history.",
                        description="KPIs per location and overall over a past period, from alarm-history.")
    sp.add_argument("--since", default="24h", help="the period's start, back from now or --until (default 24h)")
    sp.add_argument("--until", help="the period's end: ISO 8601 or epoch ms (default now)")
    sp.add_argument("--flood-threshold", type=int, default=int(os.environ.get("ALARM_ENGINE_FLOOD_THRESHOLD", 10)),
                    help="more than this many activations per 10 minutes is a flood (default 10)")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.add_argument("--html", metavar="FILE", help="also write an HTML report with plots")


async def cmd_web(args, settings) -> int:
    from alarm_engine.cli import CLIError
    from alarm_engine.web.server import serve

    if args.users:
        os.environ["ALARM_ENGINE_WEB_USERS"] = args.users
    if args.anonymous_read:
        os.environ["ALARM_ENGINE_WEB_ANONYMOUS_READ"] = "1"
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        raise CLIError(f"bad --listen {args.listen!r}: use HOST:PORT")
    try:
        await serve(settings, host.strip("[]"), int(port))
    except OSError as e:
        raise CLIError(f"cannot listen on {args.listen}: {e.strerror or e}") from None
    return 0


async def cmd_web_user(args, settings) -> int:
    from alarm_engine.cli import CLIError
    from alarm_engine.web.auth import set_user

    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            raise CLIError("the passwords differ")
    try:
        set_user(args.file, args.name, password)
    except ValueError as e:
        raise CLIError(str(e)) from None
    print(f"web-user: {args.name} set in {args.file}")
    return 0


async def _location_tree(settings) -> dict[str, str | None]:
    """location -> parent, from the compacted alarm-locations topic."""
    from alarm_engine.facility.state import read
    from alarm_engine.registry import make_codec

    state = await read(settings, make_codec(settings), ["alarm-locations"])
    return {k: (v or {}).get("parent") for k, v in state.topics["alarm-locations"].items() if v}


async def cmd_history(args, settings) -> int:
    from alarm_engine import history
    from alarm_engine.cli import format_ms, parse_duration_ms

    since = int(time.time() * 1000) - parse_duration_ms(args.since)
    parents = await _location_tree(settings) if args.location else None
    entries = history.select(await history.read(settings, since), name=args.name, location=args.location,
                             since_ms=since, parents=parents)
    for e in entries:
        if args.json:
            print(json.dumps(e, sort_keys=True))
        else:
            print(f"{format_ms(e['time'])}  {e['alarm']}  {e['location'] or '-'}  {history.describe(e)}")
    if not args.json:
        print(f"({len(entries)} entr{'y' if len(entries) == 1 else 'ies'} since {format_ms(since)})")
    return 0


async def cmd_kpi(args, settings) -> int:
    from alarm_engine import history, kpi
    from alarm_engine.cli import CLIError, parse_duration_ms, parse_time_ms

    end = parse_time_ms(args.until) if args.until else int(time.time() * 1000)
    start = end - parse_duration_ms(args.since)
    if args.flood_threshold < 1:
        raise CLIError("--flood-threshold must be at least 1")
    cfg = kpi.KpiConfig(flood_threshold=args.flood_threshold)
    # Entries from a day before the period tell what was standing at its start.
    entries = await history.read(settings, max(0, start - 86_400_000))
    result = kpi.compute(entries, start, end, cfg, await _location_tree(settings))
    if args.json:
        print(json.dumps(result, indent=1, sort_keys=True))
    else:
        sys.stdout.write(kpi.format_text(result))
    if args.html:
        kpi.write_html(result, args.html)
        print(f"kpi: report written to {args.html}", file=sys.stderr)
    return 0


HANDLERS = {"web": cmd_web, "web-user": cmd_web_user, "history": cmd_history, "kpi": cmd_kpi}
