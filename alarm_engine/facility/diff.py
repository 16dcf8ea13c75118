"""The plan between what the topics hold and what the files say (pure: plain data in and out).

Records are compared as data (the datum Avro or JSON decoding gives), without the fields
apply fills in itself (user, host): so a second apply of the same files plans nothing,
whoever runs it. Keys the topics hold and the files do not are removed only with prune.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from alarm_engine.facility.fileformat import META_FIELDS

ADDED, CHANGED, REMOVED = "added", "changed", "removed"


@dataclass
class TopicPlan:
    topic: str
    added: dict[str, dict] = field(default_factory=dict)
    changed: dict[str, tuple[dict | None, dict]] = field(default_factory=dict)  # key → (old, new)
    removed: list[str] = field(default_factory=list)  # written as tombstones only with prune
    unchanged: int = 0
    pruning: bool = False

    def writes(self) -> list[tuple[str, dict | None]]:
        """(key, datum or None for a tombstone) in a stable order."""
        out = [(k, v) for k, v in sorted(self.added.items())]
        out += [(k, new) for k, (_, new) in sorted(self.changed.items())]
        return out + self.tombstones()

    def tombstones(self) -> list[tuple[str, None]]:
        return [(k, None) for k in self.removed] if self.pruning else []


@dataclass
class Plan:
    topics: dict[str, TopicPlan]

    def writes(self) -> int:
        return sum(len(t.writes()) for t in self.topics.values())

    def ordered(self) -> list[tuple[str, str, dict | None]]:
        """(topic, key, datum) to write: definitions in topic order (locations, PVs,
        alarms), then tombstones in the reverse order, so that the engine never sees an
        alarm whose PV is not monitored, neither while adding nor while pruning."""
        out = [(t, k, v) for t, tp in self.topics.items() for k, v in tp.writes() if v is not None]
        for t in reversed(list(self.topics)):
            out += [(t, k, None) for k, _ in self.topics[t].tombstones()]
        return out


def comparable(datum: dict | None) -> dict | None:
    if datum is None:
        return None
    return {k: v for k, v in datum.items() if k not in META_FIELDS}


def plan(current: dict[str, dict[str, dict | None]], desired: dict[str, dict[str, dict]],
         prune: bool) -> Plan:
    """current: topic → key → datum (None: a record that could not be read, rewritten if
    the file has the key); desired: topic → key → datum."""
    topics = {}
    for topic, want in desired.items():
        have = current.get(topic, {})
        tp = TopicPlan(topic, pruning=prune)
        for key, datum in want.items():
            if key not in have:
                tp.added[key] = datum
            elif comparable(have[key]) != comparable(datum):
                tp.changed[key] = (have[key], datum)
            else:
                tp.unchanged += 1
        tp.removed = sorted(k for k in have if k not in want)
        topics[topic] = tp
    return Plan(topics)


def field_changes(old: dict | None, new: dict) -> list[str]:
    """'field: old → new' for each field that differs."""
    if old is None:
        return ["(the current record could not be read)"]
    out = []
    for k in new:
        if k in META_FIELDS:
            continue
        if old.get(k) != new[k]:
            out.append(f"{k}: {_short(old.get(k))} → {_short(new[k])}")
    return out


def _short(v) -> str:
    text = repr(v) if not isinstance(v, str) else repr(v)
    return text if len(text) <= 70 else text[:67] + "..."


def summary(p: Plan, show: int = 10) -> list[str]:
    """Per topic: counts, then the first `show` entries of each kind."""
    lines = []
    for tp in p.topics.values():
        removed = (f"{len(tp.removed)} removed" if tp.pruning else
                   f"{len(tp.removed)} not in the files (kept; --prune removes them)")
        lines.append(f"{tp.topic}: {len(tp.added)} added, {len(tp.changed)} changed, {removed}, "
                     f"{tp.unchanged} unchanged")
        for key in sorted(tp.added)[:show]:
            lines.append(f"  + {key}")
        if len(tp.added) > show:
            lines.append(f"  + ... and {len(tp.added) - show} more")
        for key in sorted(tp.changed)[:show]:
            old, new = tp.changed[key]
            lines.append(f"  ~ {key}: {'; '.join(field_changes(old, new))}")
        if len(tp.changed) > show:
            lines.append(f"  ~ ... and {len(tp.changed) - show} more")
        mark = "-" if tp.pruning else "?"
        for key in tp.removed[:show]:
            lines.append(f"  {mark} {key}")
        if len(tp.removed) > show:
            lines.append(f"  {mark} ... and {len(tp.removed) - show} more")
    return lines
