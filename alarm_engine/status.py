"""`alarm-engine status`: the fleet as its heartbeats show it (engine-status topic).

A worker is alive when its last heartbeat is at most 3 of its intervals old. The
command exits 1 when no worker is alive or a partition is owned by no live worker,
so that it can serve as a check in scripts and monitoring. `fleet()` is the pure
part: heartbeats and the time in, the verdict out.
"""

from __future__ import annotations

import json
import sys
import time

STALE_INTERVALS = 3


def fleet(heartbeats: dict[str, dict], now_ms: int, partitions: int | None = None) -> dict:
    """Which workers are alive, which partitions no live worker owns."""
    workers = []
    owned: set[int] = set()
    total = partitions
    for key in sorted(heartbeats):
        hb = heartbeats[key]
        interval_ms = float(hb.get("intervalSeconds") or 3) * 1000
        age_ms = now_ms - int(hb.get("time") or 0)
        alive = age_ms <= STALE_INTERVALS * interval_ms
        if alive:
            owned.update(hb.get("partitions") or [])
        if total is None and hb.get("partitionsTotal"):
            total = int(hb["partitionsTotal"])
        workers.append({**hb, "worker": key, "alive": alive, "ageSeconds": round(age_ms / 1000, 1)})
    unowned = sorted(set(range(total or 0)) - owned)
    alive = [w for w in workers if w["alive"]]
    problems = []
    if not alive:
        problems.append("no worker alive" if workers else "no worker has ever sent a heartbeat")
    if unowned and alive:
        problems.append(f"partition(s) {', '.join(map(str, unowned))} owned by no live worker")
    return {"workers": workers, "alive": len(alive), "partitions": total, "unowned": unowned,
            "ok": not problems, "problems": problems}


HEADERS = ["WORKER", "STATE", "AGE", "PARTITIONS", "LAG", "PVS (conn/disc/never)", "HANDLED", "LAST RECORD",
           "VERSION", "HOST/PID"]


def rows(report: dict, format_ms) -> list[list[str]]:
    out = []
    for w in report["workers"]:
        pvs = w.get("pvs") or {}
        out.append([
            w["worker"], "alive" if w["alive"] else "DOWN", f"{w['ageSeconds']:.0f}s",
            ",".join(map(str, w.get("partitions") or [])) or "-",
            str(w.get("inputLagTotal", "-")),
            f"{pvs.get('subscribed', 0)} ({pvs.get('connected', 0)}/{pvs.get('disconnected', 0)}/"
            f"{pvs.get('never_connected', 0)})",
            str(w.get("recordsHandled", "-")), format_ms(w.get("lastRecordTime")),
            str(w.get("version", "-")), f"{w.get('host', '?')}/{w.get('pid', '?')}",
        ])
    return out


async def read_heartbeats(settings) -> dict[str, dict]:
    from alarm_engine.kafka_io import replay
    from alarm_engine.config import STATUS_TOPIC

    beats: dict[str, dict] = {}
    try:
        async for rec in replay(settings, settings.topic(STATUS_TOPIC)):
            if rec is None:
                break
            key = (rec.key or b"").decode("utf-8", "replace")
            if rec.value is None:
                beats.pop(key, None)
                continue
            try:
                beats[key] = json.loads(rec.value)
            except ValueError:
                print(f"warning: {rec.topic}[{rec.partition}]@{rec.offset}: not a heartbeat", file=sys.stderr)
    except LookupError:
        return {}  # no worker has created the topic yet
    return beats


async def cmd_status(args, settings) -> int:
    from alarm_engine.cli import format_ms, print_table

    report = fleet(await read_heartbeats(settings), int(time.time() * 1000))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(HEADERS, rows(report, format_ms))
        verdict = "ok" if report["ok"] else "; ".join(report["problems"])
        print(f"({report['alive']} worker(s) alive; {report['partitions'] or '?'} partition(s); {verdict})")
    return 0 if report["ok"] else 1
