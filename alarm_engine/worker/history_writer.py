"""The history writer: active-alarms and the operator topics -> alarm-history.

It runs as a task in every worker (`install`), with plain aiokafka clients in a
consumer group of its own, so a fleet shares its input partitions and it never
touches the engine's agents or their consumer. Each batch is written, Kafka's
acknowledgements awaited, and only then its input offsets committed (at most once a
second while records flow): a crash replays at most the uncommitted second, and the
copies it writes carry the same source (topic, partition, offset) as the first ones,
so readers skip them (alarm_engine.history.dedupe). Its consumer waits for up to
0.5 s of records (fetch_min_bytes) instead of a fetch per record: history is not
the operator's live view, and each fetch is a request.

The alarms' locations come from the alarms topic, read in full (no group) and
followed, so an entry carries the location its alarm had when it was written.
A record that does not decode is skipped with a warning (the engine already
sends bad input records to dead-letters); the registry being down stops the
writer until it answers (the writer restarts with backoff and replays).
"""

from __future__ import annotations

import asyncio
import logging
import os

from alarm_engine import history
from alarm_engine.config import Settings

log = logging.getLogger(__name__)

INPUTS = tuple(history.SOURCES)
COMMIT_S = 1.0


def enabled(env=None) -> bool:
    env = os.environ if env is None else env
    return env.get("ALARM_ENGINE_HISTORY", "1").strip().lower() not in ("0", "no", "false", "off")


def group_id(settings: Settings) -> str:
    prefix = settings.topic_prefix.strip(".-_")
    return f"{settings.app_id}-history" + (f"-{prefix}" if prefix else "")


class HistoryWriter:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.definitions: dict[str, dict] = {}
        self.written = 0

    async def run(self) -> None:
        """Forever: a failure (Kafka or registry unreachable) restarts it after a backoff."""
        delay = 1.0
        while True:
            try:
                await self._run_once()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("alarm-history writer: %s: %s; restarting in %.0f s", e.__class__.__name__, e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)

    async def _follow_definitions(self, codec, caught_up: asyncio.Event) -> None:
        from alarm_engine.codec import BadRecord, decode_key
        from alarm_engine.kafka_io import replay

        async for rec in replay(self.settings, self.settings.topic("alarms"), follow=True):
            if rec is None:
                caught_up.set()
                continue
            try:
                key, value = decode_key(rec.key), codec.decode("alarms", rec.value)
            except BadRecord:
                continue
            if value is None:
                self.definitions.pop(key, None)
            else:
                self.definitions[key] = value

    async def _run_once(self) -> None:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
        from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor

        from alarm_engine.codec import BadRecord, decode_key
        from alarm_engine.kafka_io import _start
        from alarm_engine.registry import make_codec

        s = self.settings
        await history.ensure_topic(s)
        codec = await asyncio.to_thread(make_codec, s)
        await asyncio.to_thread(codec.schema_id, history.TOPIC)  # registers the schema once
        caught_up = asyncio.Event()
        defs_task = asyncio.create_task(self._follow_definitions(codec, caught_up))
        logical = {s.topic(t): t for t in INPUTS}
        consumer = AIOKafkaConsumer(*logical, **s.kafka_kwargs(), group_id=group_id(s),
                                    enable_auto_commit=False, auto_offset_reset="earliest",
                                    fetch_min_bytes=1 << 20, fetch_max_wait_ms=500,
                                    partition_assignment_strategy=(RoundRobinPartitionAssignor,))
        producer = AIOKafkaProducer(**s.kafka_kwargs(), acks="all", linger_ms=5)
        try:
            await asyncio.wait_for(caught_up.wait(), 120)
            await _start(producer)
            await _start(consumer)
            out_topic = s.topic(history.TOPIC)
            loop = asyncio.get_running_loop()
            commit, next_commit = {}, 0.0
            repeats = history.Repeats()  # per run: a restart may write one repeat per alarm
            assigned: set = set()
            while True:
                if defs_task.done():
                    defs_task.result()  # its failure restarts the writer
                batch = await consumer.getmany(timeout_ms=500, max_records=500)
                if consumer.assignment() != assigned:  # a rebalance: another writer may have
                    assigned = set(consumer.assignment())  # written these partitions' entries
                    repeats.forget()
                futures = []
                for tp, msgs in batch.items():
                    topic = logical[tp.topic]
                    for m in msgs:
                        try:
                            key = decode_key(m.key)
                            if _unseen_schema(codec, m.value):  # a registry fetch: not on the worker's loop
                                datum = await asyncio.to_thread(codec.decode, topic, m.value)
                            else:
                                datum = codec.decode(topic, m.value)
                        except BadRecord as e:
                            log.warning("alarm-history: skipped %s[%d]@%d: %s", tp.topic, m.partition, m.offset, e)
                            continue
                        if topic == "active-alarms" and repeats.repeat(key, datum):
                            continue
                        e = history.entry(topic, key, datum, m.timestamp, m.partition, m.offset,
                                          headers=m.headers, definition=self.definitions.get(key))
                        futures.append(await producer.send(out_topic, key=key.encode(),
                                                           value=codec.encode(history.TOPIC, e)))
                    if msgs:
                        commit[tp] = msgs[-1].offset + 1
                if futures:
                    await asyncio.gather(*futures)
                    self.written += len(futures)
                # Offsets after the entries are acknowledged; at most every COMMIT_S while
                # records flow (a Kafka request each), at once when the input is quiet.
                if commit and (not batch or loop.time() >= next_commit):
                    await consumer.commit(commit)
                    commit, next_commit = {}, loop.time() + COMMIT_S
        finally:
            defs_task.cancel()
            await asyncio.gather(defs_task, return_exceptions=True)
            await consumer.stop()
            await producer.stop()


def _unseen_schema(codec, raw: bytes | None) -> bool:
    """A Confluent-framed value whose writer schema the codec has not fetched yet."""
    if not raw or raw[0] != 0 or len(raw) < 5:
        return False
    return int.from_bytes(raw[1:5], "big") not in codec._writers


def install(app, settings: Settings) -> None:
    """Runs the writer as a task of the Faust app (every worker; they share the work)."""
    if not enabled():
        return

    @app.task
    async def _alarm_history() -> None:
        await HistoryWriter(settings).run()
