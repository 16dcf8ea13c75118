"""The operator CLI against the real Kafka and schema registry."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time

import httpx
import pytest

from alarm_engine import cli
from alarm_engine.config import ALL_TOPICS
from alarm_engine.codec import load_schema
from alarm_engine.kafka_io import produce, replay

pytestmark = pytest.mark.integration


def run(settings, *args, capsys=None):
    """The CLI in this process; returns (exit status, stdout, stderr)."""
    status = cli.main(["--topic-prefix", settings.topic_prefix, *args])
    out, err = capsys.readouterr() if capsys else ("", "")
    return status, out, err


def listed(settings, capsys, command):
    status, out, err = run(settings, command, "--json", capsys=capsys)
    assert status == 0, err
    return json.loads(out), err


def test_set_list_unset_round_trip_for_every_topic(settings, capsys):
    cases = [
        (["set-monitored", "IOC:T1", "--mask", "VALUE,ALARM,LOG"], "list-monitored", "IOC:T1",
         lambda v: v["mask"] == ["VALUE", "ALARM", "LOG"]),
        (["set-alarm", "T1 hot", "--pv", "IOC:T1", "--location", "Hall A", "--category", "Cooling",
          "--priority", "P2_PROPERTY"], "list-alarms", "T1 hot",
         lambda v: v["producer"] == {"pv": "IOC:T1"} and v["priority"] == "P2_PROPERTY"),
        (["set-alarm", "Rule", "--rule", "`A` > 1 and `B` < 2", "--location", "x", "--category", "y"],
         "list-alarms", "Rule", lambda v: v["producer"]["expression"] == "`A` > 1 and `B` < 2"),
        (["set-shelved", "T1 hot", "--user", "op", "--duration", "1h", "--reason", "Chattering"],
         "list-shelved", "T1 hot",
         lambda v: v["user"] == "op" and 3_500_000 < v["expiration"] - time.time() * 1000 <= 3_600_000),
        (["set-shelved", "Rule", "--user", "op", "--oneshot"], "list-shelved", "Rule",
         lambda v: v["oneshot"] and v["expiration"] is None),
        (["set-active", "PSS", "--priority", "P1_LIFE", "--note", "trip"], "list-activations", "PSS",
         lambda v: v["priority"] == "P1_LIFE" and v["note"] == "trip"),
    ]
    for set_args, list_cmd, key, check in cases:
        status, out, err = run(settings, *set_args, capsys=capsys)
        assert status == 0, err
        state, _ = listed(settings, capsys, list_cmd)
        assert check(state[key]), state[key]
        assert run(settings, set_args[0], key, "--unset", capsys=capsys)[0] == 0
        state, _ = listed(settings, capsys, list_cmd)
        assert key not in state


def test_table_output_is_readable(settings, capsys):
    run(settings, "set-alarm", "A", "--pv", "X:1", "--location", "L", "--category", "C", capsys=capsys)
    status, out, _ = run(settings, "list-alarms", capsys=capsys)
    lines = out.splitlines()
    assert lines[0].split() == ["ALARM", "PRIORITY", "LOCATION", "CATEGORY", "PRODUCER"]
    assert lines[1].split()[:2] == ["A", "P3_PRODUCTIVITY"] and "pv X:1" in lines[1]
    assert lines[-1] == "(1 entry)"


def test_list_after_many_overwrites_and_tombstones_is_the_final_state(settings, capsys):
    rng = random.Random(7)
    expected: dict[str, list[str]] = {}
    masks = ["VALUE", "ALARM", "LOG", "ATTRIBUTE"]
    codec = cli._codec(settings)
    batch = []
    for _ in range(600):
        pv = f"PV:{rng.randrange(40)}"
        if rng.random() < 0.25:
            expected.pop(pv, None)
            batch.append((pv.encode(), None))
        else:
            mask = rng.sample(masks, rng.randint(1, 4))
            expected[pv] = mask
            batch.append((pv.encode(), codec.encode("monitored-pvs", {"mask": mask, "topic": None})))
    asyncio.run(produce(settings, settings.topic("monitored-pvs"), batch))
    state, _ = listed(settings, capsys, "list-monitored")
    assert {k: v["mask"] for k, v in state.items()} == expected


def console_produce(settings, topic: str, lines: list[str]) -> None:
    """Kafka's own console producer from the fetched jars, as an operator would."""
    proc = subprocess.run(
        [sys.executable, "-m", "alarm_engine.stack", "console-producer", "--",
         "--bootstrap-server", settings.bootstrap, "--topic", settings.topic(topic),
         "--property", "parse.key=true", "--property", "key.separator=|",
         "--property", "null.marker=NULL"],
        input="\n".join(lines) + "\n", text=True, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_json_from_kafka_console_producer_and_avro_from_cli_both_read(settings, capsys):
    run(settings, "set-alarm", "Avro one", "--pv", "A:1", "--location", "L", "--category", "C", capsys=capsys)
    console_produce(settings, "alarms", [
        'JSON one|{"producer": {"expression": "`A:1` > 3"}, "location": "L", "category": "C", "priority": "P1_LIFE"}',
        'JSON two|{"producer": {"source": "PSS"}, "location": "L", "category": "C"}',
        'JSON two|NULL',
    ])
    state, err = listed(settings, capsys, "list-alarms")
    assert set(state) == {"Avro one", "JSON one"}
    assert state["JSON one"]["producer"] == {"expression": "`A:1` > 3", "severity": "MAJOR"}
    assert state["JSON one"]["priority"] == "P1_LIFE"
    assert state["Avro one"]["producer"] == {"pv": "A:1"}


def test_malformed_records_are_reported_not_fatal(settings, capsys):
    run(settings, "set-monitored", "GOOD:1", capsys=capsys)
    asyncio.run(produce(settings, settings.topic("monitored-pvs"), [
        (b"BAD:1", b"\x00\x00\x00\x7f\xff junk"),
        (b"BAD:2", b'{"mask": ["VALUE", "COLOUR"]}'),
        (b"BAD:3", b"not json"),
    ]))
    run(settings, "set-monitored", "GOOD:2", capsys=capsys)
    state, err = listed(settings, capsys, "list-monitored")
    assert set(state) == {"GOOD:1", "GOOD:2"}
    assert "unknown schema id" in err
    assert "COLOUR" in err and "is not one of" in err
    assert "neither Confluent-framed Avro" in err
    assert "3 record(s) could not be read" in err


def test_schemas_are_registered_and_dump_schemas_prints_them(settings, capsys):
    status, out, err = run(settings, "register-schemas", capsys=capsys)
    assert status == 0, err
    from alarm_engine.config import VALUE_SCHEMAS

    assert out.count(": id ") == len(VALUE_SCHEMAS)
    status, out, err = run(settings, "dump-schemas", "alarms", capsys=capsys)
    assert status == 0, err
    header, body = out.split("\n", 1)
    assert header.startswith(f"# {settings.topic('alarms')}-value (registry id")
    assert json.loads(body)["name"] == "Alarm"
    fields = {f["name"]: f for f in json.loads(body)["fields"]}
    assert fields["producer"]["doc"] and fields["location"]["doc"]


def test_schema_evolution_from_the_original_scripts_is_backward_compatible(settings):
    """Each original schema is version 1 of a subject, ours version 2: the
    registry (global rule BACKWARD) must accept it; an incompatible change is refused."""
    from pathlib import Path

    from alarm_engine.config import VALUE_SCHEMAS

    root = Path(__file__).resolve().parents[2]
    legacy_dir = root / "schemas" / "legacy"
    before_management = root / "tests" / "data" / "schemas-before-management"
    base = settings.registry_url.rstrip("/")
    with httpx.Client(timeout=10) as http:
        for topic in ("monitored-pvs", "alarms", "shelved-alarms", "active-alarms"):
            name = VALUE_SCHEMAS[topic]
            subject = f"{settings.topic_prefix}compat-{name}"
            # The original scripts' version, the one before alarm management (where it changed), ours.
            versions = [json.loads((legacy_dir / f"{name}.avsc").read_text())]
            if (before_management / f"{name}.avsc").exists():
                versions.append(json.loads((before_management / f"{name}.avsc").read_text()))
            versions.append(load_schema(name))
            for schema in versions:
                r = http.post(f"{base}/subjects/{subject}/versions", json={"schema": json.dumps(schema)})
                assert r.status_code == 200, (subject, r.status_code, r.text)
            assert http.get(f"{base}/subjects/{subject}/versions").json() == list(range(1, len(versions) + 1))
        # A new required field without a default cannot read old records.
        bad = load_schema("alarms-value")
        bad["fields"].append({"name": "mandatory", "type": "string"})
        r = http.post(f"{base}/subjects/{settings.topic_prefix}compat-alarms-value/versions",
                      json={"schema": json.dumps(bad)})
        assert r.status_code == 409, r.text


def test_compacted_topic_loses_overwritten_records(settings):
    """The topics really compact: after the cleaner runs, only the last record
    of each key (and tombstones, until delete.retention.ms) remain."""
    topic = settings.topic("alarm-activations")

    async def go():
        for round_ in range(30):
            await produce(settings, topic, [(f"K{i}".encode(), f'{{"note": "{round_}"}}'.encode())
                                            for i in range(5)])
            await asyncio.sleep(0.05)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            # Roll the active segment (segment.ms) so the cleaner can reach the overwritten records.
            await produce(settings, topic, [(b"roll", b'{"note": "roll"}')])
            latest, count = {}, 0
            async for rec in replay(settings, topic):
                if rec is not None:
                    count += 1
                    latest[rec.key] = rec.value
            # 150 overwrites of 5 keys; what may remain is the last of each key plus
            # the few records of the newest segments, which the cleaner never touches.
            if count <= 30:
                return count, latest
            await asyncio.sleep(1)
        return count, latest

    count, latest = asyncio.run(go())
    assert count <= 30, f"{count} records remain of 150+ written to 6 keys"
    assert all(latest[f"K{i}".encode()] == b'{"note": "29"}' for i in range(5))


@pytest.mark.parametrize("args, message", [
    (["set-monitored", "X", "--mask", "VALUE,COLOUR"], "unknown monitor mask COLOUR"),
    (["set-shelved", "X", "--user", "op", "--duration", "5 fortnights"], "bad duration"),
    (["set-shelved", "X", "--user", "op", "--expiration", "yesterday"], "bad time"),
    (["set-alarm", "X", "--pv", "A"], "missing required option --location, --category"),
    (["set-alarm", "X", "--rule", "`A` > > 1", "--location", "l", "--category", "c"], "column"),
    (["set-alarm", "X", "--location", "l", "--category", "c"], "exactly one of"),
])
def test_bad_input_gives_one_line_and_nonzero_exit(settings, capsys, args, message):
    status, out, err = run(settings, *args, capsys=capsys)
    assert status != 0
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_unreachable_broker_is_one_line(capsys):
    status = cli.main(["--bootstrap-servers", "127.0.0.1:1", "set-active", "X"])
    err = capsys.readouterr().err
    assert status == 1
    assert err.startswith("alarm-engine set-active: cannot reach Kafka at 127.0.0.1:1")
    assert len(err.strip().splitlines()) == 1


def test_topic_set_up_is_idempotent(settings, capsys):
    # The fixture created the topics already: a second run creates nothing.
    status, out, err = run(settings, "topics", "create", capsys=capsys)
    assert status == 0, err
    assert out.startswith("created 0 topic(s)")
    status, out, err = run(settings, "topics", "describe", capsys=capsys)
    assert status == 0 and out.count("3 partition(s)") == len(ALL_TOPICS), out


def test_help_for_every_command():
    for command in ["set-monitored", "list-monitored", "set-alarm", "list-alarms", "set-shelved",
                    "list-shelved", "set-active", "list-active", "dump-schemas", "list-dead-letters"]:
        proc = subprocess.run([sys.executable, "-m", "alarm_engine.cli", command, "--help"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "usage: alarm-engine " + command in proc.stdout
