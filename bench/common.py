"""Shared helpers for the benchmarks: settings, workers, IOC, Kafka offsets.

Everything waits with a bound; subprocesses are stopped by the caller in a
`finally` (Worker.stop / DemoIOC.stop are idempotent).
"""

from __future__ import annotations

import asyncio
import collections
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from alarm_engine.config import Settings
from alarm_engine.config import hot_group

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "bench" / "results"
WORK = RESULTS / "work"
RUN_ID = time.strftime("%H%M%S")


class BenchError(RuntimeError):
    pass


def settings_for(name: str, partitions: int = 3, **kw) -> Settings:
    """Settings of one figure: its own topic prefix (so its own consumer group and changelogs)."""
    return Settings.from_env(topic_prefix=f"bench-{name}-{RUN_ID}.", partitions=partitions, **kw)


def app_group(settings: Settings) -> str:
    prefix = settings.topic_prefix.strip(".-_")
    return f"{settings.app_id}-{prefix}" if prefix else settings.app_id


def free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (a CA server needs both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise BenchError("no free TCP+UDP port on 127.0.0.1")


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def percentile(xs, q: float):
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = min(len(s) - 1, max(0, int(round(q / 100 * (len(s) - 1)))))
    return s[k]


def wait_until(pred, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        result = pred()
        if result:
            return result
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def run(coro):
    return asyncio.run(coro)


# --- processes ------------------------------------------------------------------

class Proc:
    """A subprocess whose output goes to a log file; stop() is idempotent."""

    def __init__(self, name: str, args: list[str], env: dict, log: Path):
        self.name = name
        self.args = args
        self.env = env
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.lines: collections.deque[str] = collections.deque(maxlen=300)
        self.started_at = 0.0

    def start(self) -> "Proc":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.started_at = time.time()
        self.proc = subprocess.Popen(self.args, env=self.env, cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        threading.Thread(target=self._pump, args=(self.proc,), daemon=True).start()
        return self

    def _pump(self, proc):
        with open(self.log, "a") as f:
            for line in proc.stdout:
                self.lines.append(line.rstrip())
                f.write(line)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, n: int = 30) -> str:
        return "\n".join(list(self.lines)[-n:])

    def check(self) -> None:
        if not self.running:
            raise BenchError(f"{self.name} exited ({self.proc and self.proc.returncode}):\n{self.tail()}")

    def signal(self, sig) -> None:
        if self.running:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGCONT)  # in case it was paused
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def vm_hwm_kib(self) -> int | None:
        """Peak resident set size (VmHWM) of the process, in KiB."""
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None


def worker(settings: Settings, name: str, data_dir: Path, ca_port: int, grace_s: float = 5.0,
           extra_env: dict | None = None) -> Proc:
    """`faust -A alarm_engine worker -l warning` for this figure (not started)."""
    env = dict(os.environ)
    env.update({
        "BOOTSTRAP_SERVERS": settings.bootstrap,
        "SCHEMA_REGISTRY": settings.registry_url,
        "ALARM_ENGINE_TOPIC_PREFIX": settings.topic_prefix,
        "ALARM_ENGINE_PARTITIONS": str(settings.partitions),
        "ALARM_ENGINE_DATA_DIR": str(data_dir),
        "ALARM_ENGINE_CONNECT_GRACE": str(grace_s),
        "EPICS_CA_ADDR_LIST": f"127.0.0.1:{ca_port}",
        "EPICS_CA_AUTO_ADDR_LIST": "NO",
        # The flood pauses workers (SIGSTOP) while it produces: do not let the group evict them.
        "BROKER_SESSION_TIMEOUT": "80",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra_env or {})
    args = [sys.executable, "-m", "faust", "-A", "alarm_engine", "worker", "-l", "info"]
    return Proc(f"worker {name}", args, env, RESULTS / "logs" / f"{RUN_ID}-{settings.topic_prefix}{name}.log")


def data_dir(settings: Settings, name: str, fresh: bool = True) -> Path:
    d = WORK / f"{settings.topic_prefix}{name}"
    if fresh and d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True, exist_ok=True)
    return d


def cleanup_dirs(settings: Settings) -> None:
    for d in WORK.glob(f"{settings.topic_prefix}*"):
        shutil.rmtree(d, ignore_errors=True)


def ioc(port: int, count: int, name: str, extra_args: tuple[str, ...] = ()) -> Proc:
    env = dict(os.environ)
    env.update({"EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1", "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
                "EPICS_CAS_BEACON_ADDR_LIST": "127.255.255.255", "EPICS_CA_SERVER_PORT": str(port),
                "PYTHONUNBUFFERED": "1"})
    args = [sys.executable, "-m", "alarm_engine.demo_ioc", "--prefix", "DEMO:", "--count", str(count),
            *extra_args]
    return Proc(f"ioc {name}", args, env, RESULTS / "logs" / f"{RUN_ID}-ioc-{name}.log")


def wait_ioc_ready(p: Proc, timeout: float) -> None:
    wait_until(lambda: (p.check() or any(l.startswith("IOC ready") for l in p.lines)), timeout,
               f"{p.name} to be ready")


# --- Kafka ----------------------------------------------------------------------

async def produce(settings: Settings, topic: str, records, acks="all") -> float:
    """Send pre-encoded (key, value) pairs to a physical topic; seconds it took."""
    producer = AIOKafkaProducer(**settings.kafka_kwargs(), acks=acks, linger_ms=20,
                                max_batch_size=256 * 1024)
    await producer.start()
    t0 = time.perf_counter()
    try:
        futs = []
        for k, v in records:
            futs.append(await producer.send(topic, key=k, value=v))
        await producer.flush()
        await asyncio.gather(*futs)
        return time.perf_counter() - t0
    finally:
        await producer.stop()


async def end_offsets(settings: Settings, topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(**settings.kafka_kwargs(), group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic)
        if parts is None:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        end = await consumer.end_offsets(tps)
        return {tp.partition: off for tp, off in end.items()}
    finally:
        await consumer.stop()


class Offsets:
    """A long-lived consumer for cheap end-offset polling of several topics."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.consumer = None
        self.admin = None

    async def __aenter__(self):
        self.consumer = AIOKafkaConsumer(**self.settings.kafka_kwargs(), group_id=None, enable_auto_commit=False)
        await self.consumer.start()
        self.admin = AIOKafkaAdminClient(**self.settings.kafka_kwargs())
        await self.admin.start()
        return self

    async def __aexit__(self, *exc):
        await self.consumer.stop()
        await self.admin.close()

    async def tps(self, topic: str) -> list[TopicPartition]:
        parts = self.consumer.partitions_for_topic(topic)
        if not parts:
            await self.consumer._client.force_metadata_update()
            parts = self.consumer.partitions_for_topic(topic) or set()
        return [TopicPartition(topic, p) for p in sorted(parts)]

    async def end(self, topic: str) -> dict[int, int]:
        end = await self.consumer.end_offsets(await self.tps(topic))
        return {tp.partition: off for tp, off in end.items()}

    async def total(self, topic: str) -> int:
        return sum((await self.end(topic)).values())

    async def committed(self, group: str, topic: str) -> dict[int, int]:
        offs = await self.admin.list_consumer_group_offsets(group)
        return {tp.partition: meta.offset for tp, meta in offs.items() if tp.topic == topic}

    async def caught_up(self, group: str, topics: list[str]) -> bool:
        """The group (or, for pv-state and alarm-deps, the hot path's group) has committed
        the end offset of every partition of these topics."""
        offs = await self.admin.list_consumer_group_offsets(group)
        offs.update(await self.admin.list_consumer_group_offsets(hot_group(group)))
        done = {(tp.topic, tp.partition): meta.offset for tp, meta in offs.items()}
        for topic in topics:
            for p, end in (await self.end(topic)).items():
                if end > 0 and done.get((topic, p), -1) < end:
                    return False
        return True

    async def wait_caught_up(self, group: str, topics: list[str], timeout: float, what: str,
                             procs: list[Proc] = ()) -> None:
        deadline = time.monotonic() + timeout
        while not await self.caught_up(group, topics):
            for p in procs:
                p.check()
            if time.monotonic() > deadline:
                raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
            await asyncio.sleep(0.5)

    async def wait_total(self, topic: str, at_least: int, timeout: float, what: str,
                         procs: list[Proc] = (), interval: float = 0.25) -> int:
        deadline = time.monotonic() + timeout
        while True:
            n = await self.total(topic)
            if n >= at_least:
                return n
            for p in procs:
                p.check()
            if time.monotonic() > deadline:
                raise BenchError(f"timed out after {timeout:.0f}s waiting for {what} ({n}/{at_least})")
            await asyncio.sleep(interval)

    async def last_timestamp(self, topic: str) -> float:
        """Newest record timestamp (s) over all partitions of a topic."""
        end = await self.end(topic)
        tps = [TopicPartition(topic, p) for p, off in end.items() if off > 0]
        c = AIOKafkaConsumer(**self.settings.kafka_kwargs(), group_id=None, enable_auto_commit=False)
        await c.start()
        try:
            c.assign(tps)
            for tp in tps:
                c.seek(tp, end[tp.partition] - 1)
            newest, got = 0, set()
            deadline = time.monotonic() + 30
            while len(got) < len(tps) and time.monotonic() < deadline:
                batch = await c.getmany(timeout_ms=500)
                for tp, msgs in batch.items():
                    for m in msgs:
                        newest = max(newest, m.timestamp)
                        got.add(tp)
            return newest / 1000
        finally:
            await c.stop()


def pause(procs: list[Proc]) -> None:
    for p in procs:
        p.signal(signal.SIGSTOP)


def resume(procs: list[Proc]) -> None:
    for p in procs:
        p.signal(signal.SIGCONT)


async def create_topic(settings: Settings, name: str, partitions: int | None = None) -> None:
    from aiokafka.admin import NewTopic

    admin = AIOKafkaAdminClient(**settings.kafka_kwargs())
    await admin.start()
    try:
        if name not in set(await admin.list_topics()):
            await admin.create_topics([NewTopic(name, partitions or settings.partitions, settings.replication)])
    finally:
        await admin.close()
