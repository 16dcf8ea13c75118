"""`make run`: the engine on the local stack, with a demo IOC, until Ctrl-C.

Starts Kafka and the schema registry (fetched on first use), a demo IOC whose
PVs wander in and out of alarm, creates the topics, defines a few monitored
PVs and alarms (one per-PV alarm, one rule alarm over two PVs, one external),
starts one worker and shows `alarm-engine list-active --follow`. Ctrl-C stops
the worker, the IOC and the stack.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from alarm_engine import stack

REPO = Path(__file__).resolve().parent.parent
PREFIX = "DEMO:"
CA_PORT = os.environ.get("ALARM_ENGINE_DEMO_CA_PORT", "5064")

DEFINITIONS = [
    ["set-monitored", f"{PREFIX}TEMP"],
    ["set-monitored", f"{PREFIX}PRESSURE"],
    ["set-monitored", f"{PREFIX}FLOW"],
    ["set-alarm", "Demo temperature", "--pv", f"{PREFIX}TEMP", "--location", "Demo hall",
     "--category", "Cooling", "--priority", "P2_PROPERTY", "--description", "Cooling water temperature"],
    ["set-alarm", "Demo pressure and flow", "--rule", f"`{PREFIX}PRESSURE` > 8 and `{PREFIX}FLOW` < 40",
     "--location", "Demo hall", "--category", "Vacuum", "--description", "High pressure with low flow"],
    ["set-alarm", "Demo interlock", "--external", "--source", "demo", "--location", "Demo hall",
     "--category", "Safety", "--priority", "P1_LIFE"],
]


def _cli(args: list[str], env: dict) -> None:
    subprocess.run([sys.executable, "-m", "alarm_engine.cli", *args], env=env, check=True,
                   stdout=subprocess.DEVNULL)


def _stop(proc: subprocess.Popen | None, name: str) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        print(f"{name} did not stop in 20 s; killing it", flush=True)
        proc.kill()
        proc.wait()


WEB_LISTEN = os.environ.get("ALARM_ENGINE_WEB_LISTEN", "127.0.0.1:8088")
WEB_USER, WEB_PASSWORD = "demo", "demo"


def _start_web(env: dict, logs: Path) -> subprocess.Popen:
    """The operator's page, readable by anyone, with one demo operator who may shelve."""
    from alarm_engine.web.auth import set_user

    users = logs / "web-users"
    set_user(str(users), WEB_USER, WEB_PASSWORD)
    return subprocess.Popen([sys.executable, "-m", "alarm_engine.cli", "web", "--listen", WEB_LISTEN],
                            env=dict(env, ALARM_ENGINE_WEB_USERS=str(users), ALARM_ENGINE_WEB_ANONYMOUS_READ="1"),
                            stdout=open(logs / "web.log", "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def main() -> int:
    ioc = worker = web = None
    logs = Path(stack.stack_dir())
    # Kafka keeps the demo's records between runs, so the registry must keep their schemas.
    os.environ.setdefault("REGISTRY_STORAGE", "file")
    try:
        stack.start()
        env = dict(os.environ, BOOTSTRAP_SERVERS=stack.bootstrap_servers(), SCHEMA_REGISTRY=stack.registry_url(),
                   EPICS_CA_ADDR_LIST=f"127.0.0.1:{CA_PORT}", EPICS_CA_AUTO_ADDR_LIST="NO",
                   EPICS_CA_SERVER_PORT=CA_PORT)
        logs.mkdir(parents=True, exist_ok=True)
        ioc_log = open(logs / "demo-ioc.log", "w")
        ioc = subprocess.Popen([sys.executable, "-m", "alarm_engine.demo_ioc", "--prefix", PREFIX, "--wander"],
                               env=env, stdout=ioc_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _cli(["topics", "create"], env)
        _cli(["register-schemas"], env)
        for args in DEFINITIONS:
            _cli(args, env)
        worker_log = open(logs / "worker.log", "w")
        worker = subprocess.Popen([sys.executable, "-m", "faust", "-A", "alarm_engine", "worker", "-l", "info"],
                                  env=dict(env, ALARM_ENGINE_DATA_DIR=str(REPO / ".alarm-engine-data" / "demo")),
                                  stdout=worker_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO)
        web = _start_web(env, logs)
        print(f"\nAlarm page: http://{WEB_LISTEN}/  (operator {WEB_USER!r}, password {WEB_PASSWORD!r}; "
              f"log {logs / 'web.log'})", flush=True)
        print(f"\nDemo running: IOC log {logs / 'demo-ioc.log'}, worker log {logs / 'worker.log'}.\n"
              f"Try in another shell:  .venv/bin/alarm-engine set-active 'Demo interlock' --note test\n"
              f"                       .venv/bin/alarm-engine set-shelved 'Demo temperature' --duration 1m\n"
              f"Ctrl-C stops everything.\n", flush=True)
        time.sleep(2)
        return subprocess.call([sys.executable, "-m", "alarm_engine.cli", "list-active", "--follow"], env=env)
    except KeyboardInterrupt:
        return 0
    finally:
        print("\nstopping...", flush=True)
        _stop(web, "web page")
        _stop(worker, "worker")
        _stop(ioc, "demo IOC")
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
