"""The control path's record handling: Faust agents read their input in small batches;
per batch the outputs are sent and acknowledged once, then the table writes and the
input fences are committed, then the input records are acknowledged.

A worker killed at any moment replays its input from the committed offsets; the
fences pass over what was applied already (docs/design.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from alarm_engine import partitioning
from alarm_engine.codec import BadRecord, RegistryUnavailable, decode_key
from alarm_engine.engine import Out, dead_letter, in_send_order
from alarm_engine.worker import health
from alarm_engine.worker.app import LOGICAL, OUT, app, codec, now_ms, settings
from alarm_engine.worker.exits import EXIT_SEND_FAILED, REGISTRY_RETRY_S, SEND_RETRY_S, fatal
from alarm_engine.worker.faust_internals import TableStore, acking_handled, changelog_acked, in_progress
from alarm_engine.worker.hotpath import hot
from alarm_engine.worker.trace import TRACE, tp_name, trace

log = logging.getLogger("alarm_engine")

_DELETED = object()


class TableView:
    """A Faust table (raw bytes keys) under the str-keyed mapping interface engine.py uses.

    Writes are held back until `commit()`: the agents call it only after the records
    that the new state implies have been acknowledged by Kafka. Otherwise a worker
    killed between the table write (RocksDB at once, changelog soon) and the send
    restarts with a table that already has the new state: the input is replayed, the
    state does not change, and the lost output is never sent again (an alarm lost).
    With the writes held back, a crash replays the input on the old state and the
    outputs are sent again (duplicates are harmless on compacted topics).

    Two layers: the writes of the record being handled (`keep()` adds them to the
    batch's, `discard()` drops them when that record fails), and the writes of the
    batch, which later records of the batch already see."""

    def __init__(self, table):
        self.t = table
        self.pending: dict[bytes, object] = {}
        self.batch: dict[bytes, object] = {}
        self._store: TableStore | None = None
        self._codec = None

    def _get(self, key: str):
        k = key.encode()
        if k in self.pending:
            v = self.pending[k]
        elif k in self.batch:
            v = self.batch[k][0]
        else:
            return self.t.get(k)
        return None if v is _DELETED else v

    def __getitem__(self, key):
        v = self._get(key)
        if v is None:
            raise KeyError(key)
        return v

    def get(self, key, default=None):
        v = self._get(key)
        return default if v is None else v

    def __contains__(self, key):
        return self._get(key) is not None

    def __setitem__(self, key, value):
        self.pending[key.encode()] = value

    def __delitem__(self, key):
        self.pending[key.encode()] = _DELETED

    def keep(self, event=None) -> None:
        """The record being handled succeeded: its writes join the batch's, with
        its event, whose partition is the one their changelog records go to."""
        for k, v in self.pending.items():
            self.batch[k] = (v, event)
        self.pending.clear()

    def discard(self) -> None:
        self.pending.clear()

    def abandon(self) -> None:
        """The batch failed: none of its writes are applied (its input is replayed)."""
        self.pending.clear()
        self.batch.clear()

    async def commit(self, fences: bool = False) -> None:
        """Write the batch's entries: its state (`fences=False`), then, once that
        is acknowledged, its fence entries (`fences=True`).

        Through the hot path's producer, one record batch per changelog partition and one
        wait, then one RocksDB WriteBatch per partition (hotpath.write_table), as Faust's
        recovery would apply them: a Faust table write goes through Faust's producer buffer
        one record at a time, and its stream stops whenever more than 100 wait there (the
        control path's limit). The entries stay readable from the batch until written."""
        self.keep()
        direct: dict[int, dict[bytes, bytes | None]] = {}
        for k, (v, event) in list(self.batch.items()):
            if k.startswith(FENCE_PREFIX) != fences:
                continue
            if event is None or hot.producer is None:
                # Not from a record (none are), or before the hot path has started: Faust's
                # way, whose changelog record goes to the event's partition.
                del self.batch[k]
                with in_progress(event):
                    if v is _DELETED:
                        self.t.pop(k, None)
                    else:
                        self.t[k] = v
                continue
            direct.setdefault(event.message.partition, {})[k] = None if v is _DELETED else self._dumps(v)
        if direct:
            await hot.write_table(self.store, direct)
            for kv in direct.values():
                for k in kv:
                    self.batch.pop(k, None)

    @property
    def store(self) -> TableStore:
        if self._store is None:
            self._store = TableStore(self.t)
        return self._store

    def _dumps(self, value) -> bytes:
        if self._codec is None:
            from faust.serializers import codecs

            self._codec = codecs.get_codec(self.t.value_serializer)
        return self._codec.dumps(value)


# Each agent keeps in its first table, per input partition, the offset of the last
# record it has applied from each input topic of that partition. A record at or
# below that offset has been applied already: a replay after a restart or a seek,
# or an old copy that Faust's consumer hands over again around a rebalance (the
# SIGKILL soak caught one applied after a newer record of the same partition,
# undoing it for good). Such a record is acknowledged and not applied again: an
# alarm's state only moves forward, and a replay does not make alarms flap.
# A record above the next offset means records were lost on their way to the agent
# (or the log has a hole): the consumer's missing() decides.
# The entries are written after the batch's state has been acknowledged, so a
# fence is never ahead of the state it vouches for.
FENCE_PREFIX = b"\x00applied:"


class Fence:
    def __init__(self, view: "TableView"):
        self.view = view

    @staticmethod
    def _key(partition: int) -> str:
        return (FENCE_PREFIX + str(partition).encode()).decode()

    def next_offset(self, msg):
        """The offset of the record after the last one applied from `msg`'s
        partition, or None when none has been."""
        last = (self.view.get(self._key(msg.partition)) or {}).get(msg.topic)
        return None if last is None else last + 1

    def mark(self, msg, event) -> None:
        key = self._key(msg.partition)
        self.view[key] = {**(self.view.get(key) or {}), msg.topic: msg.offset}
        self.view.keep(event)


def is_fence(key: bytes) -> bool:
    return key.startswith(FENCE_PREFIX)


async def _send_acked(o: Out) -> None:
    delay, deadline = 0.2, time.monotonic() + SEND_RETRY_S
    while True:
        try:
            fut = await OUT[o.topic].send(key=o.key, value=o.value)
            await fut  # delivered (acks=all), or raises
            return
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if time.monotonic() + delay > deadline:
                fatal("could not send to %s for %.0fs (%s: %s): exiting so that the worker "
                      "restarts and replays from its committed offsets", o.topic, SEND_RETRY_S,
                      e.__class__.__name__, e, code=EXIT_SEND_FAILED)
            log.warning("send to %s failed (%s: %s); retrying in %.1fs", o.topic, e.__class__.__name__, e, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


async def send_all(outs: list[Out]) -> None:
    """Send and wait until Kafka has acknowledged every record; handovers only once
    everything else is (engine.Out). Through the hot path's producer once it runs (one
    record batch per partition, one wait, retried as a whole), Faust's before."""
    for round_ in in_send_order(outs):
        if hot.producer is not None:
            await hot.send(round_)
        else:
            await _send_round(round_)


async def _send_round(outs: list[Out]) -> None:
    """All at once (the producer keeps the order within each partition); if any send
    fails, everything is sent again one by one, each retried until acknowledged:
    a record sent twice is harmless on these topics, a record lost is not."""
    if not outs:
        return
    try:
        futures = [await OUT[o.topic].send(key=o.key, value=o.value) for o in outs]
        await asyncio.gather(*futures)
        return
    except asyncio.CancelledError:
        raise
    except Exception as e:
        log.warning("sending %d record(s) failed (%s: %s); sending them again one by one",
                    len(outs), e.__class__.__name__, e)
    for o in outs:
        await _send_acked(o)


def rejected(msg, reason: str) -> list[Out]:
    """The dead letter of a record (logged, kept with its reason): never fatal."""
    log.warning("rejected %s[%d]@%d key=%r: %s", msg.topic, msg.partition, msg.offset,
                (msg.key or b"")[:80], reason)
    try:
        return [dead_letter(codec(), LOGICAL.get(msg.topic, msg.topic), msg.partition, msg.offset,
                            msg.key, msg.value, reason, now_ms())]
    except Exception:  # the dead letter itself failing must not stop the stream
        log.exception("could not make the dead letter for %s[%d]@%d", msg.topic, msg.partition, msg.offset)
        return []




async def outputs_of(msg, compute, views=(), event=None) -> list[Out]:
    """`compute()` gives the outputs of one record and writes to `views`; its
    writes are kept if it succeeds and dropped if it fails. A bad record, or a
    bug, gives a dead letter instead."""
    delay, deadline = 0.5, time.monotonic() + REGISTRY_RETRY_S
    while True:
        try:
            outs = compute()
        except Exception as e:
            for view in views:
                view.discard()
            if isinstance(e, BadRecord):
                return rejected(msg, str(e))
            if not isinstance(e, RegistryUnavailable):  # a bug must cost one record, not the worker
                log.exception("failed on %s[%d]@%d", msg.topic, msg.partition, msg.offset)
                return rejected(msg, f"internal error: {e.__class__.__name__}: {e}")
            if time.monotonic() + delay > deadline:
                return rejected(msg, f"{e}; gave up after {REGISTRY_RETRY_S:.0f} s")
            log.warning("%s[%d]@%d waits for the schema registry: %s; retrying in %.1fs",
                        msg.topic, msg.partition, msg.offset, e, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
            continue
        for view in views:
            view.keep(event)
        return outs


# Records are handled in batches: the outputs of a whole batch are sent together
# and acknowledged once, then the batch's table writes are committed and its input
# offsets acknowledged. A batch closes when it is full or after this wait, which
# is what a record waits at most for company. Faust's noack_take() wakes every
# `within`, also when idle: at 5 ms that was most of an idle worker's CPU. Only the
# control path waits it (operator records, and rule alarms' PV inputs); the hot
# path (per-PV alarms) reads in its own loop.
BATCH_MAX = int(os.environ.get("ALARM_ENGINE_BATCH_MAX", "500"))
BATCH_WITHIN_S = float(os.environ.get("ALARM_ENGINE_BATCH_WITHIN_MS", "50")) / 1000


async def handle_batches(stream, compute, views) -> None:
    """`compute(logical topic, key, value, message)` -> outputs of one record,
    reading and writing `views`; the first view also keeps the agent's fence.

    No input record is acknowledged before its outputs and table writes are: a
    batch interrupted anywhere (a cancelled agent, a failed send) acknowledges
    nothing, and its records are read again from the committed offsets. (Faust's
    take_events() would acknowledge the whole batch on the way out.)"""
    fence = Fence(views[0])
    consumer = app.consumer
    async for events in stream.noack_take(BATCH_MAX, within=BATCH_WITHIN_S):
        health.metrics.batch(getattr(views[0].t, "name", "?"), len(events))
        outs: list[Out] = []
        done = []  # the events to acknowledge: all but those left to a copy read again
        try:
            for event in events:
                msg = event.message
                # In a batch no event is in progress, and Faust's store would read
                # keys from whichever local partition has them.
                with in_progress(event):
                    if consumer.stale(msg):
                        # Read again from the seek position: not handled, not acknowledged.
                        if TRACE:
                            trace("stale %s@%d key %r", tp_name(msg.tp), msg.offset, msg.key)
                        consumer.leave(msg)
                        continue
                    expected = fence.next_offset(msg)
                    if expected is None:  # nothing applied from this partition yet
                        expected = consumer.first_offset(msg.tp)
                    if msg.offset < expected:
                        if TRACE:
                            trace("applied already %s@%d key %r", tp_name(msg.tp), msg.offset, msg.key)
                        done.append(event)
                        continue
                    if msg.offset > expected and not await consumer.missing(msg.tp, expected, msg.offset):
                        # Sought back to the missing record: this one is read again after it.
                        consumer.leave(msg)
                        continue
                    done.append(event)
                    if TRACE:
                        trace("handle %s@%d key %r gen %s/%s", tp_name(msg.tp), msg.offset, msg.key,
                               msg.generation_id, app.consumer_generation_id)
                    outs += await outputs_of(msg, lambda: _checked(compute, msg), views, event)
                    fence.mark(msg, event)
            await send_all(outs)
        except BaseException:
            for view in views:
                view.abandon()
            raise
        for view in views:  # only once the outputs are acknowledged
            await view.commit()
        await changelog_acked()  # then the fences, then the input is acknowledged
        await fence.view.commit(fences=True)
        await changelog_acked()
        await ack_handled(stream, done)


def _checked(compute, msg) -> list[Out]:
    topic = LOGICAL[msg.topic]
    # A record keyed into another partition than Kafka's partitioner puts it in
    # (kcat's CRC32 default) is never applied: its key's other records live elsewhere.
    reason = partitioning.wrong_partition(topic, msg.key, msg.partition, settings.partitions)
    if reason is not None:
        raise BadRecord(reason)
    return compute(topic, decode_key(msg.key), msg.value, msg)


async def ack_handled(stream, events) -> None:
    with acking_handled():
        for event in events:
            await stream.ack(event)




# Often enough that a record lost on its way to an agent in a quiet partition is
# applied within seconds; rarely enough that a commit (every few seconds) shows progress.
STALL_CHECK_S = 5.0


@app.timer(interval=STALL_CHECK_S)
async def _reread_stalled() -> None:
    await app.consumer.reread_stalled()
