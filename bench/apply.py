"""Apply figure: a facility file of A alarms + A monitored PVs into empty topics.

1. `alarm-engine apply FILE` (a subprocess: start-up, reading and checking the file,
   reading the empty topics, encoding, producing) into empty topics: records/s, against a
   bare aiokafka produce of the same pre-encoded records (common.produce, acks=all) into
   other empty topics in the same run. Peak RSS of the apply process (wait4's ru_maxrss).
2. A dry run of the same file with one alarm changed, against the A alarms now in the
   topics: seconds until it has printed its diff (one changed).
3. With a running worker (no IOC: the PVs stay unconnected, ALARM_ENGINE_CONNECT_GRACE=3600),
   E alarms + E PVs applied into empty topics: seconds from the start of apply until the
   engine has them all defined: its consumer group has committed the end offsets of alarms
   and monitored-pvs, and alarm-deps holds E dependency records (one per per-PV alarm
   definition the engine accepted), as the restart figure's set-up checks.

The file is JSON (the YAML reader is about 20 times slower on 100,000 entries: the time to
read the same document as YAML is printed too).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time

from alarm_engine.facility import fileformat
from alarm_engine.registry import make_codec
from alarm_engine.topics import ensure_topics
from bench import common
from bench.common import Offsets

#: Alarms (and as many monitored PVs) of the apply figure: the issue's full size.
ALARMS = 100_000
#: Alarms of the engine part (3): setting up 100,000 takes the worker about 6-10 minutes on
#: the shared 2-core machine (see restart.py); --apply-engine-alarms sets it.
ENGINE_ALARMS = 10_000


def facility_doc(n: int, prefix: str = "APL") -> dict:
    return {"version": 1, "defaults": {"location": "Bench", "category": "Bench"},
            "alarms": {f"{prefix}:ALARM{i}": {"pv": f"{prefix}:PV{i}"} for i in range(n)}}


def _write(doc: dict, name: str) -> str:
    common.WORK.mkdir(parents=True, exist_ok=True)
    path = common.WORK / name
    path.write_text(json.dumps(doc, indent=1))
    return str(path)


def _cli(settings, *args) -> tuple[float, int, str]:
    """alarm-engine in a subprocess: (seconds, peak RSS KiB, stdout)."""
    env = dict(os.environ, BOOTSTRAP_SERVERS=settings.bootstrap, SCHEMA_REGISTRY=settings.registry_url)
    out_path = common.WORK / f"cli-{time.time_ns()}.out"
    with open(out_path, "w") as out:
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-m", "alarm_engine.cli", "--topic-prefix", settings.topic_prefix,
                              *args], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=common.REPO_ROOT)
        _, status, usage = os.wait4(p.pid, 0)
        seconds = time.perf_counter() - t0
    text = out_path.read_text()
    out_path.unlink()
    if os.waitstatus_to_exitcode(status) != 0:
        raise common.BenchError(f"alarm-engine {' '.join(args)} failed:\n{text[-2000:]}")
    return seconds, usage.ru_maxrss, text


def _encoded(settings, n: int) -> dict[str, list[tuple[bytes, bytes]]]:
    desired, problems = fileformat.build([(facility_doc(n), "bench")], settings)
    assert not problems, problems[:3]
    codec = make_codec(settings)
    return {t: [(k.encode(), codec.encode(t, v)) for k, v in recs.items()] for t, recs in desired.records.items()}


def _engine_part(m: int) -> dict:
    s = common.settings_for("apply-engine")
    asyncio.run(ensure_topics(s))
    path = _write(facility_doc(m, "APE"), f"{s.topic_prefix}engine.json")
    w = common.worker(s, "apply", common.data_dir(s, "apply"), ca_port=common.free_port(), grace_s=3600)
    try:
        w.start()
        # Measured from a worker that is up (its partitions, never committed, are read from
        # the start: nothing is skipped).
        common.wait_until(lambda: w.check() or any("Ready" in line for line in w.lines), 180, "the worker")
        t0 = time.perf_counter()
        apply_s, _, _ = _cli(s, "apply", path)

        async def defined():
            async with Offsets(s) as offs:
                await offs.wait_total(s.topic("alarm-deps"), m, 1200, "alarm dependencies", [w], interval=0.5)
                await offs.wait_caught_up(common.app_group(s), [s.topic("alarms"), s.topic("monitored-pvs")],
                                          1200, "the definitions to be processed", [w])

        asyncio.run(defined())
        return {"engine_alarms": m, "engine_defined_s": round(time.perf_counter() - t0, 1),
                "engine_apply_s": round(apply_s, 1), "worker_rss_mib": round((w.vm_hwm_kib() or 0) / 1024)}
    finally:
        w.stop(60)
        common.cleanup_dirs(s)


def run(quick: bool) -> dict:
    n = 5_000 if quick else ALARMS
    s = common.settings_for("apply")
    base = common.settings_for("apply-bare")
    asyncio.run(ensure_topics(s))
    asyncio.run(ensure_topics(base))
    doc = facility_doc(n)
    path = _write(doc, f"{s.topic_prefix}facility.json")
    records = 2 * n

    # Baseline: the same records, encoded beforehand, produced bare.
    encoded = _encoded(base, n)
    t0 = time.perf_counter()
    for topic, recs in encoded.items():
        asyncio.run(common.produce(base, base.topic(topic), recs))
    bare_s = time.perf_counter() - t0
    del encoded

    apply_s, rss_kib, out = _cli(s, "apply", path)
    if f"wrote {records:,} record(s)" not in out:
        raise common.BenchError(f"apply did not write {records} records:\n{out[-1500:]}")
    m = re.search(r"from 1 file\(s\) in ([\d.]+) s, ([\d,]+) records from the topics in ([\d.]+) s", out)
    w = re.search(r"wrote [\d,]+ record\(s\) in ([\d.]+) s", out)

    again_s, _, out2 = _cli(s, "apply", path)
    if "nothing to write" not in out2:
        raise common.BenchError(f"second apply was not empty:\n{out2[-1500:]}")

    doc["alarms"][f"APL:ALARM{n // 2}"]["priority"] = "P1_LIFE"
    changed = _write(doc, f"{s.topic_prefix}facility-changed.json")
    dry_s, dry_rss, out3 = _cli(s, "apply", changed, "--dry-run")
    if "alarms: 0 added, 1 changed" not in out3:
        raise common.BenchError(f"dry run did not find the one change:\n{out3[-1500:]}")

    # The same document as YAML: the reading time alone (for the note above).
    import yaml

    from alarm_engine.facility import source

    text = yaml.dump(facility_doc(n), Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper),
                     default_flow_style=None, width=1_000_000)
    t1 = time.perf_counter()
    source.parse(text, "bench.yaml")
    yaml_read_s = time.perf_counter() - t1

    engine = {}
    if not quick or os.environ.get("BENCH_APPLY_ENGINE"):
        engine = _engine_part(1_000 if quick else ENGINE_ALARMS)
    rate, bare_rate = records / apply_s, records / bare_s
    peak_mib = rss_kib / 1024
    met = rate / bare_rate >= 0.5 and dry_s <= 10 and peak_mib <= 1024
    return {"name": "apply", "value": round(rate), "unit": "records/s", "baseline": round(bare_rate),
            "ratio": round(rate / bare_rate, 2),
            "target": "ratio >= 0.5, dry-run diff of one change <= 10 s, peak RSS <= 1 GiB", "met": met,
            "extra": {"alarms": n, "monitored_pvs": n, "records": records, "apply_s": round(apply_s, 1),
                      "bare_produce_s": round(bare_s, 1),
                      "apply_read_file_s": float(m.group(1)) if m else None,
                      "apply_write_s": float(w.group(1)) if w else None,
                      "second_apply_s": round(again_s, 1), "dry_run_one_change_s": round(dry_s, 1),
                      "apply_peak_rss_mib": round(peak_mib), "dry_run_peak_rss_mib": round(dry_rss / 1024),
                      "yaml_read_s": round(yaml_read_s, 1), **engine}}
