"""Per-location summaries (alarm-summaries): what the alarms at or below each location of
the tree show. Pure: definitions, active-alarms records and the location tree in, one
summary per location out.

The roll-up ranks as Phoebus' alarm tree does (SeverityLevel.java): any unacknowledged
alarm outranks every acknowledged one, OK < MINOR_ACK < MAJOR_ACK < INVALID_ACK < MINOR <
MAJOR < INVALID. Only alarms shown ACTIVE raise a location (UNACK, ACK or RTN_UNACK);
SHELVED, DISABLED, SUPPRESSED and MASKED alarms are counted but do not raise it, as a
disabled leaf in Phoebus publishes OK.
"""

from __future__ import annotations

from typing import Mapping

SEVERITIES = ("MINOR", "MAJOR", "INVALID")
LEVELS = ("OK", "MINOR_ACK", "MAJOR_ACK", "INVALID_ACK", "MINOR", "MAJOR", "INVALID")
_RANK = {level: i for i, level in enumerate(LEVELS)}
STATES = ("ACTIVE", "SHELVED", "DISABLED", "SUPPRESSED", "MASKED")
PRIORITIES = ("P1_LIFE", "P2_PROPERTY", "P3_PRODUCTIVITY", "P4_DIAGNOSTIC")


def level(shown: Mapping) -> str:
    """The roll-up level of one active-alarms record."""
    if shown.get("state") != "ACTIVE" or shown.get("severity") not in SEVERITIES:
        return "OK"
    acked = shown.get("ackState") == "ACK"
    return shown["severity"] + ("_ACK" if acked else "")


def ancestors(parents: Mapping[str, str | None], location: str) -> list[str]:
    """`location` and the locations above it, nearest first; a cycle in the tree stops the walk."""
    chain, seen, current = [], set(), location
    while current is not None and current not in seen:
        chain.append(current)
        seen.add(current)
        current = parents.get(current)
    return chain


def empty() -> dict:
    return {"level": "OK", "severity": "NO_ALARM", "acknowledged": True, "alarms": 0, "defined": 0,
            "unacknowledged": 0, "states": {s: 0 for s in STATES}, "priorities": {p: 0 for p in PRIORITIES}}


def summarize(locations: Mapping[str, str], active: Mapping[str, Mapping],
              parents: Mapping[str, str | None]) -> dict[str, dict]:
    """locations: alarm -> its location (every defined alarm); active: alarm -> its active-alarms
    record; parents: location -> parent (the alarm-locations tree). One summary for every
    location of the tree and every location an alarm names, at or below which the counts are."""
    out = {loc: empty() for loc in parents}
    chains: dict[str, list[str]] = {}
    for alarm, loc in locations.items():
        chain = chains.get(loc)
        if chain is None:
            chain = chains[loc] = ancestors(parents, loc)
        shown = active.get(alarm)
        lv = level(shown) if shown else "OK"
        for node in chain:
            s = out.get(node)
            if s is None:
                s = out[node] = empty()
            s["defined"] += 1
            if shown is None:
                continue
            s["alarms"] += 1
            state = shown.get("state")
            if state in s["states"]:
                s["states"][state] += 1
            if shown.get("priority") in s["priorities"]:
                s["priorities"][shown["priority"]] += 1
            if shown.get("ackState") in ("UNACK", "RTN_UNACK"):
                s["unacknowledged"] += 1
            if _RANK[lv] > _RANK[s["level"]]:
                s["level"] = lv
    for s in out.values():
        s["severity"] = "NO_ALARM" if s["level"] == "OK" else s["level"].removesuffix("_ACK")
        s["acknowledged"] = s["level"] == "OK" or s["level"].endswith("_ACK")
    return out


def changes(computed: Mapping[str, dict], published: Mapping[str, dict]) -> list[tuple[str, dict | None]]:
    """The records that make the published summaries equal the computed ones (None: a tombstone
    for a location that no longer has a summary)."""
    out = [(loc, s) for loc, s in sorted(computed.items()) if published.get(loc) != s]
    out += [(loc, None) for loc in sorted(published) if loc not in computed]
    return out
