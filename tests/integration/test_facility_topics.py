"""apply / diff / prune / export against the real Kafka and schema registry."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from alarm_engine import cli
from alarm_engine.config import Settings
from alarm_engine.facility import diff, fileformat, state
from alarm_engine.kafka_io import produce
from alarm_engine.registry import make_codec

pytestmark = pytest.mark.integration

EXAMPLE = str(Path(__file__).resolve().parents[1] / "data" / "facility" / "example.yaml")
TOPICS = fileformat.CONFIG_TOPICS  # the location tree, monitored PVs, alarms


def run(settings, capsys, *args):
    status = cli.main(["--topic-prefix", settings.topic_prefix, *args])
    out, err = capsys.readouterr()
    return status, out, err


async def _ends(settings) -> dict[str, int]:
    c = AIOKafkaConsumer(**settings.kafka_kwargs(), group_id=None, enable_auto_commit=False)
    await c.start()
    try:
        await c._client.force_metadata_update()
        out = {}
        for t in TOPICS:
            name = settings.topic(t)
            tps = [TopicPartition(name, p) for p in sorted(c.partitions_for_topic(name))]
            out[t] = sum((await c.end_offsets(tps)).values())
        return out
    finally:
        await c.stop()


def ends(settings):
    return asyncio.run(_ends(settings))


def current(settings) -> dict:
    s = asyncio.run(state.read(settings, make_codec(settings), list(TOPICS)))
    assert s.unreadable == []
    return s.topics


def desired(*paths) -> dict:
    d, problems = fileformat.load(list(paths), Settings())
    assert problems == []
    return d.records


def test_apply_is_idempotent_and_dry_run_writes_nothing(settings, capsys, tmp_path):
    status, out, err = run(settings, capsys, "apply", EXAMPLE, "--dry-run")
    assert status == 0, err
    assert "alarms: 5 added, 0 changed, 0 not in the files (kept; --prune removes them), 0 unchanged" in out
    assert "alarm-locations: 3 added" in out
    assert "dry run: nothing written (13 record(s) would be)" in out
    assert ends(settings) == {t: 0 for t in TOPICS}

    status, out, err = run(settings, capsys, "apply", EXAMPLE)
    assert status == 0, err
    assert "wrote 13 record(s)" in out
    assert current(settings) == desired(EXAMPLE)
    before = ends(settings)

    status, out, err = run(settings, capsys, "apply", EXAMPLE)
    assert status == 0, err
    assert "nothing to write: the topics already hold what the files say" in out
    assert ends(settings) == before

    # The CLI's own list command agrees.
    status, out, _ = run(settings, capsys, "list-alarms", "--json")
    assert json.loads(out)["Gauge 2"]["priority"] == "P4_DIAGNOSTIC"


def test_one_change_writes_one_record_and_prune_only_when_asked(settings, capsys, tmp_path):
    assert run(settings, capsys, "apply", EXAMPLE)[0] == 0
    text = Path(EXAMPLE).read_text()
    changed = tmp_path / "changed.yaml"
    # Gauge 2 loses its priority (back to the default), PSS trip is gone from the file.
    body = text.replace("Gauge 2: {pv: VAC:G2, priority: P4_DIAGNOSTIC}", "Gauge 2: {pv: VAC:G2}")
    body = body.replace("  PSS trip:\n    external: PSS\n    location: CEBAF\n    category: Safety\n"
                        "    priority: P1_LIFE\n", "")
    assert body != text and "PSS trip" not in body
    changed.write_text(body)
    before = ends(settings)
    status, out, err = run(settings, capsys, "apply", str(changed))
    assert status == 0, err
    assert "alarms: 0 added, 1 changed, 1 not in the files (kept; --prune removes them), 3 unchanged" in out
    assert "  ~ Gauge 2: priority: 'P4_DIAGNOSTIC' → 'P3_PRODUCTIVITY'" in out
    assert "  ? PSS trip" in out
    after = ends(settings)
    assert after["alarms"] == before["alarms"] + 1 and after["monitored-pvs"] == before["monitored-pvs"]
    assert "PSS trip" in current(settings)["alarms"]

    status, out, err = run(settings, capsys, "apply", str(changed), "--prune")
    assert status == 0, err
    assert "alarms: 0 added, 0 changed, 1 removed, 4 unchanged" in out and "  - PSS trip" in out
    assert current(settings) == desired(str(changed))
    assert ends(settings)["alarms"] == after["alarms"] + 1  # one tombstone
    assert "nothing to write" in run(settings, capsys, "apply", str(changed), "--prune")[1]


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_export_round_trip_into_other_topics(settings, capsys, tmp_path, fmt):
    # State written by set-* commands (and a kcat-style JSON record), not only by apply.
    assert run(settings, capsys, "apply", EXAMPLE)[0] == 0
    assert run(settings, capsys, "set-alarm", "Extra", "--rule", "`X:1` > 2", "--location", "Hall A",
               "--category", "RF", "--rule-severity", "INVALID")[0] == 0
    assert run(settings, capsys, "set-monitored", "X:1", "--mask", "VALUE")[0] == 0
    asyncio.run(produce(settings, settings.topic("monitored-pvs"),
                        [(b"JSON:PV", b'{"mask": ["ALARM"]}')]))
    out_file = tmp_path / f"export.{fmt}"
    status, out, err = run(settings, capsys, "export", "--format", fmt, "-o", str(out_file))
    assert status == 0, err
    source_state = current(settings)

    other = Settings.from_env(topic_prefix=f"t{uuid.uuid4().hex[:8]}.", partitions=3)
    from alarm_engine.stack import FAST_COMPACTION
    from alarm_engine.topics import ensure_topics

    asyncio.run(ensure_topics(other, extra_config=FAST_COMPACTION))
    status, out, err = run(other, capsys, "apply", str(out_file))
    assert status == 0, err
    assert current(other) == source_state
    # And the exported file applied back to where it came from changes nothing.
    status, out, err = run(settings, capsys, "apply", str(out_file), "--prune")
    assert status == 0 and "nothing to write" in out, out + err


def test_a_bad_file_is_refused_whole(settings, capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(EXAMPLE).read_text() + "  - alarms:\n      Broken: {rule: '`A` >', location: Hall A}\n")
    status, out, err = run(settings, capsys, "apply", str(bad))
    assert status == 1
    line = len(Path(EXAMPLE).read_text().splitlines()) + 2
    assert f"{bad}:{line}: alarms[Broken].rule: " in err and err.strip().endswith("nothing was written")
    assert ends(settings) == {t: 0 for t in TOPICS}


def test_an_apply_cut_short_is_completed_by_the_next(settings, capsys):
    """A broker lost in the middle of an apply leaves some keys written and others not (each
    record is a whole value for its key, acknowledged or not). Any such subset, written
    here directly, is completed by the next apply, which writes exactly the rest."""
    want = desired(EXAMPLE)
    codec = make_codec(settings)
    plan = diff.plan({}, want, prune=False).ordered()
    rng = random.Random(5)
    landed = [w for w in plan if rng.random() < 0.5]
    assert 0 < len(landed) < len(plan)
    for topic in TOPICS:
        recs = [(k.encode(), codec.encode(t, v)) for t, k, v in landed if t == topic]
        asyncio.run(produce(settings, settings.topic(topic), recs))
    status, out, err = run(settings, capsys, "apply", EXAMPLE)
    assert status == 0, err
    assert f"wrote {len(plan) - len(landed)} record(s)" in out
    assert current(settings) == want


def test_records_carry_user_and_host_headers(settings, capsys, monkeypatch):
    monkeypatch.setenv("USER", "operator7")
    assert run(settings, capsys, "apply", EXAMPLE)[0] == 0

    c_headers = []

    async def read():
        c = AIOKafkaConsumer(settings.topic("alarms"), **settings.kafka_kwargs(), group_id=None,
                             auto_offset_reset="earliest", enable_auto_commit=False)
        await c.start()
        try:
            batch = await c.getmany(timeout_ms=5000)
            for msgs in batch.values():
                for m in msgs:
                    c_headers.append(dict(m.headers))
        finally:
            await c.stop()

    asyncio.run(read())
    assert c_headers and all(h["user"] == b"operator7" and h["host"] and h["client"] == b"alarm-engine apply"
                             for h in c_headers)


def test_export_phoebus_xml_and_import_it_back(settings, capsys, tmp_path):
    assert run(settings, capsys, "apply", EXAMPLE)[0] == 0
    xml = tmp_path / "alarms.xml"
    status, out, err = run(settings, capsys, "export", "--format", "phoebus-xml", "--config-name", "CEBAF",
                           "-o", str(xml))
    assert status == 0, err
    assert "note: 2 alarm(s) rule or external: not exported" in err
    back = tmp_path / "back.yaml"
    status, out, err = run(settings, capsys, "import-phoebus", str(xml), "-o", str(back))
    assert status == 0, err
    imported = desired(str(back))["alarms"]
    # Phoebus names an alarm by its PV: the per-PV alarms come back under their PVs' names.
    assert {a["producer"]["pv"] for a in imported.values()} == {"IOC1:TEMP", "VAC:G1", "VAC:G2"}
    # The location tree (alarm-locations: Hall B under CEBAF) is Phoebus' component tree, whose
    # locations the importer names by their paths.
    assert imported["VAC:G1"]["location"] == "CEBAF/Hall B" and imported["VAC:G1"]["docUrl"] == "/docs/vacuum"
