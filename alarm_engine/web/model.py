"""What the page shows, and the plain consumer that keeps it up to date.

`LiveState` is pure: topic records (already decoded) in, rows and changes out.
`Feed` reads the topics with a plain aiokafka consumer (no group: any number of
web processes can run beside any number of workers), and says how fresh its
view is (connection, lag, last contact) so the page can warn when it is stale.
When Kafka or the registry is unreachable the last known state stays, and the
feed goes on from the offsets it had once they answer again.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field

from alarm_engine import history
from alarm_engine.config import Settings, engine_app_id

log = logging.getLogger(__name__)

TOPICS = ("alarms", "active-alarms", "shelved-alarms", "alarm-locations", history.TOPIC)
#: Written by later parts of the engine than the others: the page works without them (and looks again).
OPTIONAL = (history.TOPIC, "alarm-locations")
PRIORITY_ORDER = {"P1_LIFE": 1, "P2_PROPERTY": 2, "P3_PRODUCTIVITY": 3, "P4_DIAGNOSTIC": 4}


def _jsonable(v):
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def producer_text(p: dict) -> str:
    if "pv" in p:
        return f"PV {p['pv']}"
    if "expression" in p:
        return f"rule {p['expression']}"
    return f"external {p.get('source', '')}".strip()


@dataclass
class LiveState:
    """The alarms as the topics say now; history entries of the recent window."""

    history_window_ms: int = 86_400_000
    history_max: int = 200_000
    definitions: dict[str, dict] = field(default_factory=dict)
    active: dict[str, dict] = field(default_factory=dict)
    shelved: dict[str, dict] = field(default_factory=dict)
    parents: dict[str, str | None] = field(default_factory=dict)  # the alarm-locations tree
    entries: collections.deque = field(default_factory=collections.deque)
    _sources: set = field(default_factory=set)

    def row(self, name: str) -> dict | None:
        """An active alarm as the table shows it (None: not active)."""
        a = self.active.get(name)
        if a is None:
            return None
        d = self.definitions.get(name, {})
        shelf = a.get("shelving") or {}
        ack, off = a.get("ack") or {}, a.get("disabled") or {}
        by = shelf.get("user", "") or off.get("user", "") or (ack.get("user", "") if a.get("ackState") == "ACK" else "")
        return {
            **_jsonable(a), "name": name,
            "location": d.get("location", ""), "category": d.get("category", ""),
            "description": d.get("description", ""),
            "by": by,
        }

    def rows(self) -> list[dict]:
        out = [self.row(n) for n in self.active]
        out.sort(key=lambda r: (PRIORITY_ORDER.get(r["priority"], 9), -(r["since"] or 0), r["name"]))
        return out

    def locations(self) -> dict[str, int]:
        """Each location with its number of defined alarms (the tree's nodes)."""
        return dict(collections.Counter(d.get("location", "") for d in self.definitions.values()))

    def tree(self) -> dict[str, str | None]:
        """location -> parent for every location of the tree and every one an alarm names
        (a location without an alarm-locations record is a top of its own, as in the summaries)."""
        out = {loc: None for loc in self.locations()}
        out.update(self.parents)
        for parent in self.parents.values():
            if parent is not None:
                out.setdefault(parent, None)
        return out

    def in_location(self, location: str, wanted: str | None) -> bool:
        return wanted is None or history.in_location(location, wanted, self.parents)

    def apply(self, topic: str, key: str, value: dict | None) -> tuple[str, ...]:
        """Applies one record; returns what changed: ("row", name), ("locations",), ("history", ...)."""
        if topic == "active-alarms":
            if value is None:
                self.active.pop(key, None)
            else:
                self.active[key] = value
            return ("row",)
        if topic == "alarms":
            old = self.definitions.get(key)
            if value is None:
                self.definitions.pop(key, None)
            else:
                self.definitions[key] = value
            moved = (old or {}).get("location") != (value or {}).get("location")
            return ("row", "locations") if moved or old is None or value is None else ("row",)
        if topic == "alarm-locations":
            if value is None:
                self.parents.pop(key, None)
            else:
                self.parents[key] = value.get("parent") or None
            return ("locations",)
        if topic == "shelved-alarms":
            if value is None:
                self.shelved.pop(key, None)
            else:
                self.shelved[key] = value
            return ()
        if topic == history.TOPIC and value is not None:
            src = history.source(value)
            if src in self._sources:  # a copy written by a replay
                return ()
            self._sources.add(src)
            self.entries.append(value)
            self._trim(value["time"])
            return ("history",)
        return ()

    def _trim(self, now_ms: int) -> None:
        while self.entries and (len(self.entries) > self.history_max
                                or self.entries[0]["time"] < now_ms - self.history_window_ms):
            self._sources.discard(history.source(self.entries.popleft()))

    def alarm_history(self, name: str, limit: int = 500) -> list[dict]:
        es = [e for e in self.entries if e["alarm"] == name]
        return sorted(es, key=lambda e: (e["time"], e["offset"]))[-limit:]

    def detail(self, name: str) -> dict | None:
        d = self.definitions.get(name)
        if d is None and name not in self.active:
            return None
        return {
            "name": name,
            "definition": None if d is None else {**_jsonable(d), "producerText": producer_text(d["producer"])},
            "active": self.row(name),
            "shelving": _jsonable(self.shelved.get(name)),
            "history": [{**e, "text": history.describe(e)} for e in self.alarm_history(name)],
        }


class _Reassign(Exception):
    """A topic the feed waited for now exists: assign again (positions are kept)."""


class Feed:
    """Follows the topics into a LiveState; notifies listeners of changes."""

    ENGINE_CHECK_S = 5.0  # how often the engine's consumer group is looked at
    STALE_AFTER_S = 5.0   # no contact with Kafka for this long: the page says the data is stale
    CHECK_S = 1.0

    def __init__(self, settings: Settings, state: LiveState, history_since_ms: int | None = None):
        self.settings = settings
        self.state = state
        self.listeners: list = []   # callables(kind, name)
        self.positions: dict = {}   # TopicPartition -> next offset
        self.caught_up = False
        self.kafka_ok = False
        self.registry_ok = True
        self.lag = 0
        self.last_contact = 0.0
        self.last_record = 0.0
        self.error = "starting"
        self.history_since_ms = history_since_ms
        self._codec = None
        self._consumer = None
        self._missing: list[str] = []
        self.engine_workers: int | None = None  # members of the engine's consumer group; None: unknown
        self._next_engine_check = 0.0

    # --- status --------------------------------------------------------------
    def status(self, now: float | None = None) -> dict:
        now = time.time() if now is None else now
        reasons = []
        if not self.kafka_ok or now - self.last_contact > self.STALE_AFTER_S:
            reasons.append(f"Kafka unreachable ({self.error})" if self.error else "Kafka unreachable")
        if not self.registry_ok:
            reasons.append("schema registry unreachable: newer records cannot be read")
        if self.engine_workers == 0:
            reasons.append(f"no engine worker is running (consumer group {engine_group(self.settings)} "
                           f"has no members): alarms are not being evaluated")
        if not self.caught_up:
            reasons.append("still reading the topics")
        elif self.lag > 0 and now - self.last_record > self.STALE_AFTER_S:
            reasons.append(f"{self.lag} record(s) not read yet")
        return {"stale": bool(reasons), "reasons": reasons, "kafka": self.kafka_ok, "registry": self.registry_ok,
                "caughtUp": self.caught_up, "lag": self.lag, "engineWorkers": self.engine_workers,
                "lastContactMs": int(self.last_contact * 1000), "lastRecordMs": int(self.last_record * 1000),
                "bootstrap": self.settings.bootstrap}

    def _notify(self, kind: str, name: str | None) -> None:
        for fn in list(self.listeners):
            try:
                fn(kind, name)
            except Exception:  # one bad listener must not stop the feed
                log.exception("listener failed")

    # --- the consumer ----------------------------------------------------------
    async def run(self) -> None:
        delay = 1.0
        while True:
            try:
                await self._run_once()
            except asyncio.CancelledError:
                raise
            except _Reassign:
                continue
            except Exception as e:
                self.kafka_ok = False
                self.error = f"{e.__class__.__name__}: {e}"[:200]
                log.warning("web feed: %s; retrying in %.0f s", self.error, delay)
                self._notify("status", None)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
            else:
                delay = 1.0

    async def _run_once(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        from alarm_engine.kafka_io import _start
        from alarm_engine.registry import make_codec

        s = self.settings
        if self._codec is None:
            self._codec = make_codec(s)
        consumer = AIOKafkaConsumer(**s.kafka_kwargs(), enable_auto_commit=False, auto_offset_reset="earliest",
                                    group_id=None, request_timeout_ms=10_000, fetch_max_wait_ms=100)
        await _start(consumer)
        self._consumer = consumer
        checker = None
        try:
            tps = []
            self._missing = []
            for t in TOPICS:
                name = s.topic(t)
                parts = consumer.partitions_for_topic(name)
                if parts is None:
                    await consumer._client.force_metadata_update()
                    parts = consumer.partitions_for_topic(name)
                if not parts:
                    if t in OPTIONAL:
                        self._missing.append(name)
                        continue  # not written yet (an older engine): the page works without it, and looks again
                    raise LookupError(f"topic {name} does not exist")
                tps += [TopicPartition(name, p) for p in sorted(parts)]
            consumer.assign(tps)
            end = await consumer.end_offsets(tps)
            hist = s.topic(history.TOPIC)
            for tp in tps:
                if tp in self.positions:
                    consumer.seek(tp, self.positions[tp])
                elif tp.topic == hist and self.history_since_ms is not None:
                    found = (await consumer.offsets_for_times({tp: self.history_since_ms})).get(tp)
                    consumer.seek(tp, found.offset if found else end[tp])
                else:
                    await consumer.seek_to_beginning(tp)
            self.kafka_ok, self.error, self.last_contact = True, "", time.time()
            if not self.caught_up:
                pending = {tp for tp in tps if await consumer.position(tp) < end[tp]}
            else:
                pending = set()
            self._notify("status", None)
            checker = asyncio.create_task(self._check(consumer, tps))
            logical = {s.topic(t): t for t in TOPICS}
            while True:
                if checker.done():
                    checker.result()
                batch = await consumer.getmany(timeout_ms=200, max_records=2000)
                for tp, msgs in batch.items():
                    topic = logical[tp.topic]
                    for m in msgs:
                        await self._apply(topic, m)
                        self.positions[tp] = m.offset + 1
                    self.last_record = self.last_contact = time.time()
                if not self.caught_up:
                    for tp in list(pending):
                        if self.positions.get(tp, 0) >= end[tp] or await consumer.position(tp) >= end[tp]:
                            pending.discard(tp)
                    if not pending:
                        self.caught_up = True
                        self._notify("snapshot", None)
        finally:
            self._consumer = None
            if checker is not None:
                checker.cancel()
            await consumer.stop()

    async def _apply(self, topic: str, m) -> None:
        from alarm_engine.codec import BadRecord, RegistryUnavailable, decode_key

        while True:
            try:
                key = decode_key(m.key)
                value = self._codec.decode(topic, m.value) if not self._needs_fetch(m.value) \
                    else await asyncio.to_thread(self._codec.decode, topic, m.value)
                self.registry_ok = True
                break
            except RegistryUnavailable as e:
                # Not the record's fault: keep the last known state and try again.
                if self.registry_ok:
                    log.warning("web feed: %s", e)
                    self.registry_ok = False
                    self._notify("status", None)
                await asyncio.sleep(2.0)
            except BadRecord as e:
                log.warning("web feed: skipped %s[%d]@%d: %s", m.topic, m.partition, m.offset, e)
                return
        changed = self.state.apply(topic, key, value)
        if self.caught_up:
            for kind in changed:
                self._notify(kind, key)

    def _needs_fetch(self, raw: bytes | None) -> bool:
        # The codec fetches a writer schema it has not seen: do that off the event loop.
        import struct

        if not raw or raw[0] != 0 or len(raw) < 5:
            return False
        return struct.unpack_from(">I", raw, 1)[0] not in self._codec._writers

    async def _check(self, consumer, tps) -> None:
        """Contact with Kafka and the lag, every CHECK_S; the status is pushed when it changes."""
        last = None
        while True:
            await asyncio.sleep(self.CHECK_S)
            try:
                end = await asyncio.wait_for(consumer.end_offsets(tps), 3.0)
                self.kafka_ok, self.error, self.last_contact = True, "", time.time()
                self.lag = sum(max(0, end[tp] - self.positions.get(tp, 0)) for tp in tps)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.kafka_ok = False
                self.error = f"{e.__class__.__name__}: {e}"[:200] or e.__class__.__name__
            if self.kafka_ok and time.time() >= self._next_engine_check:
                self._next_engine_check = time.time() + self.ENGINE_CHECK_S
                await self._check_engine()
            if self._missing and self.kafka_ok:
                await consumer._client.force_metadata_update()
                if any(consumer.partitions_for_topic(t) for t in self._missing):
                    raise _Reassign()
            st = self.status()
            key = (st["stale"], tuple(st["reasons"]))
            if key != last:
                last = key
                self._notify("status", None)

    async def _check_engine(self) -> None:
        """How many workers the engine's consumer group has (0: the engine is down)."""
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(**self.settings.kafka_kwargs(), request_timeout_ms=3000)
        try:
            await asyncio.wait_for(admin.start(), 3.0)
            (resp,) = await asyncio.wait_for(admin.describe_consumer_groups([engine_group(self.settings)]), 3.0)
            group = resp.to_object()["groups"][0]
            self.engine_workers = len(group["members"]) if group["error_code"] == 0 else 0
        except asyncio.CancelledError:
            raise
        except Exception as e:  # not allowed to describe groups, or Kafka gone: unknown
            log.debug("engine group check: %s", e)
            self.engine_workers = None
        finally:
            await admin.close()


def engine_group(settings: Settings) -> str:
    """The engine workers' consumer group."""
    return engine_app_id(settings)
