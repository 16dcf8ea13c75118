"""Everything that leans on faust-streaming internals, in one place. faust-streaming is
pinned to 0.15.3 in pyproject.toml: each piece below depends on private attributes
or behaviour of that version, and says why it is needed.

- `Consumer`: Faust's consumer made to hand each input partition of the Faust agents
  (the control path) over in offset order and to commit only handled offsets; the
  hot path (hotpath.py) reads its topics with its own aiokafka consumer and needs none of it.
- `Table`: a table whose changelog sends can be awaited (`changelog_acked`).
- `TableStore`: the hot path's direct, batched access to a table's RocksDB store.
- `in_progress`: Faust's "event in progress", which decides a table write's partition.
- the start-up spinner, which costs CPU for nothing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import weakref

import faust
import rocksdict
from faust.serializers import codecs
from faust.streams import _current_event
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.transport.drivers.aiokafka import Transport as AIOKafkaTransport
from faust.types import TP

from alarm_engine import log_probe
from alarm_engine.worker.exits import EXIT_SEND_FAILED, SEND_RETRY_S, fatal
from alarm_engine.worker.trace import LOGICAL, TRACE, trace, tp_name

log = logging.getLogger("alarm_engine")

#: The client settings of the log probe (set by app.py).
KAFKA_KWARGS: dict = {}



class _Acking:
    """Set while an agent acknowledges the input records it has handled (batches.ack_handled)."""

    on = False


_acking = _Acking()


@contextlib.contextmanager
def acking_handled():
    _acking.on = True
    try:
        yield
    finally:
        _acking.on = False


# Faust fixes the consumer's fetch_max_wait_ms at 1500. aiokafka keeps one fetch
# in flight per broker and leaves out of it the partitions that still hold
# buffered records; a record arriving on such a partition waits until that fetch
# returns, which on a quiet topic is the full wait: up to 1.5 s on every topic
# hop of the pipeline. A shorter wait bounds that delay, at the price of more,
# empty, fetch requests while idle (20 ms: 50 a second, a few per cent of a core).
# These are the control path's topics; the hot path has its own consumer.
FETCH_MAX_WAIT_MS = int(os.environ.get("ALARM_ENGINE_FETCH_MAX_WAIT_MS", "100"))


class _ConsumerThread(AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport):
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS  # read when the consumer starts
        return consumer


_SEEKING = object()


class Consumer(AIOKafkaTransport.Consumer):
    """Faust's consumer, made to hand each input partition over in offset order,
    and to commit only offsets below which every record was handled.

    Faust hands a fetched batch over record by record, awaiting each, and a seek
    in between (every rebalance ends with a seek to the committed offsets) does not
    stop it; it also drops records on their way to the agents when a rebalance
    starts, although the fetch position has moved past them, and its commit
    passes over one missing record at the committed offset. Records then arrived
    out of order, or never, and were committed as if handled: the SIGKILL soak,
    traced, showed all of it. Here, for each input partition:
    - while a seek is under way none of its records is handed over (those that
      arrived meanwhile are read again from the seek position), and a record
      handed over before the seek is `stale()`: the agents leave it to the copy
      read again; an offset below the next expected one is an old copy and is not
      handed over;
    - the agents check that the records they apply follow each other (their
      fence knows the last one applied) and call `missing()` on a jump: unless
      Kafka, asked directly, has no records there (compaction, retention), it
      seeks back to the first missing record;
    - an offset is committed only when every record below it was acknowledged
      or is in such a hole (`_new_offset`).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._epoch: collections.defaultdict = collections.defaultdict(int)  # tp -> seeks so far
        self._handed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # message -> epoch
        self._expect: dict = {}  # tp -> offset of the next record to hand over (None: any)
        self._holes: collections.defaultdict = collections.defaultdict(dict)  # tp -> {first: end}: not in the log
        self._probe: log_probe.LogProbe | None = None  # reads offsets straight from Kafka (missing())
        self._stalled: dict = {}  # tp -> (committed, expected) at the last reread_stalled()
        self._seek_read: dict = {}  # tp -> (epoch, Faust's read position) after its last seek
        self._dropped: set = set()  # partitions whose records arrived while a seek was under way

    def _new_consumer_thread(self):
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def stale(self, message) -> bool:
        """Handed over before a later seek of its partition (it will be read again)."""
        return self._handed.get(message, self._epoch[message.tp]) != self._epoch[message.tp]

    def _seeking(self, tp) -> None:
        # Until the seek is done, which records are from before it is unknown: none is
        # handed over, and the ones handed over already are stale.
        self._epoch[tp] += 1
        self._expect[tp] = _SEEKING
        self._dropped.discard(tp)

    async def _sought(self, tp, position: int) -> None:
        if self._seek_read.get(tp, (None,))[0] != self._epoch[tp]:
            self._expect[tp] = position
            self._seek_read[tp] = (self._epoch[tp], self._read_offset.get(tp))
        if tp in self._dropped:
            # Records dropped during the seek may have been from after it: read them again.
            self._dropped.discard(tp)
            await super().seek(tp, position)

    async def perform_seek(self) -> None:
        tps = [tp for tp in self.assignment() if tp.topic in LOGICAL]
        for tp in tps:
            self._seeking(tp)
        try:
            await super().perform_seek()
            # At once, before anything else can run: a record handed over before the
            # seek may finish its hand-over any time now and move Faust's read position.
            committed = {tp: self._read_offset.get(tp) for tp in tps}
            for tp in tps:
                self._expect[tp] = committed[tp] or 0
                self._seek_read[tp] = (self._epoch[tp], committed[tp])
            for tp in tps:
                if not committed[tp]:
                    # aiokafka seeks only to committed offsets > 0; read this one from the start.
                    self._dropped.add(tp)
                await self._sought(tp, committed[tp] or 0)
        finally:
            for tp in tps:  # a failed seek: the rebalance that made it fail seeks again
                if self._expect.get(tp) is _SEEKING:
                    self._expect[tp] = None
        trace("seek gen %s: %s", self.app.consumer_generation_id,
               {tp_name(tp): self._expect.get(tp) for tp in tps})

    async def seek(self, partition, offset: int) -> None:
        if partition.topic not in LOGICAL:
            return await super().seek(partition, offset)
        self._seeking(partition)
        try:
            await super().seek(partition, offset)
            await self._sought(partition, offset)
        finally:
            if self._expect.get(partition) is _SEEKING:
                self._expect[partition] = None

    async def getmany(self, timeout: float):
        epochs = dict(self._epoch)  # before the fetch: a record of a partition sought since may be from before
        reread = set()
        async for tp, message in super().getmany(timeout):
            if tp.topic not in LOGICAL:
                yield tp, message
                continue
            expected, offset = self._expect.get(tp), message.offset
            if expected is _SEEKING:
                if TRACE:
                    trace("during seek %s@%d", tp_name(tp), offset)
                self._dropped.add(tp)
                continue
            if self._epoch[tp] != epochs.get(tp, 0):
                # Fetched before the last seek of its partition, or just after it:
                # not handed over, and read again from the seek position.
                if TRACE:
                    trace("fetched across a seek %s@%d", tp_name(tp), offset)
                if tp not in reread and expected is not None:
                    reread.add(tp)
                    await self._seek_back(tp, expected, same_epoch=True)
                continue
            if expected is not None and offset < expected:
                if TRACE:
                    trace("old copy %s@%d (expected %d)", tp_name(tp), offset, expected)
                continue
            self._expect[tp] = offset + 1
            epoch = self._handed[message] = self._epoch[tp]
            yield tp, message
            seek_epoch, read = self._seek_read.get(tp, (None, None))
            if self._epoch[tp] != epoch and seek_epoch == self._epoch[tp]:
                # A seek finished while this record was handed over, and Faust then
                # set the read position to this record: put the seek's back.
                self._read_offset[tp] = read

    def first_offset(self, tp) -> int:
        """The committed offset of `tp`: the first record not known to be handled."""
        return self._committed_offset.get(tp) or 0

    async def missing(self, tp, expected: int, offset: int) -> bool:
        """An agent got `offset` where `expected` was next. Either the log has no
        records in between (Kafka, asked directly, says so): True. Or they were lost
        on their way to the agent: seek back to them, and False (the agent leaves
        the record to the copy read again)."""
        position = self._past_holes(tp, expected)
        if position < offset:
            try:
                present = await self._log().offsets(tp.topic, tp.partition, position, offset)
            except Exception as e:
                log.warning("%s: could not read offsets %d..%d from Kafka to check them (%s: %s); "
                            "reading them again", tp_name(tp), position, offset - 1, e.__class__.__name__, e)
            else:
                self._holes[tp].update(log_probe.holes(position, present))
                position = self._past_holes(tp, position)
        if position >= offset:
            trace("hole %s %d..%d", tp_name(tp), expected, offset - 1)
            return True
        trace("jump %s %d -> %d: seeking back to %d", tp_name(tp), expected, offset, position)
        await self._seek_back(tp, position)
        return False

    async def reread_stalled(self) -> None:
        """Called every STALL_CHECK_S. Records handed over and then lost on their way
        (see missing()) show as a jump only when a later record of the partition
        reaches the agent; if none comes, the commit waits before them for good (a
        quiet partition could keep an alarm's last change from being applied). A
        partition whose records were handed over past its committed offset, with no
        commit, no new record, and nothing in hand or acknowledged since the last
        check, is read again from its committed offset (records applied already
        are passed over by the fences)."""
        if self.app.rebalancing:
            # Until the rebalance's seek, the committed offsets are not known yet.
            self._stalled.clear()
            return
        in_hand = {m.tp for m in list(self._unacked_messages)}
        for tp in self.assignment():
            if tp.topic not in LOGICAL:
                continue
            expected, start = self._expect.get(tp), self.first_offset(tp)
            if not isinstance(expected, int) or expected <= start or tp in in_hand or self._acked.get(tp):
                self._stalled.pop(tp, None)
                continue
            if self._stalled.get(tp) != (start, expected):
                self._stalled[tp] = (start, expected)
                continue
            del self._stalled[tp]
            log.info("%s: records %d..%d were handed over but not handled; reading them again",
                     tp_name(tp), start, expected - 1)
            await self._seek_back(tp, start)

    async def _seek_back(self, tp, position: int, same_epoch: bool = False) -> None:
        """Read `tp` again from `position`; with same_epoch, records handed over
        already stay valid (none of the partition's was handed over since its seek)."""
        try:
            await (super().seek if same_epoch else self.seek)(tp, position)
        except Exception as e:  # not assigned any more: the rebalance seeks
            trace("seek %s failed: %r", tp_name(tp), e)

    def leave(self, message) -> None:
        """An agent leaves `message` to a copy read again: rebalances need not wait for it."""
        self._unacked_messages.discard(message)

    def _past_holes(self, tp, position: int) -> int:
        holes = self._holes.get(tp)
        while holes and position in holes:
            position = holes[position]
        return position

    def _log(self) -> log_probe.LogProbe:
        if self._probe is None:
            self._probe = log_probe.LogProbe(KAFKA_KWARGS)
        return self._probe

    async def on_stop(self) -> None:
        await super().on_stop()
        if self._probe is not None:
            await self._probe.close()

    def ack(self, message) -> bool:
        # Faust also acknowledges records that no agent handled: those it skips
        # while a rebalance holds the flow or because they were fetched in an
        # earlier rebalance generation. A commit could then pass over a record that
        # was never processed (its effect lost for good). An input record is
        # acknowledged only by the agent that handled it; a skipped one stays
        # unacknowledged, so the commit stops before it and the seek to the
        # committed offsets after the rebalance reads it again.
        if not _acking.on and message.topic in LOGICAL:
            trace("ack refused %s@%d gen %s", tp_name(message.tp), message.offset, message.generation_id)
            return False
        return super().ack(message)

    def _new_offset(self, tp):
        # Faust's version commits over a missing record at the committed offset
        # (it lets the acknowledged offsets start one past it), and over the offsets
        # its read position skipped (its "gaps"), handled or not. Here the offset
        # moves only over acknowledged records and holes in the log.
        if tp.topic not in LOGICAL:
            return super()._new_offset(tp)
        acked = self._acked[tp]
        start = position = self.first_offset(tp)
        holes = self._holes.get(tp)
        acked.sort()
        i = 0
        while True:
            while i < len(acked) and acked[i] < position:
                i += 1
            if i < len(acked) and acked[i] == position:
                position += 1
                i += 1
            elif holes and position in holes:
                position = holes.pop(position)
            else:
                break
        if holes:
            for first in [first for first in holes if first < position]:
                del holes[first]
        self._acked_index[tp].difference_update(acked[:i])
        del acked[:i]
        return position if position > start else None

    async def _add_gap(self, tp, offset_from: int, offset_to: int) -> None:
        # Input partitions: holes are confirmed by missing(), not guessed from reads.
        if tp.topic not in LOGICAL:
            await super()._add_gap(tp, offset_from, offset_to)

    async def _commit(self, offsets) -> bool:
        ok = await super()._commit(offsets)
        trace("commit %s: %s", ok, {tp_name(tp): o for tp, o in offsets.items() if tp.topic in LOGICAL})
        return ok


class Transport(AIOKafkaTransport):
    Consumer = Consumer


# Faust's start-up spinner (worker at -l warn or above) sets the root logger to
# DEBUG to animate itself, so that every debug message of aiokafka and Faust is
# then built and formatted for nothing: a few per cent of the worker's CPU.
faust.Worker._setup_spinner_handler = lambda self, logger, level: None


# Changelog records of table writes not yet acknowledged by Kafka. Faust hands them
# to its producer buffer and, before committing input offsets, "flushes" it only
# until 0.1 s pass without a send: under load an offset could be committed while
# the state it implies was still in the buffer, and a kill then lost that state
# for good (the SIGKILL soak caught it). The agents wait for these before they
# acknowledge their input.
_changelog_sends: list = []


class _JsonModule(codecs.Codec):
    """The tables' values as the json module writes and reads them.

    Faust's own "json" codec switches to orjson whenever orjson is importable (the
    engine uses it for pv-home entries), and orjson writes NaN and the infinities as
    null and refuses them when reading: a rule alarm's PV input at NaN (common in
    EPICS) would come back as None, and a table written before could not be read."""

    def _loads(self, s: bytes):
        return json.loads(s)

    def _dumps(self, s) -> bytes:
        return json.dumps(s, separators=(",", ":")).encode()


TABLE_CODEC = "alarm-engine-json"
codecs.register(TABLE_CODEC, _JsonModule())


class Table(faust.Table):
    def _serializer_from_type(self, typ):
        serializer = super()._serializer_from_type(typ)
        return TABLE_CODEC if serializer == "json" else serializer

    def send_changelog(self, *args, **kwargs):
        fut = super().send_changelog(*args, **kwargs)
        _changelog_sends.append(fut)
        return fut


async def changelog_acked() -> None:
    """Wait until Kafka has acknowledged every table write made so far."""
    while _changelog_sends:
        pending = _changelog_sends[:]
        del _changelog_sends[:]
        try:
            await asyncio.wait_for(asyncio.gather(*pending), SEND_RETRY_S)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            # Unacknowledged state must not be followed by a committed offset:
            # exit, and the supervisor restarts the worker from its committed offsets.
            fatal("table changelog not acknowledged (%s: %s): exiting so that the worker "
                  "restarts and replays from its committed offsets", e.__class__.__name__, e,
                  code=EXIT_SEND_FAILED)


@contextlib.contextmanager
def in_progress(event):
    """Make `event` Faust's event in progress: the RocksDB store reads a key from its
    partition, and a table write's changelog record goes to its partition."""
    if event is None:
        yield
        return
    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


# Direct access to a Faust RocksDB table's store.
#
# The hot path (hotpath.py) reads and writes a Faust table itself, a batch at a
# time, instead of through `table[key] = value`: Faust's per-write path (one
# changelog send through its producer buffer, one RocksDB put, one persisted-offset
# put per acknowledgement) is most of the CPU of a record (docs/performance.md).
# The table stays Faust's: the same RocksDB files, the same changelog topic and
# partitions, so Faust's assignment, recovery and `faust tables` work unchanged.
# What this needs from Faust: the store's per-partition database
# (`Store._db_for_partition`, opened by Faust on assignment and recovery) and
# `set_persisted_offset`, which tells Faust's recovery where the changelog is
# already applied locally.
class TableStore:
    def __init__(self, table):
        self.table = table

    @property
    def changelog(self) -> str:
        return self.table.changelog_topic.get_topic_name()

    def _db(self, partition: int):
        return self.table.data._db_for_partition(partition)

    def get(self, partition: int, key: bytes) -> bytes | None:
        return self._db(partition).get(key)

    def write(self, partition: int, items: dict[bytes, bytes | None], changelog_offset: int | None) -> None:
        """One WriteBatch; then the changelog offset it corresponds to."""
        batch = rocksdict.WriteBatch(raw_mode=True)
        for k, v in items.items():
            if v is None:
                batch.delete(k)
            else:
                batch.put(k, v)
        db = self._db(partition)
        db.write(batch)
        if changelog_offset is not None:
            self.table.data.set_persisted_offset(TP(self.changelog, partition), changelog_offset)

    def items(self, partition: int):
        """(key, decoded value) of one partition, Faust's own offset key left out."""
        offset_key = self.table.data.offset_key
        for k, v in self._db(partition).items():
            if k != offset_key:
                yield k, json.loads(v)
