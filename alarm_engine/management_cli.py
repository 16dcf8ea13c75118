"""CLI commands of alarm management: ack, unack, disable, enable, set-location.

Registered into the main parser by alarm_engine/cli.py (`add_commands`, `HANDLERS`). Each
command validates its records with alarm_engine/records.py, the rules the engine applies,
before anything is written; `--location L` and `--all` are resolved against the current
alarms and alarm-locations topics.
"""

from __future__ import annotations

import socket
import time


def add_commands(sub) -> None:
    from alarm_engine.cli import login_user

    def targets(sp, verb):
        sp.add_argument("names", nargs="*", metavar="NAME", help=f"alarms to {verb}")
        sp.add_argument("--location", action="append", default=[],
                        help=f"{verb} every alarm at or below this location (repeatable)")
        sp.add_argument("--all", action="store_true", help=f"{verb} every defined alarm")
        sp.add_argument("--user", default=login_user(), help="who (default: the login name)")
        sp.add_argument("--comment", default="", help="free text")

    sp = sub.add_parser("ack", help="Acknowledge alarms.",
                        description="Acknowledge alarms: ACTIVE UNACK becomes ACK, RTN_UNACK is gone. "
                                    "A later escalation of severity is unacknowledged again.")
    targets(sp, "acknowledge")
    sp = sub.add_parser("unack", help="Withdraw acknowledgements.",
                        description="Withdraw an acknowledgement: an active alarm shows as UNACK again.")
    targets(sp, "unacknowledge")
    sp = sub.add_parser("disable", help="Take alarms out of service (shown as DISABLED).",
                        description="Disable alarms (out of service). Their cause is still tracked, so "
                                    "enabling shows the truth at once.")
    targets(sp, "disable")
    sp.add_argument("--reason", default="", help="why (e.g. 'broken sensor')")
    sp.add_argument("--duration", help="enable again by itself after this long: 90s, 15m, 8h, 2d")
    sp.add_argument("--until", help="enable again by itself at this time: ISO 8601 or epoch ms")
    sp = sub.add_parser("enable", help="Put disabled alarms back in service.")
    targets(sp, "enable")

    sp = sub.add_parser("set-location", help="Define a location of the tree (or remove it with --unset).")
    sp.add_argument("name", help="location name")
    sp.add_argument("--parent", help="the enclosing location (none: top level)")
    sp.add_argument("--description", default="", help="free text")
    sp.add_argument("--unset", action="store_true", help="remove the location (write a tombstone)")


def below(locations: dict[str, str | None], location: str, top: str) -> bool:
    """Whether `location` is `top` or lies under it in the tree (parent links)."""
    seen = set()
    current: str | None = location
    while current is not None and current not in seen:
        if current == top:
            return True
        seen.add(current)
        current = locations.get(current)
    return False


def location_cycle(locations: dict[str, str | None], name: str, parent: str | None) -> list[str] | None:
    from alarm_engine.masking import mask_cycle

    return mask_cycle(locations, name, parent)  # the same chain walk as maskedBy


def resolve(names: list[str], tops: list[str], everything: bool,
            alarms: dict[str, dict | None], locations: dict[str, str | None]) -> list[str]:
    """The alarm names a command applies to: those named (which must be defined), every alarm
    at or below one of `tops`, or all. Pure: the topics' current state is passed in."""
    from alarm_engine.cli import CLIError

    unknown = [n for n in names if n not in alarms]
    if unknown:
        raise CLIError(f"no alarm named {', '.join(repr(n) for n in unknown)} (see list-alarms)")
    chosen = set(names)
    for top in tops:
        found = {n for n, d in alarms.items() if d and below(locations, d.get("location", ""), top)}
        if not found:
            raise CLIError(f"no alarm at or below location {top!r}")
        chosen |= found
    if everything:
        chosen |= set(alarms)
    if not chosen:
        raise CLIError("name alarms, or give --location L or --all")
    return sorted(chosen)


async def _current(settings, codec):
    from alarm_engine.facility.state import read

    state = await read(settings, codec, ["alarms", "alarm-locations"])
    locations = {k: (v or {}).get("parent") for k, v in state.topics["alarm-locations"].items()}
    return state.topics["alarms"], locations


async def cmd_operator(args, settings) -> int:
    """ack, unack, disable, enable: one record (or tombstone) per alarm, all validated first."""
    from alarm_engine import records
    from alarm_engine.cli import CLIError, _codec, _who, format_ms, parse_duration_ms, parse_time_ms
    from alarm_engine.kafka_io import produce

    if not args.user:
        raise CLIError("missing required option --user")
    codec = _codec(settings)
    alarms, locations = await _current(settings, codec)
    names = resolve(args.names, args.location, args.all, alarms, locations)
    now_ms = int(time.time() * 1000)
    host = socket.gethostname()
    if args.command in ("ack", "unack"):
        topic = "alarm-acks"
        datum = {"user": args.user, "host": host, "comment": args.comment, "time": now_ms,
                 "unack": args.command == "unack"}
    elif args.command == "disable":
        topic = "disabled-alarms"
        if args.duration and args.until:
            raise CLIError("give --duration or --until, not both")
        until = now_ms + parse_duration_ms(args.duration) if args.duration else (
            parse_time_ms(args.until) if args.until else None)
        if until is not None and until <= now_ms:
            raise CLIError(f"--until {format_ms(until)} is in the past")
        datum = {"user": args.user, "host": host, "reason": args.reason, "comment": args.comment,
                 "until": until}
    else:  # enable: a tombstone
        topic, datum = "disabled-alarms", None
    value = None
    if datum is not None:
        for name in names:
            records.validate(topic, name, datum, settings, now_ms)
        value = codec.encode(topic, datum)
    await produce(settings, settings.topic(topic), [(n.encode(), value) for n in names], headers=_who(args))
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    print(f"{args.command}: {len(names)} alarm(s): {shown}")
    return 0


async def cmd_set_location(args, settings) -> int:
    from alarm_engine import records
    from alarm_engine.cli import CLIError, _codec, _who
    from alarm_engine.kafka_io import produce

    codec = _codec(settings)
    value = None
    if not args.unset:
        datum = {"parent": args.parent, "description": args.description}
        records.validate("alarm-locations", args.name, datum, settings)
        _, locations = await _current(settings, codec)
        cycle = location_cycle(locations, args.name, args.parent)
        if cycle:
            raise CLIError(f"refused: locations would form a cycle: {' -> '.join(cycle)}")
        value = codec.encode("alarm-locations", datum)
    await produce(settings, settings.topic("alarm-locations"), [(args.name.encode(), value)], headers=_who(args))
    print(f"set-location: wrote {'tombstone' if value is None else 'record'} for {args.name!r} "
          f"to {settings.topic('alarm-locations')}")
    return 0


HANDLERS = {"ack": cmd_operator, "unack": cmd_operator, "disable": cmd_operator, "enable": cmd_operator,
            "set-location": cmd_set_location}
