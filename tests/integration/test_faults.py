"""Faults of the surroundings: the broker stopped and restarted, the registry
unreachable, the worker's RocksDB directory lost. The engine keeps running (or is
restarted by its supervisor) and the active-alarms view ends equal to the oracle.

These stop services of the stack the tests run against (alarm_engine.stack, with the
same ALARM_ENGINE_STACK_DIR / ports as `make test`); they skip if that stack is not
the one this process can control. Long variants are marked `soak` (`make soak`).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import threading
import time

import pytest

from alarm_engine import stack
from alarm_engine.registry import register_all
from tests.integration.engine import (
    FAST_FAILOVER, REPO_ROOT, ActiveView, Feeder, Oracle, SupervisedWorker, Worker, Workload, divergence,
    wait_caught_up, wait_converged,
)

pytestmark = pytest.mark.integration


def _own_stack(settings, name):
    svc = stack.service(name)
    if stack.bootstrap_servers() != settings.bootstrap or svc.pid() is None:
        pytest.skip(f"the stack's {name} is not controllable from here (set ALARM_ENGINE_STACK_DIR, "
                    f"KAFKA_PORT, REGISTRY_PORT as for make test)")
    return svc


def _try(fn):
    try:
        fn()
    except BaseException as e:  # reported by the test
        return e
    return None


def _feed(feeder, workload, n, batch=40, pace=0.2):
    for _ in range(n // batch):
        feeder.send([workload.next() for _ in range(batch)])
        time.sleep(pace)


def _converge(settings, view, oracle, what, timeout=120):
    caught = wait_caught_up(settings, timeout=timeout)
    diff = wait_converged(view, oracle.expected(), timeout=30)
    assert not diff, f"{what}: {len(diff)} divergent key(s): {sorted(diff.items())[:10]}"
    return caught


@pytest.fixture
def rig(settings, tmp_path):
    seed = int(os.environ.get("ALARM_ENGINE_SEED", "0")) or random.randrange(1 << 30)

    class Rig:
        s = settings
        workload = Workload(seed)
        oracle = Oracle(settings)
        view = ActiveView(settings)
        workers: list[Worker] = []
        feeder = None

        def feed(self, n):
            if self.feeder is None:
                self.feeder = Feeder(settings, self.oracle)
            _feed(self.feeder, self.workload, n)

    r = Rig()
    r.seed = seed
    r.view.workers = r.workers
    yield r
    r.view.close()
    for w in r.workers:
        w.kill()
    if r.feeder is not None:
        r.feeder.close()


def test_broker_down_and_back(rig, tmp_path):
    """Short version (make test): the broker stopped for 15 s."""
    _broker_down_and_back(rig, tmp_path, down_s=15)


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_broker_down_and_back_soak(rig, tmp_path):
    """Long version (make soak): the broker stopped for 60 s."""
    _broker_down_and_back(rig, tmp_path, down_s=60)


def _broker_down_and_back(rig, tmp_path, down_s: float):
    kafka = _own_stack(rig.s, "kafka")
    w = SupervisedWorker(rig.s, tmp_path / "w1", "w1", extra_env=FAST_FAILOVER).start()
    rig.workers.append(w)
    rig.feed(400)
    _converge(rig.s, rig.view, rig.oracle, "before the outage")
    # A second worker started while the broker is down: faust exits at start-up without a
    # broker, and the supervisor restarts it with backoff until the broker is back.
    late = SupervisedWorker(rig.s, tmp_path / "w2", "w2", extra_env=FAST_FAILOVER)
    rig.workers.append(late)
    started: list[BaseException | None] = []
    t0 = time.monotonic()
    try:
        kafka.stop()
        starter = threading.Thread(target=lambda: started.append(_try(lambda: late.start(timeout=down_s + 150))),
                                   daemon=True)
        starter.start()
        time.sleep(down_s)
    finally:
        stack.start_service("kafka")
    outage = time.monotonic() - t0
    starter.join(200)
    assert started == [None], f"the late worker did not come up: {started}\n{late.output()[-3000:]}"
    rig.feed(400)
    caught = _converge(rig.s, rig.view, rig.oracle, "after the outage", timeout=180)
    assert w.running and late.running, "a supervisor gave up"
    figures = (f"seed {rig.seed}: broker down {outage:.0f}s, supervisor restarts: running worker "
               f"{w.restarts()}, worker started during the outage {late.restarts()}; records "
               f"{rig.feeder.sent}, divergent keys 0, caught up {caught:.1f}s after")
    print("\n" + figures)


def test_registry_down_worker_goes_on_and_cli_says_why(rig, tmp_path):
    registry = _own_stack(rig.s, "registry")
    w = Worker(rig.s, tmp_path / "w1", "w1").start()
    rig.workers.append(w)
    rig.feed(400)  # every topic: the worker and the feeder cache their schema ids
    _converge(rig.s, rig.view, rig.oracle, "before the registry stops")
    try:
        registry.stop()
        rig.feed(200)  # records with the ids already registered
        _converge(rig.s, rig.view, rig.oracle, "registry down")
        # The CLI in a fresh process (no schema cached): one line saying what failed, exit != 0;
        # a list must not pass off an unreadable topic as an empty one.
        for args in (["set-alarm", "x", "--external", "--location", "L", "--category", "C"],
                     ["register-schemas"], ["list-active"]):
            proc = subprocess.run([sys.executable, "-m", "alarm_engine.cli", "--bootstrap-servers", rig.s.bootstrap,
                                   "--registry", rig.s.registry_url, "--topic-prefix", rig.s.topic_prefix, *args],
                                  capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode != 0, (args, proc.stdout, proc.stderr)
            assert len(lines) == 1 and "schema registry" in lines[0] and rig.s.registry_url in lines[0], proc.stderr
            print(f"\n{args[0]} with the registry down -> exit {proc.returncode}: {lines[0]}")
    finally:
        stack.start_service("registry")
        # An in-memory registry starts empty: register this test's subjects again.
        register_all(rig.s)
    assert w.running
    assert "Traceback" not in w.output()


def test_rocksdb_deleted_between_runs(rig, tmp_path):
    data = tmp_path / "w1"
    w = Worker(rig.s, data, "w1", extra_env=FAST_FAILOVER).start()
    rig.workers.append(w)
    rig.feed(600)
    _converge(rig.s, rig.view, rig.oracle, "first run")
    expected = rig.oracle.expected()
    w.kill()
    shutil.rmtree(data)
    seen = len(rig.view.changes)
    w.start()
    caught = wait_caught_up(rig.s, timeout=120)
    time.sleep(3)
    # Rebuilt from the changelogs: nothing at all is published again, no tombstone.
    assert rig.view.changes[seen:] == [], "the rebuilt worker changed active-alarms"
    assert not divergence(expected, dict(rig.view.state))
    rig.feed(400)
    _converge(rig.s, rig.view, rig.oracle, "second run")
    print(f"\nseed {rig.seed}: RocksDB deleted, rebuilt, caught up in {caught:.1f}s; "
          f"records {rig.feeder.sent}, divergent keys 0")
