"""The worker as a service: it never runs half-working (a crashed agent ends it, a
misconfiguration stops it at start in one line), its changelog topics exist before its
agents run, records in the wrong partition are dead-lettered, it shows that it is
alive (heartbeat, `alarm-engine status`, /healthz, /metrics), and its log stays quiet
while Kafka is away."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from alarm_engine import stack
from alarm_engine.config import engine_app_id
from alarm_engine.kafka_io import replay
from alarm_engine.partitioning import partition_of
from alarm_engine.registry import make_codec
from alarm_engine.worker.watchdog import FAULT_ENV
from tests.integration.engine import FAST_FAILOVER, REPO_ROOT, SupervisedWorker, Worker
from tests.integration.test_faults import _converge, _own_stack, rig  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration

# The worker's tables (alarm_engine/worker/app.py), each with its changelog.
TABLES = ("monitored", "pv-home", "alarm-state")
_app_id = engine_app_id


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(predicate, timeout: float, what: str, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def _cli(s, *args, timeout=60):
    return subprocess.run([sys.executable, "-m", "alarm_engine.cli", "--bootstrap-servers", s.bootstrap,
                           "--registry", s.registry_url, "--topic-prefix", s.topic_prefix, *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)


def _worker_env(s, data_dir, **extra) -> dict:
    env = dict(os.environ)
    env.update({"BOOTSTRAP_SERVERS": s.bootstrap, "SCHEMA_REGISTRY": s.registry_url,
                "ALARM_ENGINE_TOPIC_PREFIX": s.topic_prefix, "ALARM_ENGINE_PARTITIONS": str(s.partitions),
                "ALARM_ENGINE_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1", **extra})
    return env


def _run_to_exit(s, data_dir, timeout=120, **extra) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "faust", "-A", "alarm_engine", "worker", "-l", "info"],
                          env=_worker_env(s, data_dir, **extra), cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    return proc.returncode, proc.stdout + proc.stderr


def _critical(output: str) -> list[str]:
    return [line for line in output.splitlines() if "CRITICAL" in line]


async def _describe(s, names):
    admin = AIOKafkaAdminClient(**s.kafka_kwargs())
    await admin.start()
    try:
        meta = {m["topic"]: len(m["partitions"]) for m in await admin.describe_topics(names)}
        configs = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, n) for n in names])
        policy = {}
        for response in configs:
            for resource in response.resources:
                name = resource[3]
                for entry in resource[4]:
                    if entry[0] == "cleanup.policy":
                        policy[name] = entry[1]
        return meta, policy
    finally:
        await admin.close()


# --- 1. never fail silent ---------------------------------------------------------------

def test_changelog_topics_exist_compacted_with_their_partitions_before_the_agents_start(settings, tmp_path):
    w = Worker(settings, tmp_path / "w1", "w1").start()
    try:
        names = [f"{_app_id(settings)}-{t}-changelog" for t in TABLES]
        partitions, policy = asyncio.run(_describe(settings, names + [settings.topic("engine-status")]))
        assert all(partitions[n] == settings.partitions for n in names), partitions
        assert all(policy[n] == "compact" for n in names + [settings.topic("engine-status")]), policy
        out = w.output()
        assert "not found in cluster metadata" not in out and "PartitionsMismatch" not in out
    finally:
        w.stop()


def test_a_crashed_agent_ends_the_worker_and_the_supervisor_restarts_it(rig, tmp_path):
    w = SupervisedWorker(rig.s, tmp_path / "w1", "w1",
                         extra_env={**FAST_FAILOVER, FAULT_ENV: "alarm_agent", "ALARM_ENGINE_FAULT_AFTER_S": "4"})
    w.start()
    rig.workers.append(w)
    rig.feed(400)
    # The fault fires in the agent's loop on its first batch after 4 s: keep records coming
    # until then (a quick worker may have handled the first 400 before).
    deadline = time.monotonic() + 90
    while w.restarts() < 1:
        assert time.monotonic() < deadline, "timed out after 90s waiting for the supervisor to restart the crashed worker"
        rig.feed(20)
        time.sleep(0.5)
    out = w.output()
    assert "agent alarm_engine.worker.alarms.alarm_agent crashed (InjectedFault" in out, out[-3000:]
    assert "worker exited with status 70" in out
    rig.feed(400)
    _converge(rig.s, rig.view, rig.oracle, "after the crash and restart")
    assert w.restarts() == 1 and w.running
    print(f"\nseed {rig.seed}: agent crashed once, worker restarted by its supervisor, "
          f"{rig.feeder.sent} records, divergent keys 0")


def test_a_crashed_hot_path_ends_a_plain_faust_worker_non_zero(settings, tmp_path):
    w = Worker(settings, tmp_path / "w1", "w1", extra_env={FAULT_ENV: "hot_path",
                                                           "ALARM_ENGINE_FAULT_AFTER_S": "1"}).start()
    try:
        # The hot path's loop turns every 250 ms even when idle: the fault is due within 1 s.
        time.sleep(1)
        assert _cli(settings, "set-alarm", "a1", "--pv", "X:1", "--location", "L", "--category", "C").returncode == 0
        code = w.proc.wait(60)
    finally:
        w.kill()
    out = w.output()
    assert code == 70, out[-3000:]
    (line,) = _critical(out)
    assert "the hot path failed" in line and "InjectedFault" in out


def test_wrong_partition_count_on_an_existing_topic_stops_the_worker_in_one_line(settings, tmp_path):
    from aiokafka.admin import NewTopic

    changelog = f"{_app_id(settings)}-alarm-state-changelog"

    async def create():
        admin = AIOKafkaAdminClient(**settings.kafka_kwargs())
        await admin.start()
        try:
            await admin.create_topics([NewTopic(changelog, 1, 1, topic_configs={"cleanup.policy": "compact"})])
        finally:
            await admin.close()

    asyncio.run(create())
    code, out = _run_to_exit(settings, tmp_path / "w1")
    assert code == 78, out[-3000:]
    (line,) = _critical(out)
    assert f"topic {changelog} has 1 partition(s), the engine needs 3" in line
    assert "Traceback" not in out


def test_an_unreachable_registry_at_start_stops_the_worker_in_one_line(settings, tmp_path):
    url = f"http://127.0.0.1:{_free_port()}/apis/ccompat/v7"
    code, out = _run_to_exit(settings, tmp_path / "w1", SCHEMA_REGISTRY=url)
    assert code == 69, out[-3000:]
    (line,) = _critical(out)
    assert f"cannot reach the schema registry at {url}" in line
    assert "Traceback" not in out


# --- 4. records in the wrong partition ------------------------------------------------

async def _send_to(s, topic, key: bytes, value, partition: int):
    producer = AIOKafkaProducer(**s.kafka_kwargs(), acks="all")
    await producer.start()
    try:
        await (await producer.send(s.topic(topic), key=key, value=value, partition=partition))
    finally:
        await producer.stop()


async def _dead_letters(s, codec):
    out = []
    async for rec in replay(s, s.topic("dead-letters")):
        if rec is not None:
            out.append({"_key": (rec.key or b"").decode(), **codec.decode("dead-letters", rec.value)})
    return out


def test_a_record_and_a_tombstone_in_the_wrong_partition_are_dead_lettered(settings, tmp_path):
    from tests.integration.engine import ActiveView

    s, codec = settings, make_codec(settings)
    view = ActiveView(s)
    w = Worker(s, tmp_path / "w1", "w1").start()
    view.workers.append(w)
    try:
        for name in ("unshelved-wrongly", "shelved-wrongly"):
            assert _cli(s, "set-alarm", name, "--external", "--location", "L", "--category", "C").returncode == 0
            assert _cli(s, "set-active", name).returncode == 0
        assert _cli(s, "set-shelved", "unshelved-wrongly", "--user", "op").returncode == 0
        view.wait_for(lambda st: st.get("unshelved-wrongly", {}).get("state") == "SHELVED"
                      and st.get("shelved-wrongly", {}).get("state") == "ACTIVE", 60, "the two alarms")
        # As kcat writes without -X topic.partitioner=murmur2_random: another partition.
        n = s.partitions
        tomb_key, rec_key = b"unshelved-wrongly", b"shelved-wrongly"
        tomb_wrong, rec_wrong = (partition_of(tomb_key, n) + 1) % n, (partition_of(rec_key, n) + 1) % n
        shelving = codec.encode("shelved-alarms", {"user": "op", "reason": "", "comment": "", "expiration": None,
                                                   "oneshot": False, "duration": None})
        asyncio.run(_send_to(s, "shelved-alarms", tomb_key, None, tomb_wrong))
        asyncio.run(_send_to(s, "shelved-alarms", rec_key, shelving, rec_wrong))

        def wrong_letters():
            found = {d["_key"]: d for d in asyncio.run(_dead_letters(s, codec)) if "wrong partition" in d["reason"]}
            return found if len(found) >= 2 else None

        by_key = _wait(wrong_letters, 60, "two dead letters")
        assert by_key["unshelved-wrongly"]["partition"] == tomb_wrong
        assert f"belongs in partition {partition_of(tomb_key, n)} of shelved-alarms" in \
            by_key["unshelved-wrongly"]["reason"]
        assert "-X topic.partitioner=murmur2_random" in by_key["shelved-wrongly"]["reason"]
        # Neither was applied: what the operators see agrees with the dead letters.
        time.sleep(2)
        assert view.state["unshelved-wrongly"]["state"] == "SHELVED"
        assert view.state["shelved-wrongly"]["state"] == "ACTIVE"
        listed = _cli(s, "list-shelved")
        assert listed.returncode == 0
        warnings = [line for line in listed.stderr.splitlines() if line.startswith("warning: key")]
        assert len(warnings) == 1 and "'unshelved-wrongly'" in warnings[0], listed.stderr
        assert f"belongs in partition {partition_of(tomb_key, n)}" in warnings[0]
    finally:
        view.close()
        w.stop()


# --- 3. liveness -----------------------------------------------------------------------

def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_heartbeat_status_healthz_and_metrics(rig, tmp_path):
    s = rig.s
    port = _free_port()
    w = Worker(s, tmp_path / "w1", "w1", extra_env={"ALARM_ENGINE_WEB_PORT": str(port),
                                                    "ALARM_ENGINE_HEARTBEAT_S": "1"}).start()
    rig.workers.append(w)
    rig.feed(200)
    _converge(s, rig.view, rig.oracle, "fed")

    seen = []

    def alive():
        proc = _cli(s, "status", "--json")
        report = json.loads(proc.stdout)
        ok = proc.returncode == 0 and report["alive"] == 1 and report["workers"][0]["recordsHandled"] > 0
        if ok:
            seen.append(report["workers"][0]["inputLag"])
        # All input handled: the lag reaches 0 (the control agents' offsets are committed
        # every few seconds, so a heartbeat just after the feed may still count some).
        return report if ok and report["workers"][0]["inputLagTotal"] == 0 else None

    try:
        report = _wait(alive, 30, "status to show the worker alive with no input lag")
    except AssertionError as e:
        raise AssertionError(f"{e}; the last input lags seen: {seen[-3:]}") from None
    (me,) = report["workers"]
    assert me["partitions"] == [0, 1, 2] and me["pid"] == w.proc.pid, me
    table = _cli(s, "status")
    assert table.returncode == 0 and "alive" in table.stdout and "1 worker(s) alive" in table.stdout
    code, body = _get(f"http://127.0.0.1:{port}/healthz")
    assert code == 200 and json.loads(body)["healthy"], body
    code, text = _get(f"http://127.0.0.1:{port}/metrics")
    assert code == 200
    records_in = {line.split("{")[1].split("}")[0]: float(line.rsplit(" ", 1)[1])
                  for line in text.splitlines() if line.startswith("alarm_engine_records_in_total{")}
    assert records_in['topic="alarms"'] > 0 and records_in['topic="pv-state"'] > 0, records_in
    assert 'alarm_engine_records_out_total{topic="active-alarms"}' in text
    assert "alarm_engine_record_age_seconds_bucket" in text and "alarm_engine_batch_size_bucket" in text
    w.kill()
    proc = _wait(lambda: (p := _cli(s, "status")).returncode == 1 and p, 30, "status to show the worker down")
    assert "DOWN" in proc.stdout and "no worker alive" in proc.stdout


# --- 5. quiet logs during a Kafka outage ------------------------------------------------

def test_kafka_outage_is_one_warning_and_one_info(rig, tmp_path):
    _outage(rig, tmp_path, down_s=20)


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_kafka_outage_of_five_minutes(rig, tmp_path):
    _outage(rig, tmp_path, down_s=300)


def _outage(rig, tmp_path, down_s: float):
    kafka = _own_stack(rig.s, "kafka")
    w = SupervisedWorker(rig.s, tmp_path / "w1", "w1", extra_env=FAST_FAILOVER).start()
    rig.workers.append(w)
    rig.feed(200)
    _converge(rig.s, rig.view, rig.oracle, "before the outage")
    before = len(w.lines)
    try:
        kafka.stop()
        time.sleep(down_s)
    finally:
        stack.start_service("kafka")
    _wait(lambda: any("Kafka reachable again" in line for line in list(w.lines)[before:]), 120,
          "the end of the outage in the log")
    rig.feed(200)
    _converge(rig.s, rig.view, rig.oracle, "after the outage", timeout=180)
    lines = list(w.lines)[before:]
    starts = [line for line in lines if "Kafka unreachable:" in line]
    reminders = [line for line in lines if "Kafka still unreachable" in line]
    errors = [line for line in lines if "[ERROR]" in line]
    print(f"\nseed {rig.seed}: Kafka down {down_s:.0f}s: {len(lines)} log lines, {len(starts)} outage warning(s), "
          f"{len(reminders)} reminder(s), {len(errors)} ERROR line(s), restarts {w.restarts()}")
    assert w.restarts() == 0 or down_s > 60, "\n".join(lines[-50:])
    assert len(starts) <= 1 + w.restarts(), "\n".join(starts)
    assert len(reminders) <= down_s / 30 + 2, "\n".join(reminders)
    assert len(errors) <= 10, "\n".join(errors[:40])


# --- 6. the engine's own topics --------------------------------------------------------

def test_garbage_on_internal_topics_gets_schema_level_reasons(settings, tmp_path):
    s, codec = settings, make_codec(settings)
    w = Worker(s, tmp_path / "w1", "w1").start()
    try:
        bad = [("alarm-deps", b"PV:1", b'{"alarm": 5, "uses": "x"}'), ("alarm-deps", b"PV:2", b"garbage"),
               ("alarm-inputs", b"a1", b'{"pv": "PV:1", "state": {"connection": "BAD"}}'),
               ("alarm-inputs", b"a2", b"[]")]
        for topic, key, value in bad:
            asyncio.run(_send_to(s, topic, key, value, partition_of(key, s.partitions)))

        def letters():
            found = [d for d in asyncio.run(_dead_letters(s, codec)) if d["sourceTopic"] in ("alarm-deps", "alarm-inputs")]
            return found if len(found) >= len(bad) else None

        reasons = sorted(d["reason"] for d in _wait(letters, 60, "the dead letters"))
        assert reasons == sorted([
            "alarm-deps: value.alarm: expected a string, got 5",
            "alarm-deps: malformed JSON: Expecting value: line 1 column 1 (char 0)",
            "alarm-inputs: value.state: matches none of PVState (fields given: connection)",
            "alarm-inputs: value: expected an object, got list"]), reasons
        assert "Traceback" not in w.output()
    finally:
        w.stop()
