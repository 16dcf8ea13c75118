"""Figure 4: CA fan-in, one worker subscribing to C PVs of a local IOC.

The IOC (demo IOC --count C --update-rate R --update-paused) serves
DEMO:PV0..C-1. The worker starts idle; the clock starts when the bench
produces the C monitored-pvs records and stops at the timestamp of the C-th
pv-state record (every PV connected and its first value emitted). Then the
IOC's update mode is switched on (SIGUSR1; R puts/s round robin, values below
the limits) and the sustained rate of pv-state records is counted over a
window after a warm-up. No alarms are defined: this is the CA bridge (and
the router reading pv-state) alone.

Baseline: a bare pyepics client (bench/ca_baseline.py, its own process)
subscribing to the same PVs of the same IOC, after the worker has stopped:
time to a first value from every PV, and monitor callbacks/s at the same
update rate.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

from alarm_engine.registry import make_codec
from alarm_engine.topics import ensure_topics
from bench import common
from bench.common import BenchError, Offsets
from bench.data import monitored_records

WINDOW_S = 10


def scale(quick: bool) -> tuple[int, int]:
    return (2_000, 2_000) if quick else (20_000, 10_000)


def run(quick: bool, _bench_ca_port: int) -> dict:
    count, rate = scale(quick)
    s = common.settings_for("fanin")
    asyncio.run(ensure_topics(s))
    codec = make_codec(s)
    port = common.free_port()
    ioc = common.ioc(port, count, "fanin", ("--update-rate", str(rate), "--update-paused"))
    w = common.worker(s, "w0", common.data_dir(s, "w0"), ca_port=port)
    pvs = [f"DEMO:PV{i}" for i in range(count)]
    try:
        ioc.start()
        common.wait_ioc_ready(ioc, 300)
        w.start()

        async def measure():
            async with Offsets(s) as offs:
                # The worker is up once it is a member of its (stable) group.
                await _wait_member(offs, common.app_group(s), w, time.monotonic() + 120)
                await asyncio.sleep(2)
                recs = monitored_records(codec, pvs)
                t0 = time.time()
                await common.produce(s, s.topic("monitored-pvs"), recs)
                await offs.wait_total(s.topic("pv-state"), count, 600, "first values of every PV", [w, ioc],
                                      interval=0.5)
                t_conn = await offs.last_timestamp(s.topic("pv-state")) - t0
                ioc.signal(signal.SIGUSR1)
                await asyncio.sleep(3)
                n1, t1 = await offs.total(s.topic("pv-state")), time.time()
                await asyncio.sleep(WINDOW_S)
                n2, t2 = await offs.total(s.topic("pv-state")), time.time()
                ioc.signal(signal.SIGUSR1)
                return t_conn, (n2 - n1) / (t2 - t1)

        t_conn, ev_rate = asyncio.run(measure())
        w.stop()
        env = dict(os.environ, EPICS_CA_ADDR_LIST=f"127.0.0.1:{port}", EPICS_CA_AUTO_ADDR_LIST="NO",
                   EPICS_CA_MAX_ARRAY_BYTES="100000")
        out = subprocess.run([sys.executable, "-m", "bench.ca_baseline", "--count", str(count),
                              "--ioc-pid", str(ioc.pid), "--seconds", str(WINDOW_S)],
                             cwd=common.REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
        vals = dict(line.split(None, 1) for line in out.stdout.splitlines() if line.strip())
        if "connected" not in vals or "rate" not in vals:
            raise BenchError(f"CA baseline failed:\n{out.stdout}\n{out.stderr[-2000:]}")
        b_conn, b_rate = float(vals["connected"]), float(vals["rate"])
    finally:
        w.stop()
        ioc.stop()
        common.cleanup_dirs(s)
    return {"name": "fanin", "value": round(t_conn, 2), "unit": "s(connect+first values)",
            "baseline": round(b_conn, 2), "ratio": round(t_conn / b_conn, 2), "target": "report",
            "met": None,
            "extra": {"pvs": count, "ioc_update_rate": rate, "events_per_s": round(ev_rate),
                      "baseline_events_per_s": round(b_rate), "events_ratio": round(ev_rate / b_rate, 3)}}


async def _wait_member(offs, group, w, deadline):
    """Until the worker has joined its group (it has members and an assignment)."""
    while True:
        w.check()
        desc = await offs.admin.describe_consumer_groups([group])
        try:
            g = desc[0].groups[0]
            ready = g[2] == "Stable" and len(g[5]) > 0
        except Exception:
            ready = False
        if ready:
            return
        if time.monotonic() > deadline:
            raise BenchError("worker did not join its group within 120 s")
        await asyncio.sleep(0.5)
