"""The hot path: pv-state and alarm-deps read in raw batches, one Kafka hop to active-alarms.

A PV change is the engine's hot input: in a beam trip thousands arrive at once.
Faust's per-record stream and producer paths cost ~10x the work itself
(docs/performance.md), so these two PV-keyed topics are not Faust agents' input:
this loop, inside the Faust worker, reads them with its own aiokafka consumer
on exactly the partitions Faust assigned to this worker (the PV-keyed partition
numbers of monitored-pvs: every topic has the same partition count, and Faust
assigns co-partitioned topics together), after Faust has recovered the
`pv-home` table for them. Per batch (thousands of records):

1. every record is applied by `pv_home.PVHome` to its PV's entry (decoded once,
   kept in a cache), giving its outputs in order: every transition of every alarm
   is sent, batching merges none;
2. the outputs, each changed entry (encoded once) and the partition's fence (the
   input offsets of the batches acknowledged before this one) are sent to Kafka
   together, the entries to the table's changelog partition;
3. one wait for all acknowledgements; then the entries and fence are written to
   the table's RocksDB store in one WriteBatch per partition, with Faust's
   persisted changelog offset.

Why a kill at any instant loses nothing and applies nothing twice: docs/design.md.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import random
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from alarm_engine.codec import BadRecord, RegistryUnavailable, decode_key
from alarm_engine.config import Settings, hot_group
from alarm_engine.deadlines import fireable
from alarm_engine.engine import Out, dead_letter, in_send_order
from alarm_engine.partitioning import partition_of
from alarm_engine.pv_home import PVEntry, PVHome, decode_entry, encode_entry
from alarm_engine.worker import health, watchdog
from alarm_engine.worker.app import APP_ID, app, codec, pv_home, settings
from alarm_engine.worker.exits import EXIT_CRASHED, EXIT_SEND_FAILED, REGISTRY_RETRY_S, SEND_RETRY_S, fatal
from alarm_engine.worker.faust_internals import TableStore

log = logging.getLogger("alarm_engine")

HOT_TOPICS = ("pv-state", "alarm-deps")
#: Per input partition: the last offset of each input topic whose batch Kafka acknowledged.
FENCE_PREFIX = b"\x00applied:"
BATCH_MAX = int(os.environ.get("ALARM_ENGINE_HOT_BATCH_MAX", "5000"))
# A record that arrives is returned by the broker at once (fetch.min.bytes 1); the
# wait only bounds an idle fetch, so it can be long: an idle worker does ~2 fetches/s.
FETCH_MAX_WAIT_MS = 500
# The group's offsets are informational (the fences are the positions): committed at most this
# often while records flow, and at once when the input goes quiet. A commit per batch was a
# Kafka request per batch, a third of a slow stream's CPU with the send and the fetch.
GROUP_COMMIT_S = 1.0
PARTITION_CACHE_MAX = 1_000_000  # keys per topic; a facility has tens of thousands
TRACE = os.environ.get("ALARM_ENGINE_TRACE", "") in ("1", "true", "yes")


def fence_key(partition: int) -> bytes:
    return FENCE_PREFIX + str(partition).encode()


def now_ms() -> int:
    return int(time.time() * 1000)


class HotPath:
    def __init__(self, settings: Settings, app_id: str, store: TableStore, codec, logical: dict[str, str]):
        self.s = settings
        self.app_id = app_id
        self.store = store
        self._codec = codec  # called: created on first use, in the worker
        self.logical = logical  # topic name -> logical name, for dead letters and traces
        self.topic = {t: settings.topic(t) for t in HOT_TOPICS}
        self.home: PVHome | None = None
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.partitions: set[int] = set()
        self.epoch = 0  # assignments so far: a fetch that spans one is dropped
        self.cache: dict[tuple[int, str], PVEntry] = {}
        self.acked: dict[int, dict[str, int]] = {}  # partition -> topic -> last offset acknowledged
        self.fenced: dict[int, dict[str, int]] = {}  # partition -> the fence in the store
        # What the group has committed: a commit that failed (a broker outage) is made
        # again on the next batch or idle sweep, so that lag tools never see stale positions.
        self.group_committed: dict[TopicPartition, int] = {}
        self._committing = False
        self.deadlines: dict[str, tuple[int, str, int]] = {}  # alarm -> (partition, pv, when)
        self._partitions: dict[str, dict[bytes, int]] = {}  # topic -> key -> partition
        self._names: dict[str, str] = {}  # logical topic -> Kafka topic
        self._next_commit = 0.0  # monotonic time of the next group commit while records flow
        self._counts: dict[str, int] = {}  # topic -> partition count
        self.stream_ms: dict[int, int] = {}  # partition -> latest pv-state record time applied
        # Of the given partitions, those whose PV news the CA bridge may still hold (bridge.Bridge.held).
        self.held = lambda partitions: set()
        self.lock = asyncio.Lock()
        self._starting = asyncio.Lock()
        self.records = 0
        self.running = False  # its loop runs (for /healthz)
        self.last_record_ms: int | None = None

    # --- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Idempotent: the first assignment may come before the worker's tasks run."""
        async with self._starting:
            if self.consumer is None:
                await self._start()

    async def _start(self) -> None:
        kw = self.s.kafka_kwargs()
        producer = AIOKafkaProducer(**kw, acks="all", linger_ms=0, max_batch_size=1 << 20,
                                    max_request_size=4 << 20)
        consumer = AIOKafkaConsumer(**kw, group_id=hot_group(self.app_id), enable_auto_commit=False,
                                    auto_offset_reset="earliest", fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
                                    max_partition_fetch_bytes=4 << 20)
        await producer.start()
        await consumer.start()
        self.home = PVHome(self._codec())
        self.producer, self.consumer = producer, consumer

    async def stop(self) -> None:
        for client in (self.consumer, self.producer):
            if client is not None:
                await client.stop()

    async def assign(self, partitions: set[int]) -> None:
        """Called once Faust has recovered the table for these partitions."""
        await self.start()
        async with self.lock:
            self._drop()
            self.partitions = set(partitions)
            tps = [TopicPartition(self.topic[t], p) for t in HOT_TOPICS for p in sorted(partitions)]
            self.consumer.assign(tps)
            unfenced = []
            for p in partitions:
                fence = self._read_fence(p)
                self.fenced[p] = dict(fence)
                self.acked[p] = dict(fence)
                for t in HOT_TOPICS:
                    tp = TopicPartition(self.topic[t], p)
                    if t in fence:
                        self.consumer.seek(tp, fence[t] + 1)
                    else:
                        unfenced.append(tp)
                self._rebuild_deadlines(p)
            if unfenced:
                # One offset reset for all: each call waits out a round of the fetcher
                # (0.5-1 s measured), which a failover would pay per partition.
                await self.consumer.seek_to_beginning(*unfenced)
            log.info("hot path: partitions %s from %s", sorted(partitions),
                     {p: self.fenced[p] for p in sorted(partitions)})

    async def revoke(self) -> None:
        """Called before Faust gives the table's partitions up: the batch in hand is
        finished (sent, acknowledged, stored) first."""
        async with self.lock:
            self._drop()
            self.consumer.assign([])
            self.partitions = set()

    def lag(self) -> dict[str, int]:
        """Records not yet handled, per logical topic, over this worker's partitions
        whose end the consumer knows (for the heartbeat and /metrics)."""
        lag: dict[str, int] = {}
        if self.consumer is None:
            return lag
        for p in self.partitions:
            for t in HOT_TOPICS:
                high = self.consumer.highwater(TopicPartition(self.topic[t], p))
                if high is not None:
                    done = self.acked.get(p, {}).get(t, -1) + 1
                    lag[t] = lag.get(t, 0) + max(0, high - done)
        return lag

    def _drop(self) -> None:
        self.epoch += 1
        self.cache.clear()
        self.acked.clear()
        self.fenced.clear()
        self.group_committed.clear()
        self.deadlines.clear()
        self.stream_ms.clear()

    def _read_fence(self, p: int) -> dict[str, int]:
        raw = self.store.get(p, fence_key(p))
        return json.loads(raw) if raw else {}

    def _rebuild_deadlines(self, p: int) -> None:
        for k, v in self.store.items(p):
            if k.startswith(FENCE_PREFIX) or not v.get("alarms"):
                continue
            pv = k.decode()
            for name, a in v["alarms"].items():
                if a.get("deadline") is not None:
                    self.deadlines[name] = (p, pv, a["deadline"])

    # --- the loop -----------------------------------------------------------------

    async def run(self) -> None:
        self.running = True
        try:
            await self._loop()
        finally:
            self.running = False

    async def _loop(self) -> None:
        fault = watchdog.fault("hot_path", lambda: app.conf.datadir)
        while True:
            if fault is not None:
                fault()
            if not self.partitions:
                await asyncio.sleep(0.05)
                continue
            epoch = self.epoch
            data = await self.consumer.getmany(timeout_ms=250, max_records=BATCH_MAX)
            async with self.lock:
                if epoch != self.epoch:
                    continue  # fetched across a rebalance: read again by the owner, from its fence
                if data:
                    await self._batch(data)
                await self._sweep(idle=not data)

    def _entry(self, p: int, pv: str) -> PVEntry:
        e = self.cache.get((p, pv))
        if e is None:
            e = self.cache[(p, pv)] = decode_entry(pv, self.store.get(p, pv.encode()))
        return e

    async def _apply(self, topic: str, pv: str, msg, e: PVEntry) -> list[Out]:
        delay, deadline = 0.5, time.monotonic() + REGISTRY_RETRY_S
        while True:
            try:
                return self.home.handle(topic, pv, msg.value, msg.timestamp or now_ms(), e)
            except RegistryUnavailable as err:
                # Not a bad record: the partition waits for the registry, then gives up on it.
                if time.monotonic() + delay > deadline:
                    raise BadRecord(f"{err}; gave up after {REGISTRY_RETRY_S:.0f} s") from None
                log.warning("%s[%d]@%d waits for the schema registry: %s; retrying in %.1fs",
                            topic, msg.partition, msg.offset, err, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _rejected(self, topic: str, msg, reason: str) -> list[Out]:
        log.warning("rejected %s[%d]@%d key=%r: %s", topic, msg.partition, msg.offset, (msg.key or b"")[:80], reason)
        try:
            return [dead_letter(self.home.codec, topic, msg.partition, msg.offset, msg.key, msg.value,
                                reason, now_ms())]
        except Exception:
            log.exception("could not make the dead letter for %s[%d]@%d", topic, msg.partition, msg.offset)
            return []

    async def _batch(self, data: dict) -> None:
        outs: list[Out] = []
        dirty: dict[int, dict[str, PVEntry]] = {}
        seen: dict[int, dict[str, int]] = {}
        for tp, msgs in data.items():
            topic, p = self.logical[tp.topic], tp.partition
            if p not in self.partitions:
                continue
            for msg in msgs:
                try:
                    pv = decode_key(msg.key)
                except BadRecord as err:
                    outs += self._rejected(topic, msg, str(err))
                    continue
                e = self._entry(p, pv)
                if msg.offset <= e.offsets.get(topic, -1):
                    # Applied before a crash or a hand-over; its outputs may not have reached Kafka.
                    if TRACE:
                        log.info("trace: applied already %s[%d]@%d key %r", topic, p, msg.offset, msg.key)
                    outs += self.home.current_outputs(pv, e)
                    continue
                if TRACE:
                    log.info("trace: handle %s[%d]@%d key %r", topic, p, msg.offset, msg.key)
                try:
                    outs += await self._apply(topic, pv, msg, e)
                except BadRecord as err:
                    outs += self._rejected(topic, msg, str(err))
                    continue
                except Exception as err:  # a bug must cost one record, not the worker
                    log.exception("failed on %s[%d]@%d", topic, p, msg.offset)
                    self.cache.pop((p, pv), None)  # may be half-applied: read again from the store
                    dirty.get(p, {}).pop(pv, None)
                    outs += self._rejected(topic, msg, f"internal error: {err.__class__.__name__}: {err}")
                    continue
                e.offsets[topic] = msg.offset
                dirty.setdefault(p, {})[pv] = e
                for name, when in e.deadlines().items():
                    self.deadlines[name] = (p, pv, when)
            seen.setdefault(p, {})[topic] = msgs[-1].offset
            if topic == "pv-state" and msgs[-1].timestamp:
                self.stream_ms[p] = max(self.stream_ms.get(p, -1), max(m.timestamp for m in msgs))
            health.metrics.records_read(topic, len(msgs), msgs[-1].timestamp / 1000 if msgs[-1].timestamp else None,
                                        time.time())
        self.records += sum(len(m) for m in data.values())
        self.last_record_ms = now_ms()
        await self._commit_batch(outs, dirty, seen)

    async def _commit_batch(self, outs, dirty, seen) -> None:
        items: dict[int, dict[bytes, bytes | None]] = {}
        for p, entries in dirty.items():
            items[p] = {pv.encode(): None if e.is_empty() else encode_entry(e) for pv, e in entries.items()}
        fences = {}
        for p in set(items) | set(seen) | set(self.acked):
            if self.acked.get(p) and self.acked[p] != self.fenced.get(p):
                fences[p] = dict(self.acked[p])
                items.setdefault(p, {})[fence_key(p)] = json.dumps(fences[p]).encode()
        if not outs and not items:
            self._advance(seen, fences)
            return
        # The entries go with the first round; a handover only once everything before it
        # is acknowledged (engine.Out).
        rounds = in_send_order(outs) or [[]]
        changelog_offsets = await self._send(rounds[0], items)
        for round_ in rounds[1:]:
            await self._send(round_, {})
        for p, kv in items.items():
            self.store.write(p, kv, changelog_offsets.get(p))
        for p, entries in dirty.items():
            for pv, e in entries.items():
                if e.is_empty():
                    self.cache.pop((p, pv), None)
        self._advance(seen, fences)

    def _advance(self, seen, fences) -> None:
        self.fenced.update(fences)
        for p, topics in seen.items():
            self.acked.setdefault(p, {}).update(topics)
        if time.monotonic() >= self._next_commit:
            self._commit_pending()

    def _commit_pending(self) -> None:
        offsets = {TopicPartition(self.topic[t], p): o + 1
                   for p, ts in self.acked.items() if p in self.partitions for t, o in ts.items()}
        pending = {tp: o for tp, o in offsets.items() if self.group_committed.get(tp) != o}
        if pending and not self._committing:
            self._committing = True
            self._next_commit = time.monotonic() + GROUP_COMMIT_S
            asyncio.ensure_future(self._commit_group(pending, self.epoch))

    async def _commit_group(self, offsets, epoch: int) -> None:
        try:
            await self.consumer.commit(offsets)
            if epoch == self.epoch:
                self.group_committed.update(offsets)
        except Exception as e:  # informational only: the fences are the positions; retried
            log.debug("hot path: group commit failed: %r", e)
        finally:
            self._committing = False

    async def send(self, outs: list[Out]) -> None:
        """Records that change no state here (the CA bridge's pv-state): sent, acknowledged."""
        await self._send(outs, {})

    async def write_table(self, store: TableStore, items: dict[int, dict[bytes, bytes | None]]) -> None:
        """The control path's table writes (batches.TableView): changelog records of all
        partitions sent at once and acknowledged, then one WriteBatch per partition."""
        offsets = await self._send([], items, store.changelog)
        for p, kv in items.items():
            store.write(p, kv, offsets.get(p))

    async def _send(self, outs: list[Out], items: dict[int, dict[bytes, bytes | None]],
                    changelog: str | None = None) -> dict[int, int]:
        """Send everything, wait once; retried as a whole (a record sent twice is harmless
        on these topics, one lost is not) until SEND_RETRY_S, then exit for a restart.
        Returns the last offset written to each partition of `changelog` (the pv-home
        table's by default)."""
        delay, deadline = 0.2, time.monotonic() + SEND_RETRY_S
        changelog = changelog or self.store.changelog
        while True:
            try:
                by_tp: dict[tuple[str, int], list[tuple[bytes, bytes | None]]] = {}
                names, counts = self._names, self._counts
                for o in outs:
                    t = names.get(o.topic) or names.setdefault(o.topic, self.s.topic(o.topic))
                    if t not in counts:  # once per topic: the rest of the loop does not wait
                        counts[t] = len(await self.producer.partitions_for(t))
                    by_tp.setdefault((t, self._partition(t, o.key)), []).append((o.key, o.value))
                for p, kv in items.items():
                    by_tp.setdefault((changelog, p), []).extend(kv.items())
                last = await self._send_batches(by_tp)
                health.metrics.records_sent(collections.Counter(o.topic for o in outs))
                if items:
                    health.metrics.records_sent({"changelog": sum(len(kv) for kv in items.values())})
                return {p: last[(changelog, p)] for p in items if (changelog, p) in last}
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if time.monotonic() + delay > deadline:
                    fatal("could not send for %.0fs (%s: %s): exiting so that the worker restarts "
                          "and replays from its fences", SEND_RETRY_S, e.__class__.__name__, e,
                          code=EXIT_SEND_FAILED)
                log.warning("sending a batch failed (%s: %s); sending it again in %.1fs",
                            e.__class__.__name__, e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _partition(self, topic: str, key: bytes | None) -> int:
        """murmur2(key) mod the partition count (known: `_send` reads it first), as aiokafka's
        and Java's default partitioner, computed once per key: a batch of a flood names the
        same alarms and PVs again."""
        count = self._counts[topic]
        if key is None:  # the default partitioner's choice for no key: any partition
            return random.randrange(count)
        cache = self._partitions.setdefault(topic, {})
        p = cache.get(key)
        if p is None:
            if len(cache) > PARTITION_CACHE_MAX:
                cache.clear()
            p = cache[key] = partition_of(key, count)
        return p

    async def _send_batches(self, by_tp: dict[tuple[str, int], list]) -> dict[tuple[str, int], int]:
        """One record batch per partition (more if one fills up) instead of a send and a
        future per record; one wait for all. Returns the last offset of each partition's records."""
        sent = []
        for (t, p), records in by_tp.items():
            batch, n = self.producer.create_batch(), 0
            for k, v in records:
                if batch.append(key=k, value=v, timestamp=None) is None:  # full: send it, start another
                    sent.append(((t, p), n, await self.producer.send_batch(batch, t, partition=p)))
                    batch, n = self.producer.create_batch(), 0
                    if batch.append(key=k, value=v, timestamp=None) is None:
                        raise ValueError(f"a record of {len(v or b'')} bytes does not fit in a batch ({t})")
                n += 1
            if n:
                sent.append(((t, p), n, await self.producer.send_batch(batch, t, partition=p)))
        results = await asyncio.gather(*(f for _, _, f in sent))
        last: dict[tuple[str, int], int] = {}
        for (tp, n, _), md in zip(sent, results):
            last[tp] = max(last.get(tp, -1), md.offset + n - 1)  # a batch's metadata: its first offset
        return last

    def _settled(self) -> set[int]:
        """Partitions with no pv-state record waiting to be read (as of the last fetch)
        or to come from the CA bridge (deadlines.py)."""
        held = set(self.held(self.partitions))
        settled = set()
        for p in self.partitions:
            high = self.consumer.highwater(TopicPartition(self.topic["pv-state"], p))
            if high is not None and self.acked.get(p, {}).get("pv-state", -1) + 1 >= high and p not in held:
                settled.add(p)
        return settled

    async def _sweep(self, idle: bool) -> None:
        """Ticks for the per-PV alarms due now, through alarm-deps so that they are
        ordered with the PV's other records and replayed like them; and the fence of
        a partition that went quiet."""
        now = now_ms()
        due = [(name, *self.deadlines.pop(name)[:2])
               for name in fireable(self.deadlines, now, self.stream_ms, self._settled())]
        if due:
            await self._send([Out("alarm-deps", pv.encode(), json.dumps({"alarm": name, "tick": now}).encode())
                              for name, p, pv in due], {})
        stale = {p: dict(a) for p, a in self.acked.items() if a and a != self.fenced.get(p)}
        if idle and stale:
            items = {p: {fence_key(p): json.dumps(f).encode()} for p, f in stale.items()}
            offsets = await self._send([], items)
            for p, kv in items.items():
                self.store.write(p, kv, offsets.get(p))
            self.fenced.update(stale)
        if idle:
            self._commit_pending()


# --- in the worker ------------------------------------------------------------------

hot = HotPath(settings, APP_ID, TableStore(pv_home), codec,
              {settings.topic(t): t for t in ("pv-state", "alarm-deps")})


@app.task
async def _hot_path() -> None:
    """pv-state and alarm-deps (keyed by PV) -> active-alarms of per-PV alarms, alarm-inputs of rule alarms."""
    try:
        await hot.start()
        await hot.run()
    except asyncio.CancelledError:
        raise
    except BaseException:
        # The hot path is the engine: a worker without it must not look alive.
        fatal("the hot path failed: exiting so that the worker restarts", code=EXIT_CRASHED, exc_info=True)


@pv_home.on_recover
async def _assign_hot_path() -> None:
    actives = {tp.partition for tp in app.assignor.assigned_actives()
               if tp.topic == settings.topic("monitored-pvs")}
    await hot.assign(actives)



async def _before_revoke(revoked) -> None:
    # Faust's own handler then closes the tables' stores of the revoked partitions:
    # the hot path finishes its batch and lets go before that.
    if hot.consumer is not None:
        await hot.revoke()


app.before_revoke.append(_before_revoke)
