"""The summary writer: alarms, active-alarms, alarm-locations -> alarm-summaries.

A location's summary counts alarms of every partition, so it cannot be computed from one
worker's partitions. One worker writes them: the member of the consumer group
`<app>-summaries` that is assigned partition 0 of alarm-summaries (the group is only a
lease: its records are not used). That worker reads the four topics in full (no consumer
group, like `list-*`) from their beginnings and follows them; the others only keep their
place in the group, so a fleet pays the following once. When the writer dies, the group
gives the partition to another within a session timeout (10 s), which reads the compacted
topics and writes what differs. Two writers for a moment during a rebalance write the same
values (both compute from the same topics), so a compacted reader sees no harm.

Summaries are computed by alarm_engine/summaries.py at most every `interval_s` (longer when a
computation takes long: at most a fifth of the time is spent on it), and only
those that differ from what alarm-summaries holds are written: a restart or a new writer
writes nothing when nothing changed.
"""

from __future__ import annotations

import asyncio
import logging
import os

from alarm_engine import summaries
from alarm_engine.config import SUMMARY_TOPIC, Settings

log = logging.getLogger(__name__)

FOLLOWED = ("alarms", "active-alarms", "alarm-locations", SUMMARY_TOPIC)


def enabled(env=None) -> bool:
    env = os.environ if env is None else env
    return env.get("ALARM_ENGINE_SUMMARIES", "1").strip().lower() not in ("0", "no", "false", "off")


def group_id(settings: Settings) -> str:
    prefix = settings.topic_prefix.strip(".-_")
    return f"{settings.app_id}-summaries" + (f"-{prefix}" if prefix else "")


class SummaryWriter:
    def __init__(self, settings: Settings, interval_s: float = 0.5):
        self.settings = settings
        self.interval_s = interval_s
        self.written = 0
        self.reset()

    def reset(self) -> None:
        """Forget the followed state (before reading the topics again from their beginnings)."""
        self.locations: dict[str, str] = {}  # alarm -> location
        self.active: dict[str, dict] = {}  # alarm -> active-alarms record
        # alarm -> its latest active-alarms value, not yet decoded: a flood rewrites one alarm
        # many times between two computations, and only the latest counts.
        self.undecoded: dict[str, bytes] = {}
        self.parents: dict[str, str | None] = {}  # location -> parent
        self.published: dict[str, dict] = {}  # location -> summary, as alarm-summaries holds it
        self.refused: list[tuple[object, str]] = []  # (alarm-locations record, reason): dead letters to write
        self.dirty = True

    def apply(self, topic: str, key: str, datum: dict | None, record=None) -> None:
        """One record of a followed topic (a tombstone: datum None). A location whose parent
        would close a cycle of the tree is not applied; `record` (the Kafka record) is kept
        for a dead letter."""
        if topic == "active-alarms":
            self.undecoded.pop(key, None)  # this value is newer than one not decoded yet
        if topic == "alarms":
            if datum is None:
                self.dirty |= self.locations.pop(key, None) is not None
            elif self.locations.get(key) != datum["location"]:
                self.locations[key] = datum["location"]
                self.dirty = True
        elif topic == "active-alarms":
            if datum is None:
                self.dirty |= self.active.pop(key, None) is not None
            else:
                self.active[key] = datum
                self.dirty = True
        elif topic == "alarm-locations":
            from alarm_engine.masking import mask_cycle

            parent = None if datum is None else datum["parent"]
            cycle = mask_cycle({k: v for k, v in self.parents.items() if k != key}, key, parent)
            if cycle:
                self.refused.append((record, f"location {key!r}: parent {parent!r} would make a cycle: "
                                             f"{' -> '.join(cycle)}"))
                return
            if datum is None:
                self.parents.pop(key, None)
            else:
                self.parents[key] = datum["parent"]
            self.dirty = True
        elif topic == SUMMARY_TOPIC:
            # Written by this worker or another: compare again (a stale writer is corrected).
            if datum is None:
                self.published.pop(key, None)
            else:
                self.published[key] = datum
            self.dirty = True

    def apply_raw(self, key: str, value: bytes) -> None:
        """An active-alarms value as read: decoded by `decode_pending`, only if it is still
        the latest of its alarm then."""
        self.undecoded[key] = value
        self.dirty = True

    def decode_pending(self, decode) -> None:
        """Decodes the latest undecoded value of each alarm (`decode(raw) -> dict`). A value that
        does not decode (the engine wrote it, so it should not happen) is skipped: the alarm
        keeps what it showed before, as a skipped record would have left it."""
        from alarm_engine.codec import BadRecord

        pending, self.undecoded = self.undecoded, {}
        for key, raw in pending.items():
            try:
                self.apply("active-alarms", key, decode(raw))
            except BadRecord as e:
                log.debug("alarm-summaries: skipped an active-alarms value of %r: %s", key, e)

    async def due(self, decode=None) -> list[tuple[str, dict | None]]:
        """The records to write now (the state is marked clean). Computed in a thread on copies,
        so that a large fleet's recomputation never holds the worker's event loop."""
        if self.undecoded:
            self.decode_pending(decode)
        self.dirty = False
        locations, active, parents, published = (dict(self.locations), dict(self.active),
                                                 dict(self.parents), dict(self.published))
        computed = await asyncio.to_thread(summaries.summarize, locations, active, parents)
        return summaries.changes(computed, published)

    async def run(self) -> None:
        """Forever: a failure (Kafka or registry unreachable) restarts it after a backoff."""
        delay = 1.0
        while True:
            try:
                await self._run_once()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("alarm-summaries writer: %s: %s; restarting in %.0f s", e.__class__.__name__, e, delay)
                self.leader = False
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)

    async def _run_once(self) -> None:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

        from alarm_engine.codec import BadRecord, decode_key
        from alarm_engine.kafka_io import _start
        from alarm_engine.registry import make_codec

        s = self.settings
        codec = await asyncio.to_thread(make_codec, s)
        await asyncio.to_thread(codec.schema_id, SUMMARY_TOPIC)  # registers the schema once
        logical = {s.topic(t): t for t in FOLLOWED}
        # Up to 0.5 s of records per fetch (summaries are computed at most every interval_s
        # anyway) rather than a fetch, a Kafka request, per active-alarms record.
        follower = AIOKafkaConsumer(**s.kafka_kwargs(), group_id=None, enable_auto_commit=False,
                                    auto_offset_reset="earliest", fetch_min_bytes=1 << 20,
                                    fetch_max_wait_ms=500)
        lease = AIOKafkaConsumer(s.topic(SUMMARY_TOPIC), **s.kafka_kwargs(), group_id=group_id(s),
                                 enable_auto_commit=False, auto_offset_reset="latest", fetch_max_wait_ms=2000,
                                 session_timeout_ms=10_000, heartbeat_interval_ms=2_000)
        producer = AIOKafkaProducer(**s.kafka_kwargs(), acks="all", linger_ms=5)
        self.reset()
        self.leader = False
        try:
            await _start(follower)
            await _start(lease)
            await _start(producer)
            first = TopicPartition(s.topic(SUMMARY_TOPIC), 0)
            out_topic = s.topic(SUMMARY_TOPIC)
            loop = asyncio.get_running_loop()
            next_write = 0.0
            end: dict = {}
            behind: set = set()
            while True:
                # Keeps the lease's membership (max.poll.interval); a standby waits here.
                await lease.getmany(timeout_ms=0 if self.leader else 1000)
                leader = first in lease.assignment()
                if leader != self.leader:
                    log.info("alarm-summaries: this worker %s the writer", "is now" if leader else "is no longer")
                    self.leader = leader
                    self.reset()  # the holder reads every followed topic from its beginning
                    if leader:
                        await follower._client.force_metadata_update()
                        tps = [TopicPartition(name, p) for name in logical
                               for p in sorted(follower.partitions_for_topic(name) or ())]
                        follower.assign(tps)
                        await follower.seek_to_beginning(*tps)
                        end = await follower.end_offsets(tps)
                        behind = {tp for tp in tps if end[tp] > await follower.position(tp)}
                    else:
                        follower.assign([])
                if not leader:
                    continue
                batch = await follower.getmany(timeout_ms=500, max_records=5000)
                for tp, msgs in batch.items():
                    topic = logical[tp.topic]
                    for m in msgs:
                        try:
                            key = decode_key(m.key)
                            if topic == "active-alarms" and m.value is not None:
                                self.apply_raw(key, m.value)  # decoded when summaries are due
                                continue
                            self.apply(topic, key, codec.decode(topic, m.value), m)
                        except BadRecord as e:  # the engine dead-letters its inputs; skip here
                            log.debug("alarm-summaries: skipped %s[%d]@%d: %s", tp.topic, m.partition, m.offset, e)
                    if msgs and msgs[-1].offset + 1 >= end[tp]:
                        behind.discard(tp)
                if self.refused and not behind:
                    await self._dead_letters(producer, codec, loop)
                    self.refused.clear()
                if behind or not self.dirty or loop.time() < next_write:
                    continue
                started = loop.time()
                records = await self.due(lambda raw: codec.decode("active-alarms", raw))
                # At least interval_s apart, and at most a fifth of the time spent computing.
                next_write = loop.time() + max(self.interval_s, 4 * (loop.time() - started))
                futures = [await producer.send(out_topic, key=loc.encode(),
                                               value=None if datum is None else codec.encode(SUMMARY_TOPIC, datum))
                           for loc, datum in records]
                if futures:
                    await asyncio.gather(*futures)
                    for loc, datum in records:
                        self.apply(SUMMARY_TOPIC, loc, datum)
                    self.written += len(futures)
        finally:
            await follower.stop()
            await lease.stop()
            await producer.stop()

    async def _dead_letters(self, producer, codec, loop) -> None:
        import time

        from alarm_engine.engine import dead_letter

        now = int(time.time() * 1000)
        futures = []
        for m, reason in self.refused:
            log.warning("alarm-summaries: %s[%d]@%d: %s (see dead-letters)", m.topic, m.partition, m.offset, reason)
            out = dead_letter(codec, m.topic, m.partition, m.offset, m.key, m.value, reason, now)
            futures.append(await producer.send(self.settings.topic(out.topic), key=out.key, value=out.value))
        await asyncio.gather(*futures)


def install(app, settings: Settings) -> None:
    """Runs the writer as a task of the Faust app (every worker follows; one writes)."""
    if not enabled():
        return

    @app.task
    async def _alarm_summaries() -> None:
        await SummaryWriter(settings).run()
