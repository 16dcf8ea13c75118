"""Run the demo IOC (alarm_engine.demo_ioc) as a subprocess for integration tests.

Import this module BEFORE anything imports `epics` (pyepics): on import it
picks one loopback CA port for the whole test process and points the CA
client environment at it (EPICS_CA_ADDR_LIST=127.0.0.1:<port>,
EPICS_CA_AUTO_ADDR_LIST=NO).  libca reads that environment once, when its
context is created, so every IOC started by this process must use that same
port, and only one may run at a time: DemoIOC.restart() keeps the port.

The port is remembered in ALARM_ENGINE_TEST_CA_PORT, so importing this file
twice under two module names (`tests.integration.ioc` and `ioc`) still agrees
on it; set that variable yourself to pin a port.

    from tests.integration.ioc import demo_ioc, caput   # demo_ioc: session fixture

    def test_x(demo_ioc):
        caput("DEMO:TEMP", 90)
        demo_ioc.kill(); demo_ioc.start()
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PORT_ENV = "ALARM_ENGINE_TEST_CA_PORT"
PREFIX = "DEMO:"
#: Numbered PVs (DEMO:PV0..) the session IOC serves for scale tests.
SESSION_COUNT = 200

SERVER_ENV = {
    "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
    "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
    "EPICS_CAS_BEACON_ADDR_LIST": "127.255.255.255",
}


def free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (the CA server needs both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free TCP+UDP port on 127.0.0.1")


def _session_port() -> int:
    port = os.environ.get(PORT_ENV)
    if not port:
        port = str(free_port())
        os.environ[PORT_ENV] = port
    return int(port)


CA_PORT = _session_port()


def client_env(port: int = CA_PORT) -> dict[str, str]:
    return {"EPICS_CA_ADDR_LIST": f"127.0.0.1:{port}", "EPICS_CA_AUTO_ADDR_LIST": "NO"}


def configure_ca_client(port: int = CA_PORT) -> None:
    """Point this process's CA clients (pyepics, caproto) at the test IOC."""
    env = client_env(port)
    ca = sys.modules.get("epics.ca")
    if ca is not None and getattr(ca, "libca", None) is not None:
        if any(os.environ.get(k) != v for k, v in env.items()):
            raise RuntimeError(
                "pyepics' libca was initialised before tests/integration/ioc.py set the CA "
                f"environment ({env}); import this module before anything uses epics")
    os.environ.update(env)


configure_ca_client()


class DemoIOC:
    """One `python -m alarm_engine.demo_ioc` subprocess on a fixed loopback port."""

    def __init__(self, port: int = CA_PORT, prefix: str = PREFIX, count: int = 0,
                 wander: bool = False, extra_args: tuple[str, ...] = ()) -> None:
        self.port = port
        self.prefix = prefix
        self.count = count
        self.wander = wander
        self.extra_args = tuple(extra_args)
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self._lines: collections.deque[str] = collections.deque(maxlen=400)
        self._ready = threading.Event()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def output(self) -> str:
        """The last lines the IOC printed (stdout and stderr)."""
        return "\n".join(self._lines)

    def pv(self, suffix: str) -> str:
        return self.prefix + suffix

    def start(self, timeout: float = 20.0) -> "DemoIOC":
        if self.running:
            raise RuntimeError(f"IOC already running (pid {self.pid})")
        env = dict(os.environ)
        env.update(SERVER_ENV)
        env["EPICS_CA_SERVER_PORT"] = str(self.port)
        env["PYTHONUNBUFFERED"] = "1"
        args = [sys.executable, "-m", "alarm_engine.demo_ioc", "--prefix", self.prefix,
                "--count", str(self.count)]
        if self.wander:
            args.append("--wander")
        args += self.extra_args
        self._ready = threading.Event()
        self.proc = subprocess.Popen(
            args, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.starts += 1
        # Drain the pipe for the whole life of the process, or a chatty IOC blocks.
        threading.Thread(target=self._pump, args=(self.proc, self._ready), daemon=True,
                         name=f"demo-ioc-{self.proc.pid}").start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"demo IOC did not become ready within {timeout}s:\n"
                                   + self.output())
        return self

    def _pump(self, proc: subprocess.Popen, ready: threading.Event) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self._lines.append(line.rstrip("\n"))
            if line.startswith("IOC ready"):
                ready.set()

    def kill(self) -> None:
        """SIGKILL: the server vanishes without closing anything itself."""
        self._end(signal.SIGKILL, timeout=10)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not exit in time. Returns the exit code."""
        return self._end(signal.SIGTERM, timeout)

    def _end(self, sig: int, timeout: float) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
        return proc.returncode

    def restart(self, timeout: float = 20.0) -> "DemoIOC":
        """Kill (if running) and start again on the same port."""
        self.kill()
        return self.start(timeout)

    def __enter__(self) -> "DemoIOC":
        return self.start() if not self.running else self

    def __exit__(self, *exc) -> None:
        self.stop()


def caput(name: str, value, timeout: float = 5.0) -> None:
    """Write with put-completion through caproto's pure-Python client.

    Deliberately not pyepics: it would share (and keep alive) the libca
    channels that the tests' CAMonitor is supposed to release.
    """
    from caproto.sync.client import write

    # repeater=False: do not spawn a caproto-repeater that outlives the tests.
    write(name, value, notify=True, timeout=timeout, repeater=False)


def caget(name: str, timeout: float = 5.0):
    """(value, severity, status) via caproto, for checking the IOC side."""
    from caproto import ChannelType
    from caproto.sync.client import read

    resp = read(name, data_type=ChannelType.TIME_DOUBLE, timeout=timeout, repeater=False)
    return float(resp.data[0]), int(resp.metadata.severity), int(resp.metadata.status)


@pytest.fixture(scope="session")
def demo_ioc():
    """The session's demo IOC (DEMO:TEMP, PRESSURE, FLOW, PV0..199), running.

    Tests may kill/restart it; it is restarted if a test left it down.
    """
    ioc = DemoIOC(count=SESSION_COUNT)
    ioc.start()
    try:
        yield ioc
    finally:
        ioc.stop()


@pytest.fixture
def running_ioc(demo_ioc):
    """demo_ioc, started again first if an earlier test left it killed."""
    if not demo_ioc.running:
        demo_ioc.start()
    return demo_ioc
