"""python -m bench [--only NAME] [--quick] [--profile]: the engine's figures, each with a same-run baseline.

Needs a running stack (BOOTSTRAP_SERVERS, SCHEMA_REGISTRY); `make bench`
starts one on ports 29092/29093/28181 and stops it afterwards. Prints one
line per figure, `name value unit baseline=<value> ratio=<engine/baseline>`,
writes them to bench/results/latest.json and the latency plot to
docs/latency.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

FIGURES = ("flood", "flood-rule", "flood-mixed", "latency", "restart", "fanin", "fleet", "idle", "apply", "web", "failover")


def _need(module: str, extra: str = "bench") -> None:
    try:
        __import__(module)
    except ImportError:
        sys.exit(f"python -m bench needs {module}: pip install -e '.[{extra}]'")


def line(r: dict) -> str:
    return f"{r['name']} {r['value']} {r['unit']} baseline={r['baseline']} ratio={r['ratio']}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=FIGURES, action="append", help="run only this figure (repeatable)")
    ap.add_argument("--quick", action="store_true", help="small scale smoke run (minutes, not for the numbers)")
    ap.add_argument("--profile", action="store_true", help="py-spy the worker during the flood "
                                                           "(bench/results/profile-flood1.txt, "
                                                           "profile-flood1-rule.txt), the idle "
                                                           "window (profile-idle.txt) and the restarts "
                                                           "(profile-restart-cold/warm.txt)")
    ap.add_argument("--flood-records", type=int, help="pv-state records of the flood and fleet figures "
                                                      "(default 100000)")
    ap.add_argument("--restart-alarms", type=int, help="alarms and monitored PVs of the restart figure "
                                                       "(default 100000)")
    ap.add_argument("--apply-engine-alarms", type=int, help="alarms of the apply figure's engine part "
                                                            "(default 10000; the issue's full size is 100000)")
    args = ap.parse_args(argv)
    _need("matplotlib")
    _need("softioc", "ioc")
    _need("caproto", "ioc")

    # One CA port for this process's CA clients (libca reads the environment once).
    from bench import common

    common.RESULTS.mkdir(parents=True, exist_ok=True)
    ca_port = common.free_port()
    os.environ["EPICS_CA_ADDR_LIST"] = f"127.0.0.1:{ca_port}"
    os.environ["EPICS_CA_AUTO_ADDR_LIST"] = "NO"
    os.environ["BENCH_CA_PORT"] = str(ca_port)

    from bench import apply as apply_figure, failover, fanin, flood, idle, latency, restart

    if args.flood_records:
        flood.FLOOD_RECORDS = args.flood_records
    if args.restart_alarms:
        restart.ALARMS = args.restart_alarms
    if args.apply_engine_alarms:
        apply_figure.ENGINE_ALARMS = args.apply_engine_alarms

    runners = {
        "flood": lambda: flood.run_single(args.quick, args.profile),
        "flood-rule": lambda: flood.run_single(args.quick, args.profile, kind="rule"),
        "flood-mixed": lambda: flood.run_single(args.quick, kind="mixed"),
        "latency": lambda: latency.run(args.quick, ca_port),
        "restart": lambda: restart.run(args.quick, args.profile),
        "fanin": lambda: fanin.run(args.quick, ca_port),
        "fleet": lambda: flood.run_fleet(args.quick),
        "idle": lambda: idle.run(args.quick, ca_port, args.profile),
        "apply": lambda: apply_figure.run(args.quick),
        "web": lambda: __import__("bench.web").web.run(args.quick),  # the page in chromium (bench/web.py)
        "failover": lambda: failover.run(args.quick),
    }
    wanted = args.only or list(FIGURES)
    results, failed = [], []
    t_start = time.time()
    for name in FIGURES:
        if name not in wanted:
            continue
        t0 = time.time()
        try:
            r = runners[name]()
        except Exception as e:
            traceback.print_exc()
            failed.append(name)
            r = {"name": name, "value": None, "unit": "", "baseline": None, "ratio": None,
                 "error": f"{e.__class__.__name__}: {e}"}
        r["seconds"] = round(time.time() - t0, 1)
        results.append(r)
        print(line(r), flush=True)
    doc = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": args.quick,
           "machine": f"{os.cpu_count()} CPUs, {os.uname().sysname} {os.uname().release}",
           "total_seconds": round(time.time() - t_start, 1), "figures": results}
    with open(common.RESULTS / "latest.json", "w") as f:
        json.dump(doc, f, indent=2, default=str)
    print(f"# {len(results) - len(failed)}/{len(results)} figures in {doc['total_seconds']:.0f}s; "
          f"details in {common.RESULTS / 'latest.json'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
