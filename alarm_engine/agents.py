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
import logging
import os
import socket
import time
from pathlib import Path

import faust

from alarm_engine import records
from alarm_engine.codec import BadRecord, RegistryUnavailable, decode_key
from alarm_engine.config import Settings
from alarm_engine.engine import AlarmProcessor, Out, Router, dead_letter
from alarm_engine.topics import ensure_topics

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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class AlarmEngineApp(faust.App):
    async def on_first_start(self) -> None:
        # Faust creates the data directory but not its parents.
        Path(self.conf.datadir).parent.mkdir(parents=True, exist_ok=True)
        await super().on_first_start()
        # Input and output topics must exist before the consumer subscribes.
        await ensure_topics(settings)


APP_ID = _app_id(settings)
app = AlarmEngineApp(
    APP_ID,
    broker=";".join(f"kafka://{h.strip()}" for h in settings.bootstrap.split(",")),
    broker_credentials=_credentials(settings),
    store="rocksdb://",
    datadir=os.environ.get("ALARM_ENGINE_DATA_DIR", f".alarm-engine-data/{APP_ID}-{socket.gethostname()}"),
    topic_partitions=P,
    topic_replication_factor=settings.replication,
    key_serializer="raw",
    value_serializer="raw",
    consumer_auto_offset_reset="earliest",
    producer_acks=-1,
    # `faust worker` turns the web server on unless given --without-web; a free
    # port by default lets several workers share a machine (--web-port N pins it).
    web_port=int(os.environ.get("ALARM_ENGINE_WEB_PORT") or _free_port()),
    web_bind="127.0.0.1",
    stream_wait_empty=False,
    table_standby_replicas=0,
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


def _table(name: str, help: str) -> faust.Table:
    # key_type bytes: raw keys (the record keys as they are); values are JSON.
    return app.Table(name, default=None, partitions=P, help=help, key_type=bytes)


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
    outputs are sent again (duplicates are harmless on compacted topics)."""

    def __init__(self, table):
        self.t = table
        self.pending: dict[bytes, object] = {}

    def _get(self, key: str):
        k = key.encode()
        if k in self.pending:
            v = self.pending[k]
            return None if v is _DELETED else v
        return self.t.get(k)

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

    def commit(self) -> None:
        for k, v in self.pending.items():
            if v is _DELETED:
                self.t.pop(k, None)
            else:
                self.t[k] = v
        self.pending.clear()

    def discard(self) -> None:
        self.pending.clear()


_processor: AlarmProcessor | None = None
_router: Router | None = None
alarm_state_view = _StrKeyed(alarm_state)
router_views = (_StrKeyed(pv_latest), _StrKeyed(pv_dependents))


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
    """Send and wait until Kafka has acknowledged every record (in order)."""
    for o in outs:
        await _send_acked(o)


async def reject(msg, reason: str) -> None:
    """Dead-letter a record: logged, kept with its reason, never fatal."""
    log.warning("rejected %s[%d]@%d key=%r: %s", msg.topic, msg.partition, msg.offset,
                (msg.key or b"")[:80], reason)
    try:
        await send_all([dead_letter(codec(), LOGICAL.get(msg.topic, msg.topic), msg.partition, msg.offset,
                                    msg.key, msg.value, reason, now_ms())])
    except Exception:  # the dead-letter topic itself failing must not stop the stream
        log.exception("could not write the dead letter for %s[%d]@%d", msg.topic, msg.partition, msg.offset)


# A record whose writer schema cannot be fetched (registry down) is not a bad
# record: its partition waits and retries with backoff for this long, and only
# then is the record dead-lettered (with that reason) so that the partition moves on.
REGISTRY_RETRY_S = float(os.environ.get("ALARM_ENGINE_REGISTRY_RETRY_S", "300"))


async def _guarded(msg, handle) -> None:
    delay, deadline = 0.5, time.monotonic() + REGISTRY_RETRY_S
    while True:
        try:
            await handle()
            return
        except RegistryUnavailable as e:
            if time.monotonic() + delay > deadline:
                await reject(msg, f"{e}; gave up after {REGISTRY_RETRY_S:.0f} s")
                return
            log.warning("%s[%d]@%d waits for the schema registry: %s; retrying in %.1fs",
                        msg.topic, msg.partition, msg.offset, e, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
        except BadRecord as e:
            await reject(msg, str(e))
            return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug must cost one record, not the worker
            log.exception("failed on %s[%d]@%d", msg.topic, msg.partition, msg.offset)
            await reject(msg, f"internal error: {e.__class__.__name__}: {e}")
            return


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


@app.agent(monitored_in, concurrency=1)
async def monitored_agent(stream):
    """monitored-pvs -> CA subscriptions; removal also clears the PV's state."""
    async for event in stream.events():
        msg = event.message

        async def handle():
            pv = decode_key(msg.key)
            datum = codec().decode("monitored-pvs", msg.value)
            if datum is None:
                monitored.pop(msg.key, None)
                bridge.remove(pv)
                await OUT["pv-state"].send(key=msg.key, value=None)
                return
            mask = sorted(records.monitor_mask(datum))
            monitored[msg.key] = {"mask": mask, "partition": msg.partition}
            bridge.add(pv, mask, msg.partition)

        await _guarded(msg, handle)


@monitored.on_recover
async def _resubscribe() -> None:
    actives = {tp.partition for tp in app.assignor.assigned_actives()
               if tp.topic == settings.topic("monitored-pvs")}
    wanted = {k.decode(): (v["mask"], v["partition"]) for k, v in monitored.items()
              if v and v["partition"] in actives}
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
    async for event in stream.events():
        msg = event.message

        async def handle():
            key = decode_key(msg.key)
            try:
                await send_all(router().handle(LOGICAL[msg.topic], key, msg.value))
            except BaseException:
                for view in router_views:
                    view.discard()
                raise
            for view in router_views:  # only once the outputs are acknowledged
                view.commit()

        await _guarded(msg, handle)


@app.agent(alarm_keyed_in, concurrency=1)
async def alarm_agent(stream):
    """Definitions, shelving, activations and PV inputs -> active-alarms."""
    async for event in stream.events():
        msg = event.message

        async def handle():
            key = decode_key(msg.key)
            ts = int(msg.timestamp * 1000) if msg.timestamp else now_ms()
            try:
                await send_all(processor().handle(LOGICAL[msg.topic], key, msg.value, ts))
            except BaseException:
                alarm_state_view.discard()
                raise
            alarm_state_view.commit()  # only once the outputs are acknowledged

        await _guarded(msg, handle)


@alarm_state.on_recover
async def _rebuild_timers() -> None:
    processor().rebuild_deadlines((k.decode(), v) for k, v in alarm_state.items() if v)


@app.timer(interval=0.25)
async def _expire_shelving() -> None:
    """Ticks through alarm-inputs, so expiry is ordered with the alarm's other events."""
    if _processor is not None and _processor.deadlines:
        await send_all(_processor.due(now_ms()))


@app.on_partitions_revoked.connect
async def _drop_timers(sender, revoked, **kwargs) -> None:
    if _processor is not None and any(tp.topic == settings.topic("alarms") for tp in revoked):
        # Rebuilt from the table for the partitions kept, on recovery.
        _processor.deadlines.clear()
