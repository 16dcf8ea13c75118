"""Idle worker: the CPU one worker uses over 60 s with no input (target <= 2 % of a core).

The worker runs on empty topics; once it owns its partitions and has settled, its
CPU time (utime + stime from /proc) is read over the window. Baseline, in the same
window: a bare aiokafka consumer process in a group of its own, subscribed to the
same input topics (what any idle Kafka client costs here).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

from alarm_engine.topics import ensure_topics
from bench import common

WINDOW_S = 60.0

_BARE = """
import asyncio, os, sys
from aiokafka import AIOKafkaConsumer
async def main():
    c = AIOKafkaConsumer(*sys.argv[2:], bootstrap_servers=sys.argv[1], group_id="bench-idle-bare",
                         enable_auto_commit=True)
    await c.start()
    print("ready", flush=True)
    async for _ in c:
        pass
asyncio.run(main())
"""


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _profile(pid: int, seconds: float, out) -> subprocess.Popen | None:
    """py-spy on the idle worker, if installed (bench extra). Not --gil: an idle worker
    hardly holds the GIL; the samples of its running threads show what wakes it."""
    import shutil

    spy = shutil.which("py-spy") or str(common.Path(sys.executable).parent / "py-spy")
    if not common.Path(spy).exists():
        return None
    return subprocess.Popen([spy, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "200",
                             "--nonblocking", "-f", "raw", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run(quick: bool, ca_port: int, profile: bool = False) -> dict:
    window = 20.0 if quick else WINDOW_S
    s = common.settings_for("idle")
    asyncio.run(ensure_topics(s))
    inputs = [s.topic(t) for t in ("monitored-pvs", "alarms", "shelved-alarms", "alarm-activations",
                                   "alarm-inputs", "pv-state", "alarm-deps")]
    w = common.worker(s, "w0", common.data_dir(s, "w0"), ca_port=ca_port)
    bare = common.Proc("bare consumer", [sys.executable, "-c", _BARE, s.bootstrap, *inputs], dict(os.environ),
                       common.RESULTS / "logs" / f"{common.RUN_ID}-idle-bare.log")
    try:
        w.start()
        bare.start()
        common.wait_until(lambda: (w.check() or any("hot path: partitions" in x for x in w.lines))
                          and any(x == "ready" for x in bare.lines), 120, "the worker to own its partitions")
        time.sleep(10)  # start-up work (recovery, first commits) done
        spy = _profile(w.pid, window, common.RESULTS / "profile-idle.txt") if profile else None
        w0, b0, t0 = cpu_s(w.pid), cpu_s(bare.pid), time.monotonic()
        time.sleep(window)
        if spy is not None:
            spy.wait(30)
        w.check()
        w1, b1, t1 = cpu_s(w.pid), cpu_s(bare.pid), time.monotonic()
    finally:
        w.stop()
        bare.stop()
        common.cleanup_dirs(s)
    engine_pct = 100 * (w1 - w0) / (t1 - t0)
    bare_pct = 100 * (b1 - b0) / (t1 - t0)
    return {"name": "idle", "value": round(engine_pct, 2), "unit": "%core", "baseline": round(bare_pct, 2),
            "ratio": round(engine_pct / bare_pct, 2) if bare_pct > 0 else None,
            "target": "<= 2 % of a core over 60 s", "met": engine_pct <= 2.0,
            "extra": {"window_s": round(t1 - t0, 1)}}
