"""Figure 4's baseline: a bare pyepics client subscribing to the same PVs.

python -m bench.ca_baseline --count N --ioc-pid PID --seconds S
Prints `connected <seconds>` once every PV has delivered a first value, then
toggles the IOC's update mode (SIGUSR1), waits 3 s, counts monitor events for
S seconds and prints `rate <events/s>`, then toggles it back.
"""

import argparse
import os
import signal
import threading
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--ioc-pid", type=int, required=True)
    ap.add_argument("--seconds", type=float, default=10)
    args = ap.parse_args()
    import epics

    lock = threading.Lock()
    seen: set = set()
    events = [0]
    done = threading.Event()

    def cb(pvname=None, **kw):
        with lock:
            events[0] += 1
            if pvname not in seen:
                seen.add(pvname)
                if len(seen) == args.count:
                    done.set()

    t0 = time.time()
    pvs = [epics.PV(f"DEMO:PV{i}", form="time", auto_monitor=True, callback=cb) for i in range(args.count)]
    if not done.wait(600):
        print(f"connected-timeout {len(seen)}", flush=True)
        return 1
    print(f"connected {time.time() - t0:.3f}", flush=True)
    os.kill(args.ioc_pid, signal.SIGUSR1)
    time.sleep(3)
    n1, t1 = events[0], time.time()
    time.sleep(args.seconds)
    n2, t2 = events[0], time.time()
    os.kill(args.ioc_pid, signal.SIGUSR1)
    print(f"rate {(n2 - n1) / (t2 - t1):.1f}", flush=True)
    for pv in pvs:
        pv.clear_callbacks()
    os._exit(0)  # skip libca teardown of 20k channels


if __name__ == "__main__":
    raise SystemExit(main())
