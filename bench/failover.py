"""Failover: two workers, one SIGKILLed; how long until the alarms of its partitions
are updated again by the other, and how long a restarted worker takes to process again.

Setup: external alarms, PROBES per partition. A prober activates every probe alarm
again every PROBE_S with a new note (its sequence number); a follower reads
active-alarms. Both workers run with the engine's own group settings (session timeout
6 s, heartbeat 2 s, static membership; alarm_engine/membership.py).

Measured, each from the moment of the event:
- `kill`: worker A is SIGKILLed. For each partition A owned (its heartbeat on
  engine-status says which), the time until a probe of that partition shows a note
  produced after the kill; the figure is the slowest of A's partitions.
- `rejoin`: A is started again on its data directory. Time until its heartbeat says
  it owns partitions and has handled records (heartbeats every 0.5 s here).
- `quick restart`: worker B is SIGKILLed and started again at once (within its session):
  with static membership it takes its partitions back without waiting out its old
  session. Time until every partition B owned shows a fresh note.
Baseline: the median time from producing a probe to reading its active-alarms record
with both workers up (the pipeline's own delay, which every figure above includes).
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

from aiokafka import AIOKafkaProducer

from alarm_engine.worker import membership
from alarm_engine.partitioning import partition_of
from alarm_engine.registry import make_codec
from alarm_engine.status import read_heartbeats
from alarm_engine.topics import ensure_topics
from bench import common
from bench.common import BenchError
from bench.data import alarm_datum
from bench.latency import _Follower

PROBES = 4  # per partition
PROBE_S = 0.1


def _probe_keys(partitions: int) -> dict[int, list[bytes]]:
    keys: dict[int, list[bytes]] = {p: [] for p in range(partitions)}
    i = 0
    while any(len(v) < PROBES for v in keys.values()):
        k = f"FO:PROBE{i}".encode()
        p = partition_of(k, partitions)
        if len(keys[p]) < PROBES:
            keys[p].append(k)
        i += 1
    return keys


class Prober:
    """Activates every probe alarm again every PROBE_S with a new note; keeps when each note was sent."""

    def __init__(self, s, codec, keys: dict[int, list[bytes]]):
        self.s, self.codec, self.keys = s, codec, keys
        self.sent: dict[str, float] = {}  # note -> produce time
        self.stop = False
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self.thread.start()

    async def _run(self):
        producer = AIOKafkaProducer(**self.s.kafka_kwargs(), acks="all", linger_ms=2)
        await producer.start()
        try:
            seq = 0
            while not self.stop:
                seq += 1
                note = str(seq)
                value = self.codec.encode("alarm-activations", {"priority": None, "note": note})
                self.sent[note] = time.time()
                futures = [await producer.send(self.s.topic("alarm-activations"), key=k, value=value)
                           for ks in self.keys.values() for k in ks]
                await asyncio.gather(*futures)
                await asyncio.sleep(PROBE_S)
        finally:
            await producer.stop()


def _note(codec, value: bytes) -> str:
    return codec.decode("active-alarms", value).get("message", "").removeprefix("external: ").strip()


def _fresh_after(follower, codec, keys: list[bytes], prober: Prober, t0: float) -> float | None:
    """Read time of the first active-alarms record of `keys` whose note was sent after t0."""
    wanted = set(keys)
    for read_at, key, value in list(follower.records):
        if key in wanted and value is not None and read_at >= t0:
            sent = prober.sent.get(_note(codec, value))
            if sent is not None and sent >= t0:
                return read_at
    return None


def _wait_fresh(follower, codec, keys_by_partition, partitions, prober, t0, what, workers, timeout=120) -> float:
    deadline = time.monotonic() + timeout
    pending = set(partitions)
    last = t0
    while pending:
        for p in list(pending):
            at = _fresh_after(follower, codec, keys_by_partition[p], prober, t0)
            if at is not None:
                pending.discard(p)
                last = max(last, at)
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: partitions {sorted(pending)} not updated within {timeout} s")
        time.sleep(0.05)
    return last - t0


def _heartbeats(s) -> dict[str, dict]:
    return asyncio.run(read_heartbeats(s))


def _owned(s, pid: int) -> list[int]:
    for hb in _heartbeats(s).values():
        if hb.get("pid") == pid and time.time() * 1000 - hb["time"] < 3000:
            return hb.get("partitions") or []
    return []


def run(quick: bool) -> dict:
    s = common.settings_for("failover")
    asyncio.run(ensure_topics(s))
    codec = make_codec(s)
    keys = _probe_keys(s.partitions)
    all_keys = [k for ks in keys.values() for k in ks]
    asyncio.run(common.produce(s, s.topic("alarms"),
                               [(k, codec.encode("alarms", alarm_datum(external=True))) for k in all_keys]))
    port = common.free_port()
    env = {"BROKER_SESSION_TIMEOUT": str(membership.SESSION_TIMEOUT_S), "ALARM_ENGINE_HEARTBEAT_S": "0.5"}
    dirs = {n: common.data_dir(s, n) for n in ("a", "b")}
    workers = {n: common.worker(s, n, dirs[n], ca_port=port, extra_env=env) for n in ("a", "b")}
    follower = _Follower(s, s.topic("active-alarms"))
    prober = None
    try:
        for w in workers.values():
            w.start()
        common.wait_until(lambda: all(_owned(s, w.pid) for w in workers.values())
                          and sorted(p for w in workers.values() for p in _owned(s, w.pid)) == list(range(s.partitions)),
                          180, "both workers to own partitions", interval=0.5)
        prober = Prober(s, codec, keys)
        time.sleep(5)  # steady state; the baseline
        t_base = time.time()
        time.sleep(5)
        delays = []
        for read_at, key, value in list(follower.records):
            if read_at >= t_base and value is not None:
                sent = prober.sent.get(_note(codec, value))
                if sent is not None:
                    delays.append(read_at - sent)
        if not delays:
            raise BenchError("no probe record read in the steady state")
        baseline = common.median(delays)

        a, b = workers["a"], workers["b"]
        owned_a = _owned(s, a.pid)
        t_kill = time.time()
        a.signal(signal.SIGKILL)
        kill_s = _wait_fresh(follower, codec, keys, owned_a, prober, t_kill, "after the kill", [b])

        t_start = time.time()
        a2 = common.worker(s, "a", dirs["a"], ca_port=port, extra_env=env)
        workers["a2"] = a2
        a2.start()

        def a2_processing():
            for hb in _heartbeats(s).values():
                if hb.get("pid") == a2.pid and hb.get("partitions") and hb.get("recordsHandled", 0) > 0:
                    return hb["time"] / 1000
            return None

        rejoin_at = common.wait_until(a2_processing, 180, "the restarted worker to process", interval=0.2)
        rejoin_s = rejoin_at - t_start
        common.wait_until(lambda: sorted(p for w in (a2, b) for p in _owned(s, w.pid)) == list(range(s.partitions)),
                          120, "the partitions to be shared again", interval=0.5)
        time.sleep(2)

        owned_b = _owned(s, b.pid)
        t_quick = time.time()
        b.signal(signal.SIGKILL)
        b.proc.wait(10)
        b2 = common.worker(s, "b", dirs["b"], ca_port=port, extra_env=env)
        workers["b2"] = b2
        b2.start()
        quick_s = _wait_fresh(follower, codec, keys, owned_b, prober, t_quick, "after the quick restart", [b2])
    finally:
        if prober is not None:
            prober.stop = True
            prober.thread.join(10)
        follower.close()
        for w in workers.values():
            w.stop()
        common.cleanup_dirs(s)
    return {"name": "failover", "value": round(kill_s, 2), "unit": "s(kill->updated by the other)",
            "baseline": round(baseline, 3), "ratio": round(kill_s / baseline, 1),
            "target": "<= 10 s (goal 5 s)", "met": kill_s <= 10,
            "extra": {"rejoin_s": round(rejoin_s, 2), "quick_restart_s": round(quick_s, 2),
                      "partitions_of_killed": owned_a, "session_timeout_s": membership.SESSION_TIMEOUT_S,
                      "heartbeat_s": membership.HEARTBEAT_INTERVAL_S}}


if __name__ == "__main__":
    print(json.dumps(run(False), indent=2))
