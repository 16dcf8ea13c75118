"""Engine workers as subprocesses, and a live view of active-alarms, for tests."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from alarm_engine.codec import decode_key
from alarm_engine.config import Settings
from alarm_engine.kafka_io import replay
from alarm_engine.registry import make_codec

REPO_ROOT = Path(__file__).resolve().parents[2]


class Worker:
    """`faust -A alarm_engine worker` in a subprocess, with its own data dir."""

    def __init__(self, settings: Settings, data_dir: Path, name: str = "w1", extra_env: dict | None = None):
        self.settings = settings
        self.data_dir = data_dir
        self.name = name
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen | None = None
        self.lines: collections.deque[str] = collections.deque(maxlen=2000)
        self._ready = threading.Event()

    def start(self, timeout: float = 90.0) -> "Worker":
        env = dict(os.environ)
        env.update({
            "BOOTSTRAP_SERVERS": self.settings.bootstrap,
            "SCHEMA_REGISTRY": self.settings.registry_url,
            "ALARM_ENGINE_TOPIC_PREFIX": self.settings.topic_prefix,
            "ALARM_ENGINE_PARTITIONS": str(self.settings.partitions),
            "ALARM_ENGINE_DATA_DIR": str(self.data_dir),
            "ALARM_ENGINE_CONNECT_GRACE": str(self.settings.connect_grace_s),
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self.extra_env)
        self._ready.clear()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "faust", "-A", "alarm_engine", "worker", "-l", "info"],
            env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            stdin=subprocess.DEVNULL)
        threading.Thread(target=self._pump, args=(self.proc,), daemon=True).start()
        if not self._ready.wait(timeout):
            out = self.output()
            self.kill()
            raise RuntimeError(f"worker {self.name} not ready in {timeout:.0f}s:\n{out[-4000:]}")
        return self

    def _pump(self, proc):
        for line in proc.stdout:
            self.lines.append(line.rstrip())
            if "Ready" in line and "Worker" in line:
                self._ready.set()

    def output(self) -> str:
        return "\n".join(self.lines)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 60.0) -> None:
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self.running:
            self.proc.kill()
            self.proc.wait(30)


class ActiveView:
    """Follows active-alarms in a thread: the current compacted view and every change."""

    def __init__(self, settings: Settings, topic: str = "active-alarms"):
        self.settings = settings
        self.topic = topic
        self.state: dict[str, dict] = {}
        self.workers: list[Worker] = []  # their warnings go into a timeout's message
        self.changes: list[tuple[float, str, dict | None]] = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()

    async def _run(self):
        codec = make_codec(self.settings)
        stream = replay(self.settings, self.settings.topic(self.topic), follow=True)
        async for rec in stream:
            if self._stop:
                break
            if rec is None:
                continue
            key = decode_key(rec.key)
            value = codec.decode(self.topic, rec.value)
            with self._cond:
                if value is None:
                    self.state.pop(key, None)
                else:
                    self.state[key] = value
                self.changes.append((time.time(), key, value))
                self._cond.notify_all()
        await stream.aclose()

    def wait_for(self, predicate, timeout: float = 30.0, what: str = "condition"):
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                result = predicate(self.state)
                if result:
                    return result
                left = deadline - time.monotonic()
                if left <= 0:
                    logs = "\n".join(f"[{w.name}] {line}" for w in self.workers for line in w.lines
                                      if "WARN" in line or "ERROR" in line or "Traceback" in line)
                    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; "
                                         f"active-alarms is {self.state}\n{logs[-6000:]}")
                self._cond.wait(min(left, 0.5))

    def close(self):
        self._stop = True
