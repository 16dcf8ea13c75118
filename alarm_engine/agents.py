"""The Faust app: topics, tables and agents. `faust -A alarm_engine worker`.

Data flow (each arrow a topic; tables in brackets):

  monitored-pvs --> monitored_agent [monitored] --CA bridge--> pv-state
  pv-state, alarm-deps --> router_agent [pv-latest, pv-dependents] --> alarm-inputs
  alarms, shelved-alarms, alarm-activations, alarm-inputs
      --> alarm_agent [alarm-state] --> active-alarms (+ alarm-deps)

Every topic has the same partition count so that Faust assigns the same
partition numbers of the PV-keyed topics (and of the alarm-keyed topics) to
the same worker. Agents run with concurrency=1 (faust-streaming #606 loses
offsets with more). The logic lives in engine.py and core/; this module only
moves bytes and keeps the CA subscriptions in step with the partitions.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import time
import weakref
from pathlib import Path

import faust
from faust.streams import _current_event
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.transport.drivers.aiokafka import Transport as AIOKafkaTransport

from alarm_engine import log_probe, records
from alarm_engine.codec import BadRecord, RegistryUnavailable, decode_key
from alarm_engine.config import Settings
from alarm_engine.engine import AlarmProcessor, Out, Router, dead_letter
from alarm_engine import health, internal_records, liveness, membership, partitioning, preflight, service, watchdog
from alarm_engine.config import ALL_TOPICS

log = logging.getLogger("alarm_engine")

settings = Settings.from_env()
P = settings.partitions


def _app_id(s: Settings) -> str:
    # A topic prefix isolates a whole engine (tests, staging): give it its own group and changelogs.
    prefix = s.topic_prefix.strip(".-_")
    return f"{s.app_id}-{prefix}" if prefix else s.app_id


def _credentials(s: Settings):
    if s.security_protocol == "PLAINTEXT":
        return None
    ssl_context = s.kafka_kwargs().get("ssl_context")
    if s.security_protocol.startswith("SASL"):
        return faust.SASLCredentials(username=s.sasl_username, password=s.sasl_password,
                                     ssl_context=ssl_context, mechanism=s.sasl_mechanism)
    return ssl_context


# Faust fixes the consumer's fetch_max_wait_ms at 1500. aiokafka keeps one fetch
# in flight per broker and leaves out of it the partitions that still hold
# buffered records; a record arriving on such a partition waits until that fetch
# returns, which on a quiet topic is the full wait: up to 1.5 s on every topic
# hop of the pipeline. A short wait bounds that delay (at the price of more,
# empty, fetch requests while idle).
FETCH_MAX_WAIT_MS = int(os.environ.get("ALARM_ENGINE_FETCH_MAX_WAIT_MS", "20"))


class _ConsumerThread(AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport):
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS  # read when the consumer starts
        return consumer


# Set while an agent acknowledges the input records it has handled (ack_handled).
_acking_handled = False

# ALARM_ENGINE_TRACE=1 logs every input record handled, and the consumer's seeks,
# jumps, holes, dropped copies, refused acknowledgements and commits: what it takes to follow a record
# through rebalances and restarts (the crash tests turn it on).
TRACE = os.environ.get("ALARM_ENGINE_TRACE", "") in ("1", "true", "yes")


def _trace(fmt: str, *args) -> None:
    if TRACE:
        log.info("trace: " + fmt, *args)


def _tp(tp) -> str:
    return f"{LOGICAL.get(tp.topic, tp.topic)}[{tp.partition}]"


_SEEKING = object()


class _Consumer(AIOKafkaTransport.Consumer):
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
        _trace("seek gen %s: %s", self.app.consumer_generation_id,
               {_tp(tp): self._expect.get(tp) for tp in tps})

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
                    _trace("during seek %s@%d", _tp(tp), offset)
                self._dropped.add(tp)
                continue
            if self._epoch[tp] != epochs.get(tp, 0):
                # Fetched before the last seek of its partition, or just after it:
                # not handed over, and read again from the seek position.
                if TRACE:
                    _trace("fetched across a seek %s@%d", _tp(tp), offset)
                if tp not in reread and expected is not None:
                    reread.add(tp)
                    await self._seek_back(tp, expected, same_epoch=True)
                continue
            if expected is not None and offset < expected:
                if TRACE:
                    _trace("old copy %s@%d (expected %d)", _tp(tp), offset, expected)
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
                            "reading them again", _tp(tp), position, offset - 1, e.__class__.__name__, e)
            else:
                self._holes[tp].update(log_probe.holes(position, present))
                position = self._past_holes(tp, position)
        if position >= offset:
            _trace("hole %s %d..%d", _tp(tp), expected, offset - 1)
            return True
        _trace("jump %s %d -> %d: seeking back to %d", _tp(tp), expected, offset, position)
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
                     _tp(tp), start, expected - 1)
            await self._seek_back(tp, start)

    async def _seek_back(self, tp, position: int, same_epoch: bool = False) -> None:
        """Read `tp` again from `position`; with same_epoch, records handed over
        already stay valid (none of the partition's was handed over since its seek)."""
        try:
            await (super().seek if same_epoch else self.seek)(tp, position)
        except Exception as e:  # not assigned any more: the rebalance seeks
            _trace("seek %s failed: %r", _tp(tp), e)

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
            self._probe = log_probe.LogProbe(settings.kafka_kwargs())
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
        if not _acking_handled and message.topic in LOGICAL:
            _trace("ack refused %s@%d gen %s", _tp(message.tp), message.offset, message.generation_id)
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
        _trace("commit %s: %s", ok, {_tp(tp): o for tp, o in offsets.items() if tp.topic in LOGICAL})
        return ok


class _Transport(AIOKafkaTransport):
    Consumer = _Consumer


# Faust's start-up spinner (worker at -l warn or above) sets the root logger to
# DEBUG to animate itself, so that every debug message of aiokafka and Faust is
# then built and formatted for nothing: a few per cent of the worker's CPU.
faust.Worker._setup_spinner_handler = lambda self, logger, level: None


class AlarmEngineApp(faust.App):
    def _new_transport(self):
        return _Transport(self.conf.broker_consumer, self)

    async def on_first_start(self) -> None:
        # Faust creates the data directory but not its parents.
        Path(self.conf.datadir).parent.mkdir(parents=True, exist_ok=True)
        await super().on_first_start()
        # Every topic (Faust's changelogs too) must exist, with its partition count,
        # before the consumer subscribes; a misconfiguration exits in one line.
        await preflight.run(self, settings, ALL_TOPICS + (liveness.STATUS_TOPIC,))

    async def _on_agent_error(self, agent, exc: BaseException) -> None:
        # An agent that crashed ends the worker (non-zero): never a worker with a dead agent.
        await watchdog.agent_crashed(agent, exc)

    def agent(self, channel=None, **kwargs):
        decorate = super().agent(channel, **kwargs)
        return lambda fun: decorate(watchdog.with_fault(fun, lambda: self.conf.datadir))


APP_ID = _app_id(settings)
DATA_DIR = os.environ.get("ALARM_ENGINE_DATA_DIR", f".alarm-engine-data/{APP_ID}-{socket.gethostname()}")
WEB_PORT, SAME_WEB_PORT = membership.web_port(DATA_DIR)
app = AlarmEngineApp(
    APP_ID,
    broker=";".join(f"kafka://{h.strip()}" for h in settings.bootstrap.split(",")),
    broker_credentials=_credentials(settings),
    store="rocksdb://",
    datadir=DATA_DIR,
    topic_partitions=P,
    topic_replication_factor=settings.replication,
    key_serializer="raw",
    value_serializer="raw",
    consumer_auto_offset_reset="earliest",
    producer_acks=-1,
    # `faust worker` turns the web server on unless given --without-web; a free
    # port by default lets several workers share a machine (--web-port N pins it).
    # The port is kept across restarts (membership.web_port: static membership needs it).
    web_port=WEB_PORT,
    web_bind="127.0.0.1",
    # On a rebalance, finish the records in hand (send, acknowledge, write the
    # tables) before giving the partitions up: otherwise the old owner could still
    # write a table key, or an active-alarms record, after the new owner took over.
    stream_wait_empty=True,
    table_standby_replicas=0,
    # Failover in seconds and static group membership (alarm_engine/membership.py).
    **membership.group_settings(APP_ID, DATA_DIR, static=SAME_WEB_PORT),
)


def _topic(logical: str, **kw) -> faust.TopicT:
    return app.topic(settings.topic(logical), key_type=bytes, value_type=bytes,
                     key_serializer="raw", value_serializer="raw", partitions=P, **kw)


# Outputs, by logical name (topics.ensure_topics creates them all, with their cleanup policies).
OUT = {name: _topic(name) for name in ("pv-state", "active-alarms", "dead-letters", "alarm-deps", "alarm-inputs")}

monitored_in = _topic("monitored-pvs")
pv_keyed_in = app.topic(settings.topic("pv-state"), settings.topic("alarm-deps"),
                        key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
alarm_keyed_in = app.topic(*(settings.topic(t) for t in ("alarms", "shelved-alarms", "alarm-activations",
                                                         "alarm-inputs")),
                           key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
LOGICAL = {settings.topic(t): t for t in ("monitored-pvs", "pv-state", "alarm-deps", "alarms",
                                          "shelved-alarms", "alarm-activations", "alarm-inputs")}


# Changelog records of table writes not yet acknowledged by Kafka. Faust hands them
# to its producer buffer and, before committing input offsets, "flushes" it only
# until 0.1 s pass without a send: under load an offset could be committed while
# the state it implies was still in the buffer, and a kill then lost that state
# for good (the SIGKILL soak caught it). The agents wait for these before they
# acknowledge their input.
_changelog_sends: list = []


class _Table(faust.Table):
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
            log.critical("table changelog not acknowledged (%s: %s): exiting so that the worker "
                         "restarts and replays from its committed offsets", e.__class__.__name__, e)
            logging.shutdown()
            os._exit(EXIT_SEND_FAILED)


def _table(name: str, help: str) -> faust.Table:
    # key_type bytes: raw keys (the record keys as they are); values are JSON.
    return app.tables.add(_Table(app, name=name, default=None, beacon=app.tables.beacon, partitions=P,
                                 help=help, key_type=bytes))


monitored = _table("monitored", "Monitored PVs of this worker's partitions: PV -> CA monitor mask and partition.")
pv_latest = _table("pv-latest", "Latest PV state per PV (pv-state records), for alarms that start depending on it.")
pv_dependents = _table("pv-dependents", "PV -> names of the alarms that depend on it (from alarm-deps).")
alarm_state = _table("alarm-state", "Alarm -> core state: definition, PV inputs, shelving, activation, shown.")

_codec = None


def codec():
    # Created on first use: the registry is contacted from the worker, not at import.
    global _codec
    if _codec is None:
        from alarm_engine.registry import make_codec

        _codec = make_codec(settings)
    return _codec


_DELETED = object()


class _StrKeyed:
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

    def commit(self, fences: bool = False) -> None:
        """Write the batch's entries: its state (`fences=False`), then, once that
        is acknowledged, its fence entries (`fences=True`)."""
        self.keep()
        for k, (v, event) in list(self.batch.items()):
            if k.startswith(FENCE_PREFIX) != fences:
                continue
            del self.batch[k]
            # Faust writes a table key's changelog record to the partition of the
            # event in progress: the batch is written after its events, so set it.
            with in_progress(event):
                if v is _DELETED:
                    self.t.pop(k, None)
                else:
                    self.t[k] = v


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
    def __init__(self, view: "_StrKeyed"):
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


_processor: AlarmProcessor | None = None
_router: Router | None = None
alarm_state_view = _StrKeyed(alarm_state)
router_views = (_StrKeyed(pv_latest), _StrKeyed(pv_dependents))
monitored_view = _StrKeyed(monitored)


def processor() -> AlarmProcessor:
    global _processor
    if _processor is None:
        _processor = AlarmProcessor(settings, codec(), alarm_state_view)
    return _processor


def router() -> Router:
    global _router
    if _router is None:
        _router = Router(codec(), *router_views)
    return _router


def now_ms() -> int:
    return int(time.time() * 1000)


# A send that Kafka does not acknowledge is retried with exponential backoff for this
# long; then the worker exits (non-zero) and its supervisor (`alarm-engine worker`)
# restarts it, so the unacknowledged input is processed again from the committed offset.
# Never dead-lettered: an unreachable broker is not a bad record.
SEND_RETRY_S = float(os.environ.get("ALARM_ENGINE_SEND_RETRY_S", "300"))
EXIT_SEND_FAILED = 75  # EX_TEMPFAIL


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
                log.critical("could not send to %s for %.0fs (%s: %s): exiting so that the worker "
                             "restarts and replays from its committed offsets", o.topic, SEND_RETRY_S,
                             e.__class__.__name__, e)
                logging.shutdown()
                os._exit(EXIT_SEND_FAILED)
            log.warning("send to %s failed (%s: %s); retrying in %.1fs", o.topic, e.__class__.__name__, e, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


async def send_all(outs: list[Out]) -> None:
    """Send and wait until Kafka has acknowledged every record.

    All at once (the producer keeps the order within each partition); if any send
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


# A record whose writer schema cannot be fetched (registry down) is not a bad
# record: its partition waits and retries with backoff for this long, and only
# then is the record dead-lettered (with that reason) so that the partition moves on.
REGISTRY_RETRY_S = float(os.environ.get("ALARM_ENGINE_REGISTRY_RETRY_S", "300"))


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
# is what a record waits at most for company on each hop.
BATCH_MAX = int(os.environ.get("ALARM_ENGINE_BATCH_MAX", "500"))
BATCH_WITHIN_S = float(os.environ.get("ALARM_ENGINE_BATCH_WITHIN_MS", "5")) / 1000


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
                            _trace("stale %s@%d key %r", _tp(msg.tp), msg.offset, msg.key)
                        consumer.leave(msg)
                        continue
                    expected = fence.next_offset(msg)
                    if expected is None:  # nothing applied from this partition yet
                        expected = consumer.first_offset(msg.tp)
                    if msg.offset < expected:
                        if TRACE:
                            _trace("applied already %s@%d key %r", _tp(msg.tp), msg.offset, msg.key)
                        done.append(event)
                        continue
                    if msg.offset > expected and not await consumer.missing(msg.tp, expected, msg.offset):
                        # Sought back to the missing record: this one is read again after it.
                        consumer.leave(msg)
                        continue
                    done.append(event)
                    if TRACE:
                        _trace("handle %s@%d key %r gen %s/%s", _tp(msg.tp), msg.offset, msg.key,
                               msg.generation_id, app.consumer_generation_id)
                    outs += await outputs_of(
                        msg, lambda: compute(LOGICAL[msg.topic], decode_key(msg.key), msg.value, msg), views, event)
                    fence.mark(msg, event)
            await send_all(outs)
        except BaseException:
            for view in views:
                view.abandon()
            raise
        for view in views:  # only once the outputs are acknowledged
            view.commit()
        await changelog_acked()  # then the fences, then the input is acknowledged
        fence.view.commit(fences=True)
        await changelog_acked()
        await ack_handled(stream, done)


async def ack_handled(stream, events) -> None:
    global _acking_handled
    _acking_handled = True
    try:
        for event in events:
            await stream.ack(event)
    finally:
        _acking_handled = False


# --- the CA bridge ------------------------------------------------------------

class Bridge:
    """Keeps the CA subscriptions equal to the monitored PVs of the partitions
    this worker owns: subscribe on assign, clear on revoke."""

    def __init__(self):
        self.monitor = None
        self.partition_of: dict[str, int] = {}

    def _mon(self):
        if self.monitor is None:
            from alarm_engine.ca_monitor import CAMonitor

            self.monitor = CAMonitor(self.on_state, asyncio.get_running_loop(),
                                     connect_grace_s=settings.connect_grace_s)
        return self.monitor

    def on_state(self, pv: str, state) -> None:
        if pv not in self.partition_of:
            return  # late event of a PV just dropped
        value = codec().encode("pv-state", records.pv_state_datum(state))
        asyncio.ensure_future(OUT["pv-state"].send(key=pv.encode(), value=value))

    def add(self, pv: str, mask, partition: int) -> None:
        self.partition_of[pv] = partition
        self._mon().subscribe(pv, frozenset(mask))

    def remove(self, pv: str) -> None:
        self.partition_of.pop(pv, None)
        if self.monitor is not None:
            self.monitor.unsubscribe(pv)

    def sync(self, wanted: dict[str, tuple[list, int]]) -> None:
        for pv in set(self.partition_of) - set(wanted):
            self.remove(pv)
        for pv, (mask, partition) in wanted.items():
            self.add(pv, mask, partition)

    def revoke(self, partitions: set[int]) -> None:
        for pv, p in list(self.partition_of.items()):
            if p in partitions:
                self.remove(pv)


bridge = Bridge()


def _monitored_outputs(topic: str, pv: str, value: bytes | None, msg) -> list[Out]:
    datum = codec().decode("monitored-pvs", value)
    if datum is None:
        del monitored_view[pv]
        bridge.remove(pv)
        return [Out("pv-state", msg.key, None)]
    mask = sorted(records.monitor_mask(datum))
    monitored_view[pv] = {"mask": mask, "partition": msg.partition}
    bridge.add(pv, mask, msg.partition)
    return []


@app.agent(monitored_in, concurrency=1)
async def monitored_agent(stream):
    """monitored-pvs -> CA subscriptions; removal also clears the PV's state."""
    await handle_batches(stream, partitioning.checked(_monitored_outputs, P), (monitored_view,))


@monitored.on_recover
async def _resubscribe() -> None:
    actives = {tp.partition for tp in app.assignor.assigned_actives()
               if tp.topic == settings.topic("monitored-pvs")}
    wanted = {k.decode(): (v["mask"], v["partition"]) for k, v in monitored.items()
              if v and not is_fence(k) and v["partition"] in actives}
    bridge.sync(wanted)
    log.info("CA bridge: %d PV(s) subscribed for partitions %s", len(wanted), sorted(actives))


@app.on_partitions_revoked.connect
async def _on_revoked(sender, revoked, **kwargs) -> None:
    gone = {tp.partition for tp in revoked if tp.topic == settings.topic("monitored-pvs")}
    if gone:
        bridge.revoke(gone)


@app.agent(pv_keyed_in, concurrency=1)
async def router_agent(stream):
    """pv-state and alarm-deps (keyed by PV) -> alarm-inputs (keyed by alarm)."""
    await handle_batches(stream, internal_records.checked(lambda topic, key, value, msg: router().handle(topic, key, value)),
                         router_views)


def _alarm_outputs(topic: str, key: str, value: bytes | None, msg) -> list[Out]:
    # Record time, not wall-clock time: a replay decides as the first pass did.
    ts = int(msg.timestamp * 1000) if msg.timestamp else now_ms()
    return processor().handle(topic, key, value, ts)


@app.agent(alarm_keyed_in, concurrency=1)
async def alarm_agent(stream):
    """Definitions, shelving, activations and PV inputs -> active-alarms."""
    await handle_batches(stream, partitioning.checked(internal_records.checked(_alarm_outputs), P), (alarm_state_view,))


@alarm_state.on_recover
async def _rebuild_timers() -> None:
    processor().rebuild_deadlines((k.decode(), v) for k, v in alarm_state.items() if v and not is_fence(k))


@app.timer(interval=0.25)
async def _expire_shelving() -> None:
    """Ticks through alarm-inputs, so expiry is ordered with the alarm's other events."""
    if _processor is not None and _processor.deadlines:
        await send_all(_processor.due(now_ms()))


# Often enough that a record lost on its way to an agent in a quiet partition is
# applied within seconds; rarely enough that a commit (every few seconds) shows progress.
STALL_CHECK_S = 5.0


@app.timer(interval=STALL_CHECK_S)
async def _reread_stalled() -> None:
    await app.consumer.reread_stalled()


@app.on_partitions_revoked.connect
async def _drop_timers(sender, revoked, **kwargs) -> None:
    if _processor is not None and any(tp.topic == settings.topic("alarms") for tp in revoked):
        # Rebuilt from the table for the partitions kept, on recovery.
        _processor.deadlines.clear()


# The worker as a service: heartbeat, /healthz and /metrics, crash watch, quiet logs.
heartbeat = service.install(app, settings, LOGICAL, {settings.topic(t): t for t in OUT}, bridge,
                            app.conf.consumer_group_instance_id or f"{APP_ID}-{socket.gethostname()}-{os.getpid()}")
