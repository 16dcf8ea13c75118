"""Alarm-management KPIs (ISA-18.2 / EEMUA 191) from alarm-history entries.

`compute` is pure: entries (alarm_engine.history) and a period in, plain numbers
out; time is what the entries say. Definitions:

- activation: an alarm starts to be shown (a `shown` entry of an alarm not shown
  before, or with a new `since`); one whose `since` lies before the period was
  already standing and does not count.
- alarm rate: activations per bucket (10 minutes); average and peak over the period.
- flood: a bucket with more than `flood_threshold` activations (10 per 10 minutes,
  per operator position: here per location, and overall); time in flood is the
  time those buckets cover.
- locations: with the alarm-locations tree (`parents`, location -> parent), a
  location's figures count its own alarms and those of every location under it,
  as the summaries and `ack --location` do; without it, each location alone.
- chattering: an alarm with `chatter_count` (3) or more activations within
  `chatter_window_ms` (1 minute).
- fleeting: an activation cleared within `fleeting_ms` (1 s).
- stale: an alarm shown continuously for more than `stale_ms` (24 h) within the period.
- priority distribution of the activations against the guide's about 80 % low,
  15 % medium, 5 % high: P1_LIFE is high, P2_PROPERTY medium, P3_PRODUCTIVITY and
  P4_DIAGNOSTIC low.
- shelving: shelve actions, alarms shelved, and time shelved (shelve to unshelve,
  or to the end of the period); time in each shown state (SHELVED and any other
  state the engine shows, such as out-of-service states) from the `shown` entries.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from alarm_engine.history import dedupe
from alarm_engine.summaries import ancestors

PRIORITY_GROUP = {"P1_LIFE": "high", "P2_PROPERTY": "medium", "P3_PRODUCTIVITY": "low", "P4_DIAGNOSTIC": "low"}
TARGET_PCT = {"low": 80.0, "medium": 15.0, "high": 5.0}
# Shown states that mean "taken out of service" rather than "needs attention".
OUT_OF_SERVICE = ("DISABLED", "OUT_OF_SERVICE", "MASKED", "FILTERED")


@dataclass(frozen=True)
class KpiConfig:
    bucket_ms: int = 600_000
    flood_threshold: int = 10
    chatter_count: int = 3
    chatter_window_ms: int = 60_000
    fleeting_ms: int = 1_000
    stale_ms: int = 86_400_000
    top: int = 10


def _ordered(entries) -> list[dict]:
    return sorted(dedupe(entries), key=lambda e: (e["time"], e["sourceTopic"], e["partition"], e["offset"]))


def _period_kpis(entries: list[dict], start: int, end: int, cfg: KpiConfig) -> dict:
    n_buckets = max(1, math.ceil((end - start) / cfg.bucket_ms))
    buckets = [0] * n_buckets
    activations: dict[str, list[int]] = defaultdict(list)
    priorities: Counter = Counter()
    shown_since: dict[str, int] = {}   # alarm -> since of what it shows now
    state_of: dict[str, tuple[str, int]] = {}  # alarm -> (state, from)
    state_ms: Counter = Counter()
    fleeting: Counter = Counter()
    stale: dict[str, int] = {}
    shelved_from: dict[str, int] = {}
    shelved_ms: Counter = Counter()
    shelve_actions = 0

    def close_state(alarm: str, t: int) -> None:
        if alarm in state_of:
            st, frm = state_of.pop(alarm)
            state_ms[st] += max(0, min(t, end) - max(frm, start))

    def check_stale(alarm: str, t: int) -> None:
        since = shown_since.get(alarm)
        if since and min(t, end) - since > cfg.stale_ms:
            stale[alarm] = max(stale.get(alarm, 0), min(t, end) - since)

    for e in entries:
        t, alarm, kind = e["time"], e["alarm"], e["kind"]
        if t >= end:
            break
        if kind == "shown":
            since = e["since"] or t
            if shown_since.get(alarm) != since:
                if alarm in shown_since:  # a new activation without a clear in between
                    check_stale(alarm, t)
                shown_since[alarm] = since
                if since >= start:
                    activations[alarm].append(since)
                    if since < end:
                        buckets[min(n_buckets - 1, (since - start) // cfg.bucket_ms)] += 1
                    priorities[e["priority"] or "unknown"] += 1
            close_state(alarm, t)
            state_of[alarm] = (e["state"] or "unknown", t)
        elif kind == "cleared":
            if alarm in shown_since:
                since = shown_since[alarm]
                check_stale(alarm, t)
                if since >= start and t - since < cfg.fleeting_ms:
                    fleeting[alarm] += 1
                del shown_since[alarm]
            close_state(alarm, t)
        elif kind == "shelve":
            shelve_actions += 1 if t >= start else 0
            shelved_from.setdefault(alarm, t)
        elif kind == "unshelve":
            if alarm in shelved_from:
                frm = shelved_from.pop(alarm)
                shelved_ms[alarm] += max(0, min(t, end) - max(frm, start))
    for alarm in list(shown_since):
        check_stale(alarm, end)
    for alarm in list(state_of):
        close_state(alarm, end)
    for alarm, frm in shelved_from.items():
        shelved_ms[alarm] += max(0, end - max(frm, start))

    chattering = {}
    for alarm, times in activations.items():
        times.sort()
        k = cfg.chatter_count
        best, j = 0, 0
        for i, u in enumerate(times):  # the most activations within one window
            while u - times[j] >= cfg.chatter_window_ms:
                j += 1
            best = max(best, i - j + 1)
        if best >= k:
            chattering[alarm] = best
    total = sum(len(v) for v in activations.values())
    flood_buckets = [i for i, c in enumerate(buckets) if c > cfg.flood_threshold]
    flood_ms = sum(min(start + (i + 1) * cfg.bucket_ms, end) - (start + i * cfg.bucket_ms) for i in flood_buckets)
    groups = Counter()
    for p, c in priorities.items():
        groups[PRIORITY_GROUP.get(p, "unknown")] += c
    top = sorted(((a, len(v)) for a, v in activations.items()), key=lambda x: (-x[1], x[0]))[:cfg.top]
    return {
        "activations": total,
        "rate_per_bucket": {"average": total / n_buckets, "peak": max(buckets), "buckets": buckets},
        "flood": {"buckets": len(flood_buckets), "time_ms": flood_ms,
                  "percent": 100.0 * flood_ms / (end - start) if end > start else 0.0},
        "chattering": dict(sorted(chattering.items())),
        "fleeting": dict(sorted(fleeting.items())),
        "stale": dict(sorted(stale.items())),
        "top": [{"alarm": a, "activations": c} for a, c in top],
        "priority": dict(sorted(priorities.items())),
        "priority_percent": {g: (100.0 * groups[g] / total if total else 0.0) for g in ("low", "medium", "high")},
        "shelving": {"actions": shelve_actions, "alarms": len(shelved_ms),
                     "time_ms": sum(shelved_ms.values()), "by_alarm": dict(sorted(shelved_ms.items()))},
        "state_time_ms": dict(sorted(state_ms.items())),
        "out_of_service_ms": sum(v for k, v in state_ms.items() if k in OUT_OF_SERVICE),
        "standing_at_end": len(shown_since),
    }


def compute(entries, start_ms: int, end_ms: int, cfg: KpiConfig = KpiConfig(),
            parents: Mapping[str, str | None] | None = None) -> dict:
    """KPIs over [start_ms, end_ms), overall and per location (with `parents`, each
    location rolled up with those under it). Entries before the period may be given
    (they tell what was standing at its start); copies are skipped."""
    if end_ms <= start_ms:
        raise ValueError("the period must end after it starts")
    ordered = _ordered(entries)
    by_location: dict[str, list[dict]] = defaultdict(list)
    for e in ordered:
        for loc in ancestors(parents or {}, e["location"] or "(no location)"):
            by_location[loc].append(e)
    return {
        "start_ms": start_ms, "end_ms": end_ms, "config": asdict(cfg), "target_percent": TARGET_PCT,
        "overall": _period_kpis(ordered, start_ms, end_ms, cfg),
        "locations": {loc: _period_kpis(es, start_ms, end_ms, cfg) for loc, es in sorted(by_location.items())},
    }


def recent_rate(entries, now_ms: int, cfg: KpiConfig = KpiConfig(),
                parents: Mapping[str, str | None] | None = None) -> dict:
    """Activations in the last bucket (sliding), overall and per location (rolled up
    with `parents`): the live flood indicator."""
    start = now_ms - cfg.bucket_ms
    k = compute(entries, start, now_ms + 1, cfg, parents)
    per = {loc: v["activations"] for loc, v in k["locations"].items() if v["activations"]}
    total = k["overall"]["activations"]
    return {"window_ms": cfg.bucket_ms, "threshold": cfg.flood_threshold, "activations": total,
            "flood": total > cfg.flood_threshold, "locations": per,
            "flooded_locations": sorted(loc for loc, c in per.items() if c > cfg.flood_threshold)}


# --- text and HTML reports ----------------------------------------------------

def _dur(ms: int) -> str:
    s = int(ms // 1000)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _block(name: str, k: dict, cfg: dict) -> list[str]:
    r, pp = k["rate_per_bucket"], k["priority_percent"]
    lines = [
        f"== {name}",
        f"  activations: {k['activations']}   per {cfg['bucket_ms'] // 60000} min: average {r['average']:.2f}, "
        f"peak {r['peak']}",
        f"  time in flood (> {cfg['flood_threshold']} per {cfg['bucket_ms'] // 60000} min): {_dur(k['flood']['time_ms'])} "
        f"({k['flood']['percent']:.1f} %)",
        f"  priority: low {pp['low']:.0f} % / medium {pp['medium']:.0f} % / high {pp['high']:.0f} %  "
        f"(guide 80/15/5)  counts {k['priority'] or '-'}",
        f"  chattering (>= {cfg['chatter_count']} per {cfg['chatter_window_ms'] // 1000} s): "
        f"{', '.join(f'{a} ({c})' for a, c in k['chattering'].items()) or 'none'}",
        f"  fleeting (< {cfg['fleeting_ms']} ms): {', '.join(f'{a} ({c})' for a, c in k['fleeting'].items()) or 'none'}",
        f"  stale (> {_dur(cfg['stale_ms'])}): {', '.join(f'{a} ({_dur(d)})' for a, d in k['stale'].items()) or 'none'}",
        f"  shelved: {k['shelving']['actions']} action(s), {k['shelving']['alarms']} alarm(s), "
        f"{_dur(k['shelving']['time_ms'])} in all; out of service {_dur(k['out_of_service_ms'])}",
        f"  time per state: {', '.join(f'{s} {_dur(v)}' for s, v in k['state_time_ms'].items()) or '-'}",
        f"  standing at the end: {k['standing_at_end']}",
    ]
    if k["top"]:
        lines.append("  top: " + ", ".join(f"{t['alarm']} ({t['activations']})" for t in k["top"]))
    return lines


def format_text(result: dict) -> str:
    from alarm_engine.cli import format_ms

    cfg = result["config"]
    lines = [f"KPIs from {format_ms(result['start_ms'])} to {format_ms(result['end_ms'])}"]
    lines += _block("overall", result["overall"], cfg)
    for loc, k in result["locations"].items():
        lines += _block(f"location {loc}", k, cfg)
    return "\n".join(lines) + "\n"


def write_html(result: dict, path: str) -> None:
    """A self-contained report: the text figures and two plots (matplotlib, inline PNG)."""
    import base64
    import html
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, ov = result["config"], result["overall"]

    def png(fig) -> str:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
        plt.close(fig)
        return base64.b64encode(buf.getvalue()).decode()

    fig, ax = plt.subplots(figsize=(10, 3.2))
    buckets = ov["rate_per_bucket"]["buckets"]
    xs = [(result["start_ms"] + i * cfg["bucket_ms"] - result["start_ms"]) / 3_600_000 for i in range(len(buckets))]
    ax.bar(xs, buckets, width=cfg["bucket_ms"] / 3_600_000 * 0.9, align="edge",
           color=["#c0392b" if c > cfg["flood_threshold"] else "#2e86c1" for c in buckets])
    ax.axhline(cfg["flood_threshold"], color="#c0392b", linestyle="--", label="flood threshold")
    ax.set_xlabel("hours from the start of the period")
    ax.set_ylabel(f"activations per {cfg['bucket_ms'] // 60000} min")
    ax.legend()
    rate_png = png(fig)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    groups = ["high", "medium", "low"]
    ax.bar([g + "\n(measured)" for g in groups], [ov["priority_percent"][g] for g in groups], color="#2e86c1")
    ax.scatter([g + "\n(measured)" for g in groups], [TARGET_PCT[g] for g in groups], color="#c0392b",
               zorder=3, label="ISA-18.2 guide")
    ax.set_ylabel("% of activations")
    ax.legend()
    prio_png = png(fig)
    text = html.escape(format_text(result))
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>Alarm KPIs</title>
<style>body{{font-family:sans-serif;margin:2em}} pre{{background:#f4f4f4;padding:1em}}</style></head><body>
<h1>Alarm-management KPIs</h1>
<h2>Alarm rate</h2><img alt="activations per interval" src="data:image/png;base64,{rate_png}">
<h2>Priority distribution</h2><img alt="priority distribution" src="data:image/png;base64,{prio_png}">
<h2>Figures</h2><pre>{text}</pre></body></html>"""
    with open(path, "w", encoding="utf-8") as f:
        f.write(doc)
