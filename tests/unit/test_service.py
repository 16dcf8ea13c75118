"""The pure parts of the worker as a service: partitioner, preflight checks, fleet
status, the outage log gate, static membership ids, health."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from alarm_engine import partitioning, status
from alarm_engine.worker import health, membership, preflight, quiet_logs
from alarm_engine.codec import BadRecord

# Kafka's own test vectors (clients/src/test/java/org/apache/kafka/common/utils/UtilsTest.java).
JAVA_MURMUR2 = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


@pytest.mark.parametrize("key,expected", sorted(JAVA_MURMUR2.items()))
def test_murmur2_is_the_java_clients(key, expected):
    assert partitioning.murmur2(key) == expected


@given(st.binary(max_size=64), st.integers(1, 64))
def test_partition_of_is_aiokafkas(key, n):
    # aiokafka's DefaultPartitioner is what the CLI and the engine write with.
    from aiokafka.partitioner import DefaultPartitioner

    assert partitioning.partition_of(key, n) == DefaultPartitioner()(key, list(range(n)), list(range(n)))


def test_wrong_partition_names_the_right_one_and_the_kcat_option():
    key = b"Hall A temperature"
    right = partitioning.partition_of(key, 3)
    wrong = (right + 1) % 3
    assert partitioning.wrong_partition("shelved-alarms", key, right, 3) is None
    reason = partitioning.wrong_partition("shelved-alarms", key, wrong, 3)
    assert f"belongs in partition {right}" in reason and f"not {wrong}" in reason
    assert "-X topic.partitioner=murmur2_random" in reason
    # The engine's own topics are not checked.
    assert partitioning.wrong_partition("pv-state", key, wrong, 3) is None


def test_checked_compute_rejects_a_tombstone_in_the_wrong_partition_too():
    class Msg:
        key = b"alarm1"
        partition = (partitioning.partition_of(b"alarm1", 3) + 1) % 3

    calls = []
    compute = partitioning.checked(lambda *a: calls.append(a) or ["out"], 3)
    with pytest.raises(BadRecord, match="wrong partition"):
        compute("shelved-alarms", "alarm1", None, Msg())
    assert calls == []
    Msg.partition = partitioning.partition_of(b"alarm1", 3)
    assert compute("shelved-alarms", "alarm1", None, Msg()) == ["out"]


def test_split_keys():
    assert partitioning.split_keys({"a": {0}, "b": {1, 2}}) == {"b": [1, 2]}
    line = partitioning.split_key_warning("shelved-alarms", "b", [1, 2], 3)
    assert "partitions 1, 2" in line and "murmur2_random" in line


def test_partition_problems_name_the_topic():
    specs = [preflight.TopicSpec("alarms", 3, {}), preflight.TopicSpec("x-changelog", 3, {})]
    assert preflight.partition_problems(specs, {"alarms": 3, "x-changelog": 3}) == []
    (line,) = preflight.partition_problems(specs, {"alarms": 3, "x-changelog": 1})
    assert line.startswith("topic x-changelog has 1 partition(s), the engine needs 3")


def _meta(name, partitions, leader=0, error=0):
    return {"topic": name, "error_code": error,
            "partitions": [{"partition": p, "error_code": 0, "leader": leader} for p in range(partitions)]}


def test_not_ready_until_every_partition_has_a_leader():
    specs = [preflight.TopicSpec("a", 3, {}), preflight.TopicSpec("b", 1, {})]
    assert preflight.not_ready(specs, [_meta("a", 3), _meta("b", 1)]) == []
    assert preflight.not_ready(specs, [_meta("a", 0), _meta("b", 1)]) == ["a"]  # the KRaft race
    assert preflight.not_ready(specs, [_meta("a", 3, leader=-1), _meta("b", 1)]) == ["a"]
    assert preflight.not_ready(specs, [_meta("a", 3), _meta("b", 1, error=3)]) == ["b"]
    assert preflight.not_ready(specs, [_meta("a", 3)]) == ["b"]


def _hb(t, partitions, interval=3.0, total=3):
    return {"time": t, "intervalSeconds": interval, "partitions": partitions, "partitionsTotal": total}


def test_fleet_alive_within_three_intervals():
    now = 100_000
    report = status.fleet({"w1": _hb(now - 9_000, [0, 1]), "w2": _hb(now - 2_000, [2])}, now)
    assert report["ok"] and report["alive"] == 2 and report["unowned"] == []
    report = status.fleet({"w1": _hb(now - 9_001, [0, 1]), "w2": _hb(now - 2_000, [2])}, now)
    assert not report["ok"] and report["alive"] == 1 and report["unowned"] == [0, 1]
    assert "partition(s) 0, 1 owned by no live worker" in report["problems"]


def test_fleet_with_no_live_worker_is_not_ok():
    assert status.fleet({}, 0)["problems"] == ["no worker has ever sent a heartbeat"]
    report = status.fleet({"w1": _hb(0, [0, 1, 2])}, 60_000)
    assert not report["ok"] and report["problems"] == ["no worker alive"]


def test_outage_gate_one_warning_reminders_and_one_end():
    gate = quiet_logs.OutageGate(remind_s=30)
    actions = [gate.on_noise(t / 10) for t in range(0, 950)]  # 95 s of lines, ten a second
    assert actions[0] == "start"
    assert actions.count("start") == 1
    assert actions.count("remind") == 3  # at 30, 60, 90 s
    assert gate.on_ok(100.0) == (100.0, 950 - 4)
    assert gate.on_ok(101.0) is None  # ended once
    assert gate.last_outage_s == 100.0
    assert gate.on_noise(110.0) == "drop"  # the tail of the outage, while the broker settles
    assert gate.on_noise(100.0 + quiet_logs.SETTLE_S) == "start"  # a new outage


def _record(name, msg, level=logging.ERROR):
    return logging.LogRecord(name, level, __file__, 1, msg, None, None)


def test_quiet_filter_rewrites_the_first_and_drops_the_rest():
    now = [0.0]
    f = quiet_logs.QuietFilter(quiet_logs.OutageGate(remind_s=30), clock=lambda: now[0])
    side = _record("faust.transport.consumer", "Timer commit is overlapping (interval=2.8)", logging.WARNING)
    assert f.filter(side)  # no outage yet: a side effect alone passes as it is
    assert side.getMessage().startswith("Timer commit")
    first = _record("aiokafka.conn", "Unable connect to node with id 1: [Errno 111] Connection refused")
    assert f.filter(first) and first.levelname == "WARNING" and first.getMessage().startswith("Kafka unreachable")
    assert f.filter(first)  # a second handler gets the same decision
    assert not f.filter(_record("aiokafka.cluster", "Unable to update metadata from [1]"))
    assert not f.filter(_record("faust.transport.consumer", "Timer commit is overlapping", logging.WARNING))
    assert f.filter(_record("alarm_engine", "send to active-alarms failed (KafkaConnectionError)"))  # ours
    now[0] = 31.0
    reminder = _record("aiokafka.conn", "Unable connect to node with id 1")
    assert f.filter(reminder) and "still unreachable after 31 s (2 line(s) held back" in reminder.getMessage()


def test_instance_id_is_kept_in_the_data_dir_and_can_be_turned_off(tmp_path):
    a = membership.instance_id("app", str(tmp_path / "w1"), env={}, host="h")
    assert a.startswith("app-h-") and a == membership.instance_id("app", str(tmp_path / "w1"), env={})
    assert a != membership.instance_id("app", str(tmp_path / "w2"), env={}, host="h")
    assert membership.instance_id("app", "/d", env={"ALARM_ENGINE_INSTANCE_ID": "x"}) == "x"
    assert membership.instance_id("app", "/d", env={"ALARM_ENGINE_STATIC_MEMBERSHIP": "0"}) is None
    s = membership.group_settings("app", str(tmp_path / "w1"), env={})
    assert s["broker_session_timeout"] <= 10 and s["broker_heartbeat_interval"] < s["broker_session_timeout"] / 2
    assert membership.group_settings("app", str(tmp_path / "w1"), env={}, static=False)["consumer_group_instance_id"] is None


def test_web_port_is_kept_in_the_data_dir(tmp_path):
    port, same = membership.web_port(str(tmp_path), env={})
    assert same  # a first start
    assert membership.web_port(str(tmp_path), env={}) == (port, True)
    assert membership.web_port(str(tmp_path), env={"ALARM_ENGINE_WEB_PORT": "1234"}) == (1234, True)


def test_health():
    ok, body = health.health({"a": True, "b": True}, False, [0, 1], False)
    assert ok and body["reasons"] == []
    ok, body = health.health({"a": True, "b": False}, True, [], True)
    assert not ok and body["reasons"] == ["agent b not running", "Kafka unreachable"]
    assert body["waitingForPartitions"]


def test_metrics_text_has_the_series():
    m = health.Metrics()
    m.record_in("pv-state", 10.0, 10.02)
    m.record_out("dead-letters")
    m.batch("alarm-state", 7)
    m.set_gauges({"alarms": 4}, {"connected": 2})
    text = m.text().decode()
    for series in ('alarm_engine_records_in_total{topic="pv-state"} 1.0',
                   'alarm_engine_records_out_total{topic="dead-letters"} 1.0',
                   "alarm_engine_dead_letters_total 1.0", 'alarm_engine_batch_size_count{agent="alarm-state"} 1.0',
                   'alarm_engine_record_age_seconds_bucket{le="0.025",topic="pv-state"} 1.0',
                   'alarm_engine_input_lag{topic="alarms"} 4.0', 'alarm_engine_ca_pvs{state="connected"} 2.0'):
        assert series in text, series


@pytest.mark.parametrize("topic,value,reason", [
    ("alarm-deps", b'{"alarm": 5, "uses": "x"}', "alarm-deps: value.alarm: expected a string, got 5"),
    ("alarm-deps", b'{"alarm": "a", "uses": "x"}', "alarm-deps: value.uses: expected true or false"),
    ("alarm-deps", b"garbage", "alarm-deps: malformed JSON"),
    ("alarm-deps", None, "alarm-deps: a tombstone is not a valid record here"),
    ("alarm-deps", b'{"alarm": "", "uses": true}', "alarm-deps: value.alarm: must be 1 to"),
    ("alarm-inputs", b'{"tick": "a"}', "alarm-inputs: value.tick: expected an integer"),
    ("alarm-inputs", b'{"x": 1}', "alarm-inputs: value: unknown field 'x'"),
    ("alarm-inputs", b"5", "alarm-inputs: value: expected an object, got int"),
    ("alarm-inputs", b'{"pv": "X", "state": {"connection": "BAD"}}', "alarm-inputs: value.state"),
    ("alarm-inputs", b"\xff", "alarm-inputs: value is not UTF-8"),
])
def test_internal_records_get_schema_level_reasons(topic, value, reason):
    from alarm_engine import internal_records

    with pytest.raises(BadRecord) as e:
        internal_records.VALIDATORS[topic](value)
    assert str(e.value).startswith(reason), str(e.value)


def test_internal_records_accept_what_the_engine_writes():
    from alarm_engine import engine, internal_records

    state = {"connection": "CONNECTED", "value": 1.5, "severity": "MAJOR", "status": "HIHI",
             "iocTimestamp": 1, "receivedAt": 2}
    assert internal_records.alarm_deps(engine._json({"alarm": "a", "uses": True}))["uses"] is True
    assert internal_records.alarm_input(engine._json({"tick": 5})) == {"tick": 5}
    assert internal_records.alarm_input(engine._json({"pv": "X", "state": state}))["state"] == state
    assert internal_records.alarm_input(engine._json({"pv": "X", "state": None}))["state"] is None
