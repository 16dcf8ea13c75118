"""A small real Channel Access server (softioc, EPICS 7 records) for tests and the demo.

    python -m alarm_engine.demo_ioc --prefix DEMO: [--count N] [--wander] [--update-rate R]

Serves (all writable with caput; writes are processed, so alarms follow):
    <prefix>TEMP       ai  HIGH=50 MINOR, HIHI=80 MAJOR, LOW=5 MINOR, LOLO=0 MAJOR
    <prefix>PRESSURE   ai  HIGH=8 MINOR, HIHI=10 MAJOR, LOW=1 MINOR, LOLO=0.5 MAJOR
    <prefix>FLOW       ai  no limits (never alarms on its own)
    <prefix>PV0..N-1   ai  HIHI=90 MAJOR (scale tests; --count N)

The records are plain soft-channel `ai` records (no INP link), exactly as a
production IOC would have them: a caput to VAL processes the record and the
record support computes SEVR/STAT from the limits.  softioc's own `aIn`
device support is deliberately not used: it copies its Python-held value
back into VAL on every processing, so caput would be silently undone.

Network: by default the server binds to loopback only (sets, unless already
set, EPICS_CAS_INTF_ADDR_LIST=127.0.0.1, EPICS_CAS_AUTO_BEACON_ADDR_LIST=NO,
EPICS_CAS_BEACON_ADDR_LIST=127.255.255.255).  The port comes from
EPICS_CA_SERVER_PORT (default 5064).  Clients then need
EPICS_CA_ADDR_LIST=127.0.0.1[:port] and EPICS_CA_AUTO_ADDR_LIST=NO.

Prints `IOC ready prefix=... port=... pvs=...` on stdout once serving; stops
cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import random
import signal
import sys
import threading
import time

LOOPBACK_SERVER_ENV = {
    "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
    "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
    "EPICS_CAS_BEACON_ADDR_LIST": "127.255.255.255",
}

# name suffix -> (initial value, ai fields)
_FIXED_PVS = {
    "TEMP": (20.0, dict(EGU="C", PREC=2, LOPR=-20, HOPR=120,
                        HIHI=80, HHSV="MAJOR", HIGH=50, HSV="MINOR",
                        LOW=5, LSV="MINOR", LOLO=0, LLSV="MAJOR")),
    "PRESSURE": (5.0, dict(EGU="bar", PREC=3, LOPR=0, HOPR=12,
                           HIHI=10, HHSV="MAJOR", HIGH=8, HSV="MINOR",
                           LOW=1, LSV="MINOR", LOLO=0.5, LLSV="MAJOR")),
    "FLOW": (12.5, dict(EGU="l/min", PREC=2, LOPR=0, HOPR=100)),
}
_NUMBERED_FIELDS = dict(PREC=2, LOPR=0, HOPR=100, HIHI=90, HHSV="MAJOR")
_NUMBERED_INITIAL = 10.0

# Wander ranges: chosen so values cross the alarm limits now and then.
_WANDER = {"TEMP": (10.0, 95.0), "PRESSURE": (0.2, 11.0), "FLOW": (0.0, 100.0)}
_NUMBERED_WANDER = (0.0, 100.0)


def pv_names(prefix: str, count: int = 0) -> list[str]:
    """All PV names the IOC serves for these arguments (fixed ones first)."""
    return [prefix + n for n in _FIXED_PVS] + [f"{prefix}PV{i}" for i in range(count)]


#: --shapes: one channel per CA value shape (for the CA decoding tests), name suffix -> value
#: as the CA bridge reports it ("REC.VAL$" is a string field read as a char array).
SHAPES = {
    "SHAPE:STR": "hello",
    "SHAPE:STR.VAL$": "hello",
    "SHAPE:LONG": 42,
    "SHAPE:ENUM": 2,
    "SHAPE:WAVE": (1.5, 2.5, 3.5),
    "SHAPE:LONGWAVE": (1.0, -2.0),
    "SHAPE:CHARS": (1.0, 2.0),
}


def _build_shapes(prefix: str) -> None:
    import numpy
    from softioc import builder

    builder.stringIn(prefix + "SHAPE:STR", initial_value=SHAPES["SHAPE:STR"])
    builder.longIn(prefix + "SHAPE:LONG", initial_value=SHAPES["SHAPE:LONG"])
    builder.mbbIn(prefix + "SHAPE:ENUM", "zero", "one", "two", initial_value=SHAPES["SHAPE:ENUM"])
    builder.WaveformIn(prefix + "SHAPE:WAVE", numpy.array(SHAPES["SHAPE:WAVE"]), length=5)
    builder.WaveformIn(prefix + "SHAPE:LONGWAVE",
                       numpy.array(SHAPES["SHAPE:LONGWAVE"], dtype=numpy.int32), length=4)
    builder.WaveformIn(prefix + "SHAPE:CHARS", numpy.array([1, 2], dtype=numpy.uint8), length=8)


def _build(prefix: str, count: int, shapes: bool = False) -> None:
    from softioc import builder

    # No device prefix is set in the builder: names are given in full, so any
    # prefix ("DEMO:", "X-") works as-is.
    for suffix, (initial, fields) in _FIXED_PVS.items():
        # A constant INP both sets the initial VAL and clears UDF at init;
        # EPICS 7's soft ai never re-reads a constant link, so caputs stick.
        # PINI processes once at iocInit so SEVR/STAT start out computed.
        builder.records.ai(prefix + suffix, INP=initial, PINI="YES", **fields)
    for i in range(count):
        builder.records.ai(f"{prefix}PV{i}", INP=_NUMBERED_INITIAL, PINI="YES",
                           **_NUMBERED_FIELDS)
    if shapes:
        _build_shapes(prefix)
    builder.LoadDatabase()


def _put(name: str, value: float) -> None:
    """dbPutField with processing: same path as a caput, synchronous, so no
    callback queue is involved (softioc's set() on I/O Intr records goes via
    the scan callback queue, which a tight loop overflows)."""
    from softioc import fields, imports

    buf = ctypes.c_double(value)
    imports.db_put_field_process(name, fields.DBF_DOUBLE, ctypes.addressof(buf), 1, True)


def _wander(prefix: str, count: int, period: float, stop: threading.Event) -> None:
    """Drift values in and out of alarm; each PV changes about once per period.

    Paced: at most ~200 puts per second in total, spread over the period.
    """
    rng = random.Random(1234)
    targets = [(prefix + k, lo, hi) for k, (lo, hi) in _WANDER.items()]
    targets += [(f"{prefix}PV{i}", *_NUMBERED_WANDER) for i in range(count)]
    phase = {name: rng.uniform(0, 2 * math.pi) for name, _, _ in targets}
    step = max(period / len(targets), 0.005)
    t0 = time.monotonic()
    while not stop.is_set():
        for name, lo, hi in targets:
            if stop.is_set():
                return
            # Slow sine (period ~4 wander periods) plus noise: crosses limits
            # every few seconds without flapping on every update.
            t = time.monotonic() - t0
            mid, amp = (lo + hi) / 2, (hi - lo) / 2
            value = mid + amp * math.sin(phase[name] + t * 2 * math.pi / (4 * period))
            value += rng.uniform(-0.05, 0.05) * amp
            try:
                _put(name, round(value, 3))
            except Exception as exc:  # keep wandering; report once per failure
                print(f"wander put {name} failed: {exc}", file=sys.stderr, flush=True)
            stop.wait(step)


def _update(prefix: str, count: int, rate: float, stop: threading.Event, go: threading.Event) -> None:
    """Fast update mode (benchmarks): `rate` puts per second in total, round
    robin over the numbered PVs, each put a new value below every limit (so
    values change but severities do not). Paced in 10 ms slices; runs while
    `go` is set."""
    if count <= 0 or rate <= 0:
        return
    names = [f"{prefix}PV{i}" for i in range(count)]
    slice_s = 0.01
    per_slice = rate * slice_s
    budget, i, n = 0.0, 0, 0
    next_t = time.monotonic()
    while not stop.is_set():
        if not go.is_set():
            go.wait(0.1)
            next_t = time.monotonic()
            continue
        budget += per_slice
        while budget >= 1:
            budget -= 1
            name = names[i]
            i += 1
            if i == count:
                i, n = 0, n + 1
            try:
                _put(name, 10.0 + (n % 50) + i * 1e-6)
            except Exception as exc:
                print(f"update put {name} failed: {exc}", file=sys.stderr, flush=True)
        next_t += slice_s
        delay = next_t - time.monotonic()
        if delay > 0:
            stop.wait(delay)
        elif delay < -1:  # cannot keep up: do not build an ever-growing backlog
            next_t = time.monotonic()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alarm_engine.demo_ioc", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefix", default="DEMO:", help="PV name prefix (default DEMO:)")
    parser.add_argument("--count", type=int, default=0, help="extra numbered PVs <prefix>PV0..N-1")
    parser.add_argument("--wander", action="store_true", help="drift values in and out of alarm")
    parser.add_argument("--wander-period", type=float, default=3.0,
                        help="seconds between changes of one PV when wandering (default 3)")
    parser.add_argument("--update-rate", type=float, default=0.0,
                        help="fast update mode: puts per second over the numbered PVs, round robin, "
                             "values below the limits (benchmarks; default off)")
    parser.add_argument("--update-paused", action="store_true",
                        help="with --update-rate: start paused; SIGUSR1 toggles updating")
    parser.add_argument("--shapes", action="store_true",
                        help="also serve one record per value type (string, long, enum, arrays)")
    parser.add_argument("--all-interfaces", action="store_true",
                        help="do not default the server to loopback-only")
    args = parser.parse_args(argv)
    if args.count < 0:
        parser.error("--count must be >= 0")

    if not args.all_interfaces:
        for key, value in LOOPBACK_SERVER_ENV.items():
            os.environ.setdefault(key, value)

    # Import only now: libCom reads the EPICS_* environment when the server starts.
    from softioc import asyncio_dispatcher, softioc

    _build(args.prefix, args.count, args.shapes)
    # The dispatcher only runs on_update hooks of softioc device records (we
    # have none) but iocInit requires one; the default would need cothread.
    dispatcher = asyncio_dispatcher.AsyncioDispatcher()
    softioc.iocInit(dispatcher, enable_pva=False)  # CA only: no PVA ports to collide

    stop = threading.Event()

    def _on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    wanderer = None
    if args.wander:
        wanderer = threading.Thread(target=_wander, name="wander", daemon=True,
                                    args=(args.prefix, args.count, args.wander_period, stop))
        wanderer.start()

    updater = None
    if args.update_rate > 0:
        go = threading.Event()
        if not args.update_paused:
            go.set()

        def _toggle(signum, frame):
            go.clear() if go.is_set() else go.set()

        signal.signal(signal.SIGUSR1, _toggle)
        updater = threading.Thread(target=_update, name="update", daemon=True,
                                   args=(args.prefix, args.count, args.update_rate, stop, go))
        updater.start()

    port = os.environ.get("EPICS_CA_SERVER_PORT", "5064")
    print(f"IOC ready prefix={args.prefix} port={port} pvs={len(pv_names(args.prefix, args.count))}",
          flush=True)

    # Event.wait with a timeout so the main thread returns to the interpreter
    # regularly and the Python signal handler runs promptly.
    while not stop.wait(0.5):
        pass
    for thread in (wanderer, updater):
        if thread is not None:
            thread.join(timeout=2)
    print("IOC stopping", flush=True)
    sys.stdout.flush()
    # epicsExit runs the EPICS exit hooks (closes the CA server sockets) and
    # the Python atexit handlers, then exits the process.
    softioc.safeEpicsExit(0)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
