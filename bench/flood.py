"""Figures 1 and 5: flood throughput (one worker, then two).

N per-PV alarms are defined first and the bench waits until the worker has
processed them and every PV's home has its alarm (the faust group has committed
the end offset of `alarms`, the hot path's group that of `alarm-deps`). Then the workers are
paused (SIGSTOP), the whole flood of pre-encoded pv-state records is produced,
and the workers are resumed (SIGCONT): the clock runs from the resume to the
timestamp of the last resulting active-alarms record. Each PV alternates
MAJOR / NO_ALARM, so every pv-state record changes what its alarm shows and
gives exactly one active-alarms record (an ACTIVE value or a tombstone).

Baseline: a bare aiokafka loop consuming the same flood records from pv-state
and producing them unchanged (acks=all, like the engine) to another topic,
from its first fetched record to its last acknowledged send.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from alarm_engine.registry import make_codec
from alarm_engine.topics import ensure_topics
from bench import common
from bench.common import BenchError, Offsets
from bench.data import alarm_records, flood_records, pv_state_datum, rule_alarm_records

_FLOOD_CACHE: dict = {}


#: Records of the full run: 100,000 pv-state records over 10,000 per-PV alarms.
FLOOD_RECORDS = 100_000


def scale(quick: bool) -> tuple[int, int]:
    return (1_000, 6_000) if quick else (10_000, FLOOD_RECORDS)


async def _baseline(settings, src: str, start: dict[int, int], n: int, dst: str) -> float:
    consumer = AIOKafkaConsumer(**settings.kafka_kwargs(), group_id=None, enable_auto_commit=False,
                                max_partition_fetch_bytes=4 << 20)
    producer = AIOKafkaProducer(**settings.kafka_kwargs(), acks="all")
    await consumer.start()
    await producer.start()
    try:
        tps = [TopicPartition(src, p) for p in sorted(start)]
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, start[tp.partition])
        count, t0 = 0, None
        deadline = time.monotonic() + 600
        while count < n:
            if time.monotonic() > deadline:
                raise BenchError(f"baseline forwarded only {count}/{n}")
            batch = await consumer.getmany(timeout_ms=500, max_records=5000)
            if batch and t0 is None:
                t0 = time.perf_counter()
            for msgs in batch.values():
                for m in msgs:
                    await producer.send(dst, key=m.key, value=m.value)
                    count += 1
        await producer.flush()
        return time.perf_counter() - t0
    finally:
        await consumer.stop()
        await producer.stop()


async def _run_baseline(s, start, n) -> float:
    dst = s.topic("baseline-forward")
    await common.create_topic(s, dst)
    return await _baseline(s, s.topic("pv-state"), start, n, dst)


def _profile(pid: int, seconds: float, out) -> subprocess.Popen | None:
    """py-spy on a worker, if installed (bench extra): --gil, so the profile is CPU, not GIL waits."""
    import shutil

    spy = shutil.which("py-spy") or str(common.Path(sys.executable).parent / "py-spy")
    if not common.Path(spy).exists():
        return None
    return subprocess.Popen([spy, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "50",
                             "--nonblocking", "--gil", "-f", "raw", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


#: Which alarms the flood's PVs feed: per-PV alarms (one hop), rule alarms over two PVs
#: each (the repartition through alarm-inputs), or every other one of each.
KINDS = ("pv", "rule", "mixed")


async def _engine(n_workers: int, quick: bool, profile: bool, kind: str = "pv") -> dict:
    n_alarms, n_records = scale(quick)
    s = common.settings_for(f"flood{n_workers}{'' if kind == 'pv' else kind}")
    await ensure_topics(s)
    codec = make_codec(s)
    pvs = [f"FLOOD:PV{i}" for i in range(n_alarms)]
    rule = [kind == "rule" or (kind == "mixed" and i % 2 == 1) for i in range(n_alarms)]
    await common.produce(s, s.topic("alarms"),
                         alarm_records(codec, [(f"FLOOD:ALARM{i}", pv) for i, pv in enumerate(pvs) if not rule[i]])
                         + rule_alarm_records(codec, [(f"FLOOD:ALARM{i}", pv, f"FLOOD:AUX{i}")
                                                      for i, pv in enumerate(pvs) if rule[i]]))
    aux = [(f"FLOOD:AUX{i}".encode(), codec.encode("pv-state", pv_state_datum(0.0, False)))
           for i in range(n_alarms) if rule[i]]
    n_deps = sum(2 if r else 1 for r in rule)  # per-PV: its control record; rule: one per PV it reads
    key = (n_alarms, n_records)
    if key not in _FLOOD_CACHE:
        _FLOOD_CACHE[key] = flood_records(codec, pvs, n_records)
    records = _FLOOD_CACHE[key]
    workers = [common.worker(s, f"w{i}", common.data_dir(s, f"w{i}"), ca_port=common.free_port())
               for i in range(n_workers)]
    spy = None
    try:
        for w in workers:
            w.start()
        async with Offsets(s) as offs:
            await offs.wait_total(s.topic("alarm-deps"), n_deps, 300, "alarm dependencies", workers)
            await offs.wait_caught_up(common.app_group(s), [s.topic("alarms"), s.topic("alarm-deps")], 300,
                                      "the definitions and dependencies to be processed", workers)
            if aux:
                await common.produce(s, s.topic("pv-state"), aux)
                await offs.wait_caught_up(common.app_group(s), [s.topic("pv-state"), s.topic("alarm-inputs")],
                                          300, "the rules' partner PVs to be processed", workers)
            base = await offs.total(s.topic("active-alarms"))
            start = await offs.end(s.topic("pv-state"))
            common.pause(workers)
            produce_s = await common.produce(s, s.topic("pv-state"), records)
            t0 = time.time()
            common.resume(workers)
            if profile:
                spy = _profile(workers[0].pid, 60, common.RESULTS / f"profile-flood{n_workers}{'' if kind == 'pv' else '-' + kind}.txt")
            await offs.wait_total(s.topic("active-alarms"), base + n_records, 900, "the flood's active-alarms",
                                  workers, interval=0.5)
            t_end = await offs.last_timestamp(s.topic("active-alarms"))
            rss = [w.vm_hwm_kib() for w in workers]
        dur = t_end - t0
        return {"duration_s": dur, "records": n_records, "alarms": n_alarms, "rate": n_records / dur,
                "produce_s": produce_s, "rss_kib": rss, "settings": s, "start": start}
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT, not on SIGTERM
            try:
                spy.wait(10)
            except subprocess.TimeoutExpired:
                spy.kill()
        for w in workers:
            w.stop()
        common.cleanup_dirs(s)


def run_single(quick: bool, profile: bool = False, kind: str = "pv") -> dict:
    res = asyncio.run(_engine(1, quick, profile, kind))
    s = res.pop("settings")
    base_s = asyncio.run(_run_baseline(s, res.pop("start"), res["records"]))
    base_rate = res["records"] / base_s
    if kind != "pv":
        return {"name": f"flood-{kind}", "value": round(res["rate"]), "unit": "records/s",
                "baseline": round(base_rate), "ratio": round(res["rate"] / base_rate, 3),
                "target": "report (rule alarms take the repartition through alarm-inputs)", "met": None,
                "extra": {"duration_s": round(res["duration_s"], 2), "baseline_s": round(base_s, 2),
                          "records": res["records"], "alarms": res["alarms"]}}
    _FLOOD_CACHE["baseline_rate"] = base_rate
    _FLOOD_CACHE["single_rate"] = res["rate"]
    return {"name": "flood", "value": round(res["rate"]), "unit": "records/s", "baseline": round(base_rate),
            "ratio": round(res["rate"] / base_rate, 3), "target": "ratio >= 0.25 (goal 0.5)",
            "met": res["rate"] / base_rate >= 0.25,
            "extra": {"duration_s": round(res["duration_s"], 2), "baseline_s": round(base_s, 2),
                      "records": res["records"], "alarms": res["alarms"],
                      "worker_rss_mib": [round(r / 1024) for r in res["rss_kib"] if r]}}


def run_fleet(quick: bool) -> dict:
    res = asyncio.run(_engine(2, quick, False))
    s = res.pop("settings")
    base_rate = _FLOOD_CACHE.get("baseline_rate")
    if base_rate is None:  # --only fleet: measure the baseline here
        base_s = asyncio.run(_run_baseline(s, res.pop("start"), res["records"]))
        base_rate = res["records"] / base_s
    single = _FLOOD_CACHE.get("single_rate")
    extra = {"duration_s": round(res["duration_s"], 2), "records": res["records"], "workers": 2}
    if single:
        extra["single_worker_rate"] = round(single)
        extra["scaling"] = round(res["rate"] / single, 2)
    return {"name": "fleet", "value": round(res["rate"]), "unit": "records/s", "baseline": round(base_rate),
            "ratio": round(res["rate"] / base_rate, 3), "target": "report (2 cores: may be < 2x one worker)",
            "met": None, "extra": extra}
