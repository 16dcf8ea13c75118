"""Keep a worker process running: restart it with exponential backoff when it fails.

faust-streaming gives up when it cannot reach the broker at start-up (and the
engine's agents exit on purpose when Kafka stops acknowledging their sends for
too long, see agents.SEND_RETRY_S), expecting something outside to start it
again. `alarm-engine worker` is that something:

- the worker runs as a child process (`faust -A alarm_engine worker`);
- exit status 0 (a clean stop) ends the supervisor with 0;
- any other exit (an error, a signal such as SIGKILL) restarts it after a
  backoff that starts at 1 s and doubles up to 60 s; a run that lasted 60 s or
  more resets the backoff to 1 s;
- SIGTERM or SIGINT to the supervisor is passed on to the worker, and then the
  supervisor exits with the worker's status, without restarting it.

Environment: ALARM_ENGINE_RESTART_MIN_S (1), ALARM_ENGINE_RESTART_MAX_S (60),
ALARM_ENGINE_RESTART_RESET_S (60). Every restart is logged on stderr with the
exit status and the delay. The data directory (RocksDB) is kept across restarts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Sequence


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name) or default)
    except ValueError:
        return default


def _say(text: str) -> None:
    print(f"[alarm-engine supervisor] {text}", file=sys.stderr, flush=True)


def supervise(cmd: Sequence[str], *, min_backoff: float | None = None, max_backoff: float | None = None,
              reset_after: float | None = None, max_restarts: int | None = None,
              say: Callable[[str], None] = _say) -> int:
    """Run `cmd` until it exits 0 or a stop signal arrives; returns the last exit status."""
    min_backoff = _env_float("ALARM_ENGINE_RESTART_MIN_S", 1.0) if min_backoff is None else min_backoff
    max_backoff = _env_float("ALARM_ENGINE_RESTART_MAX_S", 60.0) if max_backoff is None else max_backoff
    reset_after = _env_float("ALARM_ENGINE_RESTART_RESET_S", 60.0) if reset_after is None else reset_after
    stopping = threading.Event()
    child: list[subprocess.Popen] = []

    def on_signal(signum, frame):
        stopping.set()
        if child and child[0].poll() is None:
            child[0].send_signal(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    backoff, restarts = min_backoff, 0
    try:
        while True:
            started = time.monotonic()
            proc = subprocess.Popen(list(cmd))
            child[:] = [proc]
            while True:
                try:
                    code = proc.wait()
                    break
                except KeyboardInterrupt:  # the handler is ours; keep waiting for the child
                    continue
            ran = time.monotonic() - started
            if code == 0 or stopping.is_set():
                return code if code >= 0 else 128 - code
            if max_restarts is not None and restarts >= max_restarts:
                say(f"worker exited with status {code}; {restarts} restart(s) used up, giving up")
                return code if code > 0 else 128 - code
            if ran >= reset_after:
                backoff = min_backoff
            what = f"signal {-code}" if code < 0 else f"status {code}"
            say(f"worker exited with {what} after {ran:.1f}s; restarting in {backoff:.1f}s")
            if stopping.wait(backoff):
                return code if code > 0 else 128 - code
            restarts += 1
            backoff = min(backoff * 2, max_backoff)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
