"""The alarm-history topic: what it holds, how entries are made, and how they are read.

alarm-history is append-only (cleanup policy delete, retention
ALARM_ENGINE_HISTORY_RETENTION, default 30 days). One entry per change of what
an alarm shows (an active-alarms record) and per operator action (a record on
alarms, shelved-alarms or alarm-activations), with its time, user and host.

Each entry names its source record (logical topic, partition, offset). The
writer commits its input offsets only after Kafka acknowledged the entries, so
after a crash it may write an entry again: readers keep the first entry of each
source and skip the copies (`dedupe`). Entry building and selection are pure.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import AsyncIterator, Iterable, Mapping

from alarm_engine.config import Settings

TOPIC = "alarm-history"
SCHEMA = "alarm-history-value"
# The topics an entry is made from, and the kinds of entries they give (value, tombstone).
SOURCES = {
    "active-alarms": ("shown", "cleared"),
    "shelved-alarms": ("shelve", "unshelve"),
    "alarm-activations": ("activate", "deactivate"),
    "alarms": ("define", "undefine"),
    "alarm-acks": ("ack", "ack-removed"),  # an unack record gives "unack"
    "disabled-alarms": ("disable", "enable"),
}
ACTIONS = ("shelve", "unshelve", "activate", "deactivate", "define", "undefine", "ack", "unack",
           "disable", "enable")
DEFAULT_RETENTION_MS = 30 * 86_400_000


def retention_ms(env=None) -> int:
    """ALARM_ENGINE_HISTORY_RETENTION: a duration (30d, 12h) or milliseconds."""
    env = os.environ if env is None else env
    text = env.get("ALARM_ENGINE_HISTORY_RETENTION", "").strip()
    if not text:
        return DEFAULT_RETENTION_MS
    if text.isdigit():
        return int(text)
    from alarm_engine.cli import parse_duration_ms

    return parse_duration_ms(text)


def _jsonable(v):
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def header(headers: Iterable[tuple[str, bytes]] | None, name: str) -> str:
    for k, v in headers or ():
        if k == name and v is not None:
            return v.decode("utf-8", errors="replace")[:256]
    return ""


def entry(topic: str, key: str, datum: dict | None, ts: int, partition: int, offset: int,
          headers=None, definition: dict | None = None) -> dict:
    """The history entry of one source record (pure).

    `definition` is the alarm's definition as known when the record was read (for
    its location, category and priority); `headers` the record's Kafka headers
    (user, host), which the CLI and the web server set on operator actions.
    """
    present, removed = SOURCES[topic]
    d = datum or {}
    defn = definition or {}
    if topic == "alarms" and datum is not None:
        defn = datum
    e = {
        "time": int(ts), "alarm": key, "kind": present if datum is not None else removed,
        "user": header(headers, "user"), "host": header(headers, "host"),
        "state": "", "severity": "", "priority": str(defn.get("priority") or ""), "cause": "",
        "location": str(defn.get("location") or ""), "category": str(defn.get("category") or ""),
        "message": "", "since": 0,
        "detail": json.dumps(_jsonable(datum), sort_keys=True),
        "sourceTopic": topic, "partition": int(partition), "offset": int(offset),
    }
    if topic == "active-alarms" and datum is not None:
        e.update(state=str(d.get("state", "")), severity=str(d.get("severity", "")),
                 priority=str(d.get("priority") or e["priority"]), cause=str(d.get("cause", "")),
                 message=str(d.get("message", "")), since=int(d.get("since") or 0))
        shelf = d.get("shelving") or {}
        if shelf and not e["user"]:
            e["user"] = str(shelf.get("user", ""))
    elif topic == "shelved-alarms" and datum is not None:
        e["user"] = e["user"] or str(d.get("user", ""))
        e["message"] = " ".join(x for x in (d.get("reason", ""), d.get("comment", "")) if x)
    elif topic == "alarm-activations" and datum is not None:
        e["message"] = str(d.get("note", ""))
        if d.get("priority"):
            e["priority"] = str(d["priority"])
    elif topic == "alarms" and datum is not None:
        e["message"] = str(d.get("description", ""))
    elif topic == "alarm-acks" and datum is not None:
        e["kind"] = "unack" if d.get("unack") else "ack"
        e["user"] = e["user"] or str(d.get("user", ""))
        e["host"] = e["host"] or str(d.get("host", ""))
        e["message"] = str(d.get("comment", ""))
    elif topic == "disabled-alarms" and datum is not None:
        e["user"] = e["user"] or str(d.get("user", ""))
        e["host"] = e["host"] or str(d.get("host", ""))
        e["message"] = " ".join(x for x in (d.get("reason", ""), d.get("comment", "")) if x)
        if d.get("until"):
            e["message"] += f" (until {d['until']})"
    return e


def source(e: dict) -> tuple[str, int, int]:
    return e["sourceTopic"], e["partition"], e["offset"]


class Repeats:
    """Which active-alarms values repeat what their alarm showed before (as far as this
    reader has seen): the engine publishes an alarm's value again after a restart or a
    hand-over, which is no change of what it shows and gets no history entry."""

    def __init__(self) -> None:
        self._last: dict[str, dict | None] = {}

    def repeat(self, key: str, datum: dict | None) -> bool:
        if key in self._last and self._last[key] == datum:
            return True
        self._last[key] = datum
        return False

    def forget(self) -> None:
        self._last.clear()


def dedupe(entries: Iterable[dict]) -> list[dict]:
    """The entries without the copies a replay wrote (same source record), in order."""
    seen: set[tuple[str, int, int]] = set()
    out = []
    for e in entries:
        s = source(e)
        if s in seen:
            continue
        seen.add(s)
        out.append(e)
    return out


def in_location(location: str, wanted: str, parents: Mapping[str, str | None] | None = None) -> bool:
    """A location selects itself and what lies under it in the tree of alarm-locations
    (parent links: `parents`, location -> parent), as `ack --location` and the summaries do."""
    from alarm_engine.summaries import ancestors

    return not wanted or location == wanted or wanted in ancestors(parents or {}, location)


def select(entries: Iterable[dict], name: str | None = None, location: str | None = None,
           since_ms: int | None = None, until_ms: int | None = None,
           parents: Mapping[str, str | None] | None = None) -> list[dict]:
    """Deduplicated entries of one alarm and/or location (and below it in `parents`) in
    [since, until), by time."""
    out = [e for e in dedupe(entries)
           if (name is None or e["alarm"] == name)
           and (location is None or in_location(e["location"], location, parents))
           and (since_ms is None or e["time"] >= since_ms)
           and (until_ms is None or e["time"] < until_ms)]
    out.sort(key=lambda e: (e["time"], e["sourceTopic"], e["partition"], e["offset"]))
    return out


def describe(e: dict) -> str:
    """One line of text for an entry (CLI and page)."""
    kind = e["kind"]
    if kind == "shown":
        # The acknowledgement state is part of what is shown: without it an ack reads as a repeat.
        try:
            ack = (json.loads(e["detail"] or "null") or {}).get("ackState") or ""
        except (ValueError, AttributeError):
            ack = ""
        text = f"{e['state']}{' ' + ack if ack else ''} {e['severity']} {e['cause']}: {e['message']}"
    elif kind == "cleared":
        text = "cleared (back to normal)"
    else:
        text = kind + (f": {e['message']}" if e["message"] else "")
    if kind == "shelve":
        try:
            d = json.loads(e["detail"]) or {}
        except ValueError:
            d = {}
        if d.get("oneshot"):
            text += " (one-shot)"
        if d.get("expiration"):
            from alarm_engine.cli import format_ms

            text += f" until {format_ms(d['expiration'])}"
    if e["user"]:
        return text + f" [by {e['user']}" + (f" from {e['host']}]" if e["host"] else "]")
    return text + (f" [from {e['host']}]" if e["host"] else "")


# --- the shell: topic set-up and reading ---------------------------------------

async def ensure_topic(settings: Settings) -> bool:
    """Create alarm-history (delete policy, the retention setting) or bring its settings
    in line; True if it was created."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    from alarm_engine.topics import TOPIC_ALREADY_EXISTS, _until_visible

    config = {"cleanup.policy": "delete", "retention.ms": str(retention_ms())}
    name = settings.topic(TOPIC)
    admin = AIOKafkaAdminClient(**settings.kafka_kwargs())
    await admin.start()
    try:
        if name in set(await admin.list_topics()):
            await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, name, configs=config)])
            return False
        response = await admin.create_topics([NewTopic(name, settings.partitions, settings.replication,
                                                       topic_configs=config)])
        for _, code, *rest in response.topic_errors:
            if code not in (0, TOPIC_ALREADY_EXISTS):
                raise RuntimeError(f"cannot create topic {name}: {rest[0] if rest and rest[0] else code}")
        await _until_visible(admin, {name})
        return True
    finally:
        await admin.close()


async def stream(settings: Settings, since_ms: int = 0, follow: bool = False,
                 codec=None) -> AsyncIterator[dict | None]:
    """Entries from `since_ms` on (as written, copies included), then None once caught up,
    then (with follow) new entries as they come. A plain consumer: no group."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from alarm_engine.codec import BadRecord
    from alarm_engine.kafka_io import _start

    if codec is None:
        from alarm_engine.registry import make_codec

        codec = make_codec(settings)
    topic = settings.topic(TOPIC)
    consumer = AIOKafkaConsumer(**settings.kafka_kwargs(), enable_auto_commit=False,
                                auto_offset_reset="earliest", group_id=None)
    await _start(consumer)
    try:
        partitions = consumer.partitions_for_topic(topic)
        if partitions is None:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise LookupError(f"topic {topic!r} does not exist (run: alarm-engine topics create, "
                              f"or start a worker)")
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        end = await consumer.end_offsets(tps)
        starts = await consumer.offsets_for_times({tp: max(0, since_ms) for tp in tps})
        for tp in tps:
            found = starts.get(tp)
            consumer.seek(tp, found.offset if found is not None else end[tp])
        pending = {tp for tp in tps if await consumer.position(tp) < end[tp]}
        caught_up = False
        while True:
            if not pending and not caught_up:
                caught_up = True
                yield None
                if not follow:
                    return
            batch = await consumer.getmany(timeout_ms=200)
            for tp, msgs in batch.items():
                for m in msgs:
                    try:
                        value = codec.decode(TOPIC, m.value)
                    except BadRecord:
                        continue  # only the history writer writes here; nothing else to do with it
                    if value is not None:
                        yield value
            for tp in list(pending):
                if await consumer.position(tp) >= end[tp]:
                    pending.discard(tp)
    finally:
        await consumer.stop()


async def read(settings: Settings, since_ms: int = 0, codec=None) -> list[dict]:
    """Every entry from `since_ms` to the end offsets at the time of the call (copies included)."""
    out = []
    async for e in stream(settings, since_ms, follow=False, codec=codec):
        if e is not None:
            out.append(e)
    return out


def run_read(settings: Settings, since_ms: int) -> list[dict]:
    return asyncio.run(read(settings, since_ms))
