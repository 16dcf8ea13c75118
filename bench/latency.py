"""Figure 2: end-to-end latency, caput at the IOC -> active-alarms record read.

The demo IOC serves DEMO:PV0..N-1 (HIHI=90 MAJOR); the worker monitors them
and has one per-PV alarm each. The bench writes with pyepics (put without
waiting, libca flushes at once) at a steady rate, round robin over the PVs,
alternating 95 (MAJOR) and 10 (NO_ALARM) per PV, so every write changes what
its alarm shows: an ACTIVE record or a tombstone. Latency = the time the
consumer in the bench process read the matching active-alarms record minus the
time just before the put (same clock). Records are matched per alarm and
kind (active/tombstone), in order.

Baseline: a bare aiokafka produce -> consume round trip (acks=all) at the same
rates, the send time carried in the value.
"""

from __future__ import annotations

import asyncio
import collections
import struct
import threading
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from alarm_engine.registry import make_codec
from alarm_engine.topics import ensure_topics
from bench import common
from bench.common import BenchError, Offsets
from bench.data import alarm_records, monitored_records

RATES = (100, 1000, 5000)


def scale(quick: bool) -> tuple[int, dict[int, int]]:
    # Changes per rate: a multiple of 2 * N so every PV ends back at NO_ALARM.
    return (50, {100: 600, 1000: 1000, 5000: 2000}) if quick else (200, {100: 2000, 1000: 4000, 5000: 10000})


def _pace(rate: float, n: int, fn) -> None:
    t0 = time.perf_counter()
    for j in range(n):
        target = t0 + j / rate
        while True:
            d = target - time.perf_counter()
            if d <= 0:
                break
            time.sleep(d if d > 0.002 else 0)
        fn(j)


class _Follower:
    """Reads a topic from its end in a thread; records (read time, key, value)."""

    def __init__(self, settings, topic: str):
        self.settings, self.topic = settings, topic
        self.records: list[tuple[float, bytes, bytes | None]] = []
        self.ready = threading.Event()
        self.stop = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self.thread.start()
        if not self.ready.wait(30):
            raise BenchError(f"follower of {topic} not ready")

    async def _run(self):
        c = AIOKafkaConsumer(**self.settings.kafka_kwargs(), group_id=None, enable_auto_commit=False,
                             fetch_max_wait_ms=100)
        await c.start()
        try:
            parts = c.partitions_for_topic(self.topic)
            if not parts:
                await c._client.force_metadata_update()
                parts = c.partitions_for_topic(self.topic)
            tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
            c.assign(tps)
            await c.seek_to_end(*tps)
            for tp in tps:
                await c.position(tp)
            self.ready.set()
            while not self.stop:
                batch = await c.getmany(timeout_ms=100)
                now = time.time()
                if batch:
                    with self.cond:
                        for msgs in batch.values():
                            for m in msgs:
                                self.records.append((now, m.key, m.value))
                        self.cond.notify_all()
        finally:
            await c.stop()

    def wait_count(self, n: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.records) < n and time.monotonic() < deadline:
                self.cond.wait(0.2)
            return len(self.records)

    def close(self):
        self.stop = True
        self.thread.join(5)


def _engine_run(s, pvs, alarms, rate: int, n: int) -> tuple[list[float], int, float]:
    from epics import PV

    chans = [PV(pv, auto_monitor=False) for pv in pvs]
    try:
        for ch in chans:
            if not ch.wait_for_connection(10):
                raise BenchError(f"bench CA client cannot connect to {ch.pvname}")
        follower = _Follower(s, s.topic("active-alarms"))
        sent: dict[bytes, collections.deque] = {a: collections.deque() for a in alarms}
        high = [False] * len(pvs)
        try:
            def write(j):
                i = j % len(pvs)
                high[i] = not high[i]
                sent[alarms[i]].append((time.time(), high[i]))
                chans[i].put(95.0 if high[i] else 10.0, wait=False)

            _pace(rate, n, write)
            t_end = time.time()
            got = follower.wait_count(n, 60)
        finally:
            follower.close()
        lat, missed = [], 0
        for t_read, key, value in follower.records:
            q = sent.get(key)
            if not q:
                continue
            active = value is not None
            while q:
                t_sent, was_high = q.popleft()
                if was_high == active:
                    lat.append((t_read - t_sent) * 1000)
                    break
                missed += 1
        missed += sum(len(q) for q in sent.values())
        if got < n:
            print(f"# latency {rate}/s: {got}/{n} active-alarms records", flush=True)
        # Backlog: how long after the last caput the last change was readable.
        tail_s = max((t for t, _, _ in follower.records), default=t_end) - t_end
        return lat, missed, tail_s
    finally:
        for ch in chans:
            ch.disconnect()


async def _baseline(s, rate: int, n: int) -> list[float]:
    topic = s.topic("baseline-roundtrip")
    await common.create_topic(s, topic)
    follower = _Follower(s, topic)
    producer = AIOKafkaProducer(**s.kafka_kwargs(), acks="all")
    await producer.start()
    try:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        for j in range(n):
            d = t0 + j / rate - time.perf_counter()
            if d > 0:
                await asyncio.sleep(d)
            await producer.send(topic, key=b"k%d" % (j % 200), value=struct.pack(">d", time.time()))
        await producer.flush()
        await loop.run_in_executor(None, follower.wait_count, n, 30)
    finally:
        await producer.stop()
        follower.close()
    return [(t_read - struct.unpack(">d", v)[0]) * 1000 for t_read, _, v in follower.records]


def run(quick: bool, ca_port: int) -> dict:
    n_pvs, changes = scale(quick)
    s = common.settings_for("latency")
    asyncio.run(ensure_topics(s))
    codec = make_codec(s)
    pvs = [f"DEMO:PV{i}" for i in range(n_pvs)]
    alarms = [f"LAT:ALARM{i}".encode() for i in range(n_pvs)]
    ioc = common.ioc(ca_port, n_pvs, "latency")
    w = common.worker(s, "w0", common.data_dir(s, "w0"), ca_port=ca_port)
    results: dict = {}
    try:
        ioc.start()
        common.wait_ioc_ready(ioc, 60)

        async def setup():
            await common.produce(s, s.topic("monitored-pvs"), monitored_records(codec, pvs))
            await common.produce(s, s.topic("alarms"),
                                 alarm_records(codec, [(a.decode(), pv) for a, pv in zip(alarms, pvs)]))
            w.start()
            async with Offsets(s) as offs:
                await offs.wait_total(s.topic("pv-state"), n_pvs, 120, "first PV values", [w])
                await offs.wait_total(s.topic("alarm-deps"), n_pvs, 120, "alarm dependencies", [w])
                await offs.wait_caught_up(common.app_group(s),
                                          [s.topic(t) for t in ("alarms", "monitored-pvs", "alarm-deps",
                                                                "pv-state", "alarm-inputs")],
                                          120, "the worker to settle", [w])

        asyncio.run(setup())
        for rate in RATES:
            lat, missed, tail_s = _engine_run(s, pvs, alarms, rate, changes[rate])
            base = asyncio.run(_baseline(s, rate, changes[rate]))
            results[rate] = {"engine": lat, "baseline": base, "missed": missed, "tail_s": tail_s}
            time.sleep(1)
        w.check()
    finally:
        w.stop()
        ioc.stop()
        common.cleanup_dirs(s)

    summary = {}
    for rate, r in results.items():
        summary[rate] = {k: {"median_ms": round(common.median(r[k]), 2), "p99_ms": round(common.percentile(r[k], 99), 2),
                             "n": len(r[k])} for k in ("engine", "baseline")}
        summary[rate]["missed"] = r["missed"]
        summary[rate]["last_change_after_end_s"] = round(r["tail_s"], 3)
    _plot(results)
    e1000, b1000 = summary[1000]["engine"], summary[1000]["baseline"]
    e100, b100 = summary[100]["engine"], summary[100]["baseline"]
    e5000 = summary[5000]["engine"]
    met = (e1000["p99_ms"] <= 50 and e100["median_ms"] <= 10 and e100["p99_ms"] <= 30
           and e5000["p99_ms"] <= 100 and summary[5000]["last_change_after_end_s"] <= 1.0)
    for rate in RATES:
        e, b = summary[rate]["engine"], summary[rate]["baseline"]
        print(f"# latency {rate}/s: engine median {e['median_ms']} ms p99 {e['p99_ms']} ms, baseline median "
              f"{b['median_ms']} ms p99 {b['p99_ms']} ms, missed {summary[rate]['missed']}, last change "
              f"{summary[rate]['last_change_after_end_s']} s after the end", flush=True)
    return {"name": "latency", "value": e1000["p99_ms"], "unit": "ms(p99@1000/s)",
            "baseline": b1000["p99_ms"], "ratio": round(e1000["p99_ms"] / b1000["p99_ms"], 2),
            "target": "100/s: median <= 10 ms, p99 <= 30 ms; 1000/s: p99 <= 50 ms; 5000/s: p99 <= 100 ms, "
                      "last change <= 1 s after the end", "met": met,
            "extra": {"rates": summary, "pvs": n_pvs,
                      "median_100_ms": e100["median_ms"], "baseline_median_100_ms": b100["median_ms"]}}


def _plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    styles = {("engine", 100): ("tab:blue", "-"), ("engine", 1000): ("tab:red", "-"),
              ("engine", 5000): ("tab:green", "-"), ("baseline", 100): ("tab:blue", ":"),
              ("baseline", 1000): ("tab:red", ":"), ("baseline", 5000): ("tab:green", ":")}
    for rate, r in sorted(results.items()):
        for kind in ("engine", "baseline"):
            xs = sorted(x for x in r[kind] if x > 0)
            if not xs:
                continue
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            color, ls = styles[(kind, rate)]
            label = ("caput -> active-alarms" if kind == "engine" else "bare Kafka round trip")
            ax.plot(xs, ys, color=color, linestyle=ls,
                    label=f"{label}, {rate}/s (median {common.median(xs):.1f} ms, "
                          f"p99 {common.percentile(xs, 99):.1f} ms)")
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms, log scale)")
    ax.set_ylabel("fraction of changes")
    ax.axvline(50, color="grey", lw=0.8, ls="--")
    ax.axvline(10, color="grey", lw=0.8, ls="--")
    ax.set_title(f"End-to-end latency, engine vs bare Kafka ({time.strftime('%Y-%m-%d')}, shared 2-core machine)",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out = common.REPO_ROOT / "docs" / "latency.png"
    out.parent.mkdir(exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
