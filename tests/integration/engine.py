"""Engine workers as subprocesses, and a live view of active-alarms, for tests."""

from __future__ import annotations

import asyncio
import collections
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from alarm_engine.codec import BadRecord, decode_key
from alarm_engine.config import Settings
from alarm_engine.kafka_io import replay
from alarm_engine.registry import make_codec

REPO_ROOT = Path(__file__).resolve().parents[2]


class Worker:
    """`faust -A alarm_engine worker` in a subprocess, with its own data dir."""

    def __init__(self, settings: Settings, data_dir: Path, name: str = "w1", extra_env: dict | None = None):
        self.settings = settings
        self.data_dir = data_dir
        self.name = name
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen | None = None
        self.lines: collections.deque[str] = collections.deque(maxlen=2000)
        self._ready = threading.Event()

    def start(self, timeout: float = 90.0) -> "Worker":
        env = dict(os.environ)
        env.update({
            "BOOTSTRAP_SERVERS": self.settings.bootstrap,
            "SCHEMA_REGISTRY": self.settings.registry_url,
            "ALARM_ENGINE_TOPIC_PREFIX": self.settings.topic_prefix,
            "ALARM_ENGINE_PARTITIONS": str(self.settings.partitions),
            "ALARM_ENGINE_DATA_DIR": str(self.data_dir),
            "ALARM_ENGINE_CONNECT_GRACE": str(self.settings.connect_grace_s),
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self.extra_env)
        self._ready.clear()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "faust", "-A", "alarm_engine", "worker", "-l", "info"],
            env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            stdin=subprocess.DEVNULL)
        threading.Thread(target=self._pump, args=(self.proc,), daemon=True).start()
        if not self._ready.wait(timeout):
            out = self.output()
            self.kill()
            raise RuntimeError(f"worker {self.name} not ready in {timeout:.0f}s:\n{out[-4000:]}")
        return self

    @property
    def log_path(self) -> Path:
        """The whole output of every run of this worker (kept with pytest's tmp_path)."""
        return self.data_dir.parent / f"{self.name}.log"

    def _pump(self, proc):
        # Line-buffered: the test reads the traces while the worker runs.
        with open(self.log_path, "a", buffering=1) as log:
            log.write(f"--- started pid {proc.pid} at {time.strftime('%H:%M:%S')}\n")
            for line in proc.stdout:
                log.write(line)
                self.lines.append(line.rstrip())
                if "Ready" in line and "Worker" in line:
                    self._ready.set()
            log.write(f"--- pid {proc.pid} ended at {time.strftime('%H:%M:%S')}\n")

    def output(self) -> str:
        return "\n".join(self.lines)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 60.0) -> None:
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self.running:
            self.proc.kill()
            self.proc.wait(30)


class ActiveView:
    """Follows active-alarms in a thread: the current compacted view and every change."""

    def __init__(self, settings: Settings, topic: str = "active-alarms"):
        self.settings = settings
        self.topic = topic
        self.state: dict[str, dict] = {}
        self.workers: list[Worker] = []  # their warnings go into a timeout's message
        self.changes: list[tuple[float, str, dict | None]] = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()

    async def _run(self):
        codec = make_codec(self.settings)
        stream = replay(self.settings, self.settings.topic(self.topic), follow=True)
        async for rec in stream:
            if self._stop:
                break
            if rec is None:
                continue
            key = decode_key(rec.key)
            value = codec.decode(self.topic, rec.value)
            with self._cond:
                if value is None:
                    self.state.pop(key, None)
                else:
                    self.state[key] = value
                self.changes.append((time.time(), key, value))
                self._cond.notify_all()
        await stream.aclose()

    def wait_for(self, predicate, timeout: float = 30.0, what: str = "condition"):
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                result = predicate(self.state)
                if result:
                    return result
                left = deadline - time.monotonic()
                if left <= 0:
                    logs = "\n".join(f"[{w.name}] {line}" for w in self.workers for line in w.lines
                                      if "WARN" in line or "ERROR" in line or "Traceback" in line)
                    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; "
                                         f"active-alarms is {self.state}\n{logs[-6000:]}")
                self._cond.wait(min(left, 0.5))

    def close(self):
        self._stop = True


# --- a seeded random workload and its oracle (test_convergence, test_faults) ------------

from alarm_engine import records as _records  # noqa: E402
from alarm_engine.core import (  # noqa: E402
    ActivationSet, AlarmState, DefinitionSet, PVUpdate, ShelvingSet, Tick, step,
)

# Environment for workers in crash tests: a killed worker's group membership expires in
# seconds instead of Faust's default 60 s, so a restart does not wait a minute to rebalance.
FAST_FAILOVER = {"BROKER_SESSION_TIMEOUT": "8", "BROKER_HEARTBEAT_INTERVAL": "2"}
TRACE = {"ALARM_ENGINE_TRACE": "1"}  # every record handled, seeks, commits: in the worker logs

_PRIORITIES = ["P1_LIFE", "P2_PROPERTY", "P3_PRODUCTIVITY", "P4_DIAGNOSTIC"]
_RULES = ["`{a}` > 50 and `{b}` > 50", "`{a}` + `{b}` > 120", "severity(`{a}`) >= MAJOR or `{b}` < 10",
          "max(`{a}`, `{b}`) > 80"]


class Workload:
    """Random but seeded input records: (logical topic, key, datum or None for a tombstone).

    PV states go straight to `pv-state` (no IOC; the PVs are not in monitored-pvs).
    Shelvings never race time: an expiration is an hour in the past or an hour or 12 h ahead.
    No one-shot shelving and no pv-state tombstones: their effect depends on how the
    alarm-keyed and the PV-keyed streams interleave, which no oracle can know.
    """

    def __init__(self, seed: int, n_alarms: int = 24, n_pvs: int = 12):
        import random

        self.rnd = random.Random(seed)
        self.alarms = [f"alarm{i:02d}" for i in range(n_alarms)]
        self.pvs = [f"CV:PV{i:02d}" for i in range(n_pvs)]
        self.t0 = int(time.time() * 1000)

    def _pv_state(self) -> dict:
        r = self.rnd
        ts = int(time.time() * 1000)
        roll = r.random()
        if roll < 0.06:
            return {"connection": "DISCONNECTED", "value": None, "severity": "INVALID",
                    "status": "DISCONNECTED", "iocTimestamp": None, "receivedAt": ts}
        if roll < 0.08:
            return {"connection": "NEVER_CONNECTED", "value": None, "severity": "INVALID",
                    "status": "NEVER_CONNECTED", "iocTimestamp": None, "receivedAt": ts}
        value = r.choice([r.randint(0, 100), round(r.uniform(0, 100), 2)])
        sev, status = ("MAJOR", "HIHI") if value > 90 else ("MINOR", "HIGH") if value > 70 else ("NO_ALARM", "NO_ALARM")
        return {"connection": "CONNECTED", "value": value, "severity": sev, "status": status,
                "iocTimestamp": ts, "receivedAt": ts}

    def _definition(self) -> dict:
        r = self.rnd
        kind = r.random()
        if kind < 0.45:
            producer = {"pv": r.choice(self.pvs)}
        elif kind < 0.8:
            a, b = r.sample(self.pvs, 2)
            producer = {"expression": r.choice(_RULES).format(a=a, b=b),
                        "severity": r.choice(["MINOR", "MAJOR", "INVALID"])}
        else:
            producer = {"source": "src"}
        return {"producer": producer, "location": "L", "category": "C", "docUrl": "", "edmPath": "",
                "priority": r.choice(_PRIORITIES), "description": ""}

    def _shelving(self) -> dict:
        r = self.rnd
        # Within the default longest shelving (a day), with listed reasons: none is refused.
        expiration = r.choice([self.t0 - 3_600_000, self.t0 + 3_600_000, self.t0 + 12 * 3_600_000])
        return {"user": r.choice(["op1", "op2"]), "reason": r.choice(["", "Chattering", "Maintenance"]),
                "comment": "", "expiration": expiration, "oneshot": False, "duration": None}

    def next(self) -> tuple[str, str, dict | None]:
        r = self.rnd
        roll = r.random()
        if roll < 0.45:
            return "pv-state", r.choice(self.pvs), self._pv_state()
        alarm = r.choice(self.alarms)
        if roll < 0.62:
            return "alarms", alarm, self._definition()
        if roll < 0.67:
            return "alarms", alarm, None
        if roll < 0.77:
            return "shelved-alarms", alarm, self._shelving()
        if roll < 0.82:
            return "shelved-alarms", alarm, None
        if roll < 0.93:
            return "alarm-activations", alarm, {"priority": r.choice([None, *_PRIORITIES]),
                                                "note": r.choice(["", "beam permit"])}
        return "alarm-activations", alarm, None


class Oracle:
    """The expected active-alarms, from the pure core alone: every event stepped per alarm
    at its record timestamp, with the router's forwarding simulated (a PV state goes to
    the alarms that depend on it; a new dependency gets the PV's latest state)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.alarms: dict[str, AlarmState] = {}
        self.latest: dict[str, object] = {}
        self.dependents: dict[str, set[str]] = collections.defaultdict(set)
        self.last_ts = 0
        # The final values per input, for the order-independent cross-check.
        self.final: dict[tuple[str, str], dict | None] = {}

    def _step(self, alarm: str, event, ts: int) -> None:
        self.alarms[alarm] = step(self.alarms.get(alarm, AlarmState()), event, ts)

    def apply(self, topic: str, key: str, datum: dict | None, ts: int) -> None:
        self.last_ts = max(self.last_ts, ts)
        if topic == "shelved-alarms" and datum is not None:
            try:
                _records.shelving(key, datum, ts, self.settings)
            except BadRecord:
                return  # the engine dead-letters it: nothing changes
        self.final[(topic, key)] = datum
        if topic == "pv-state":
            state = _records.pv_state(datum)
            self.latest[key] = state
            for alarm in sorted(self.dependents[key]):
                self._step(alarm, PVUpdate(key, state), ts)
        elif topic == "alarms":
            old = self.alarms.get(key, AlarmState()).definition
            new = None if datum is None else _records.alarm_def(key, datum, self.settings)
            self._step(key, DefinitionSet(new), ts)
            before = old.pvs() if old else frozenset()
            after = new.pvs() if new else frozenset()
            for pv in sorted(after - before):
                self.dependents[pv].add(key)
                if pv in self.latest:
                    self._step(key, PVUpdate(pv, self.latest[pv]), ts)
            for pv in before - after:
                self.dependents[pv].discard(key)
        elif topic == "shelved-alarms":
            self._step(key, ShelvingSet(None if datum is None else _records.shelving(key, datum, ts, self.settings)), ts)
        elif topic == "alarm-activations":
            self._step(key, ActivationSet(None if datum is None else _records.activation(datum)), ts)
        else:
            raise ValueError(topic)

    def expected(self) -> dict[str, dict]:
        out = {}
        for alarm, st in self.alarms.items():
            shown = step(st, Tick(), self.last_ts).shown
            if shown is not None:
                out[alarm] = _records.shown_datum(shown)
        return out

    def expected_from_final_values(self) -> dict[str, dict]:
        """The same set from the last record of each input alone (definition, shelving,
        activation, PV states): the workload is meant not to depend on interleaving."""
        out = {}
        for (topic, alarm), datum in self.final.items():
            if topic != "alarms" or datum is None:
                continue
            defn = _records.alarm_def(alarm, datum, self.settings)
            st = step(AlarmState(), DefinitionSet(defn), self.last_ts)
            for pv in sorted(defn.pvs()):
                pv_datum = self.final.get(("pv-state", pv))
                if pv_datum is not None:
                    st = step(st, PVUpdate(pv, _records.pv_state(pv_datum)), self.last_ts)
            sh = self.final.get(("shelved-alarms", alarm))
            if sh is not None:
                st = step(st, ShelvingSet(_records.shelving(alarm, sh, self.last_ts, self.settings)), self.last_ts)
            act = self.final.get(("alarm-activations", alarm))
            if act is not None:
                st = step(st, ActivationSet(_records.activation(act)), self.last_ts)
            if st.shown is not None:
                out[alarm] = _records.shown_datum(st.shown)
        return out


COMPARED = ("state", "severity", "cause", "priority", "message")


def divergence(expected: dict[str, dict], actual: dict[str, dict]) -> dict[str, tuple]:
    """Keys whose shown record differs (on COMPARED fields; `since` is left out)."""
    out = {}
    for key in set(expected) | set(actual):
        e, a = expected.get(key), actual.get(key)
        e = None if e is None else tuple(e[f] for f in COMPARED)
        a = None if a is None else tuple(a[f] for f in COMPARED)
        if e != a:
            out[key] = (e, a)
    return out


class Feeder:
    """Produces workload records with explicit timestamps (the worker's `now`) and keeps
    the oracle in step. Runs its own event loop in the calling thread."""

    def __init__(self, settings: Settings, oracle: Oracle):
        from aiokafka import AIOKafkaProducer

        self.settings = settings
        self.oracle = oracle
        self.codec = make_codec(settings)
        self.loop = asyncio.new_event_loop()

        async def start():
            producer = AIOKafkaProducer(**settings.kafka_kwargs(), acks="all", linger_ms=5)
            await producer.start()
            return producer

        self.producer = self.loop.run_until_complete(start())
        self.sent = 0
        self._last_ts = 0

    def send(self, batch: list[tuple[str, str, dict | None]]) -> None:
        async def go():
            futures = []
            for topic, key, datum in batch:
                ts = max(self._last_ts + 1, int(time.time() * 1000))
                self._last_ts = ts
                value = self.codec.encode(topic, datum)
                futures.append(await self.producer.send(self.settings.topic(topic), key=key.encode(),
                                                        value=value, timestamp_ms=ts))
                self.oracle.apply(topic, key, datum, ts)
            await asyncio.wait_for(asyncio.gather(*futures), 120)

        self.loop.run_until_complete(go())
        self.sent += len(batch)

    def close(self) -> None:
        try:
            self.loop.run_until_complete(asyncio.wait_for(self.producer.stop(), 30))
        finally:
            self.loop.close()


def wait_converged(view: ActiveView, expected: dict[str, dict], timeout: float) -> dict[str, tuple]:
    """Waits (bounded) until the view equals `expected`; returns the divergence left."""
    deadline = time.monotonic() + timeout
    with view._cond:
        while True:
            diff = divergence(expected, view.state)
            left = deadline - time.monotonic()
            if not diff or left <= 0:
                return diff
            view._cond.wait(min(left, 0.5))


ENGINE_INPUTS = ("monitored-pvs", "pv-state", "alarm-deps", "alarms", "shelved-alarms",
                 "alarm-activations", "alarm-acks", "disabled-alarms", "alarm-inputs")


def input_offsets(settings: Settings, committed: bool = True) -> tuple[dict, dict]:
    """(committed offset, end offset) of every partition of the engine's input topics,
    by "<logical topic>[<partition>]"; committed is 0 where the group has none, and
    not asked for (empty) with committed=False."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    prefix = settings.topic_prefix.strip(".-_")
    group = f"{settings.app_id}-{prefix}" if prefix else settings.app_id
    names = {settings.topic(t): t for t in ENGINE_INPUTS}
    tps = [TopicPartition(settings.topic(t), p) for t in ENGINE_INPUTS for p in range(settings.partitions)]

    def name(tp) -> str:
        return f"{names[tp.topic]}[{tp.partition}]"

    async def group_offsets() -> dict:
        # pv-state and alarm-deps are read by the hot path, which commits to a group of its own.
        admin = AIOKafkaAdminClient(**settings.kafka_kwargs())
        await admin.start()
        try:
            done = await admin.list_consumer_group_offsets(group)
            done.update(await admin.list_consumer_group_offsets(f"{group}-hotpath"))
            return {name(tp): done[tp].offset if tp in done else 0 for tp in tps}
        finally:
            await admin.close()

    async def offsets():
        consumer = AIOKafkaConsumer(**settings.kafka_kwargs(), group_id=None, enable_auto_commit=False)
        await consumer.start()
        try:
            ends = await consumer.end_offsets(tps)
        finally:
            await consumer.stop()
        return (await group_offsets() if committed else {}), {name(tp): end for tp, end in ends.items()}

    return asyncio.run(asyncio.wait_for(offsets(), 30))


def group_lag(settings: Settings) -> int:
    """Records of the engine's input topics not yet committed by its consumer group
    (the app id, config.engine_app_id)."""
    committed, ends = input_offsets(settings)
    return sum(max(0, end - committed[tp]) for tp, end in ends.items())


_HANDLED = re.compile(r"trace: (?:handle|applied already) (\S+)@(\d+) ")


def never_handled(settings: Settings, log_paths: list[Path]) -> dict[str, list[int]]:
    """Offsets of input records that no worker handled, by partition, from the
    workers' traces (ALARM_ENGINE_TRACE): a record is handled when an agent applied
    it or found it applied already (its fence). The topics are not compacted during
    a test, so every offset below the end must be there."""
    handled = collections.defaultdict(set)
    for path in log_paths:
        with open(path, errors="replace") as log:
            for line in log:
                m = _HANDLED.search(line)
                if m:
                    handled[m.group(1)].add(int(m.group(2)))
    _, ends = input_offsets(settings, committed=False)
    missing = {tp: [o for o in range(end) if o not in handled[tp]] for tp, end in ends.items()}
    return {tp: offsets for tp, offsets in missing.items() if offsets}


def wait_caught_up(settings: Settings, timeout: float) -> float:
    """Waits (bounded) until the group has committed every input record; returns the seconds
    it took. Raises AssertionError on timeout."""
    t0 = time.monotonic()
    while True:
        committed, ends = input_offsets(settings)
        behind = {tp: end - committed[tp] for tp, end in ends.items() if end > committed[tp]}
        if not behind:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"workers not caught up after {timeout:.0f}s: lag {sum(behind.values())} "
                                 f"({', '.join(f'{tp}: {n}' for tp, n in sorted(behind.items()))})")
        time.sleep(1.0)


class SupervisedWorker(Worker):
    """`alarm-engine worker` (the worker under alarm_engine/supervise.py) in a subprocess."""

    def start(self, timeout: float = 90.0) -> "Worker":
        env = dict(os.environ)
        env.update({
            "BOOTSTRAP_SERVERS": self.settings.bootstrap,
            "SCHEMA_REGISTRY": self.settings.registry_url,
            "ALARM_ENGINE_TOPIC_PREFIX": self.settings.topic_prefix,
            "ALARM_ENGINE_PARTITIONS": str(self.settings.partitions),
            "ALARM_ENGINE_DATA_DIR": str(self.data_dir),
            "ALARM_ENGINE_CONNECT_GRACE": str(self.settings.connect_grace_s),
            "ALARM_ENGINE_RESTART_MIN_S": "1", "ALARM_ENGINE_RESTART_MAX_S": "8",
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self.extra_env)
        self._ready.clear()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "alarm_engine.cli", "worker"],
            env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            stdin=subprocess.DEVNULL)
        threading.Thread(target=self._pump, args=(self.proc,), daemon=True).start()
        if not self._ready.wait(timeout):
            out = self.output()
            self.kill()
            raise RuntimeError(f"worker {self.name} not ready in {timeout:.0f}s:\n{out[-4000:]}")
        return self

    def restarts(self) -> int:
        return sum("[alarm-engine supervisor]" in line and "restarting" in line for line in self.lines)

    def stop(self, timeout: float = 60.0) -> None:
        super().stop(timeout)

    def kill(self) -> None:
        # The supervisor first (so it restarts nothing), then its worker child.
        if self.running:
            children = _children(self.proc.pid)
            self.proc.kill()
            self.proc.wait(30)
            for pid in children:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
