"""Bad input, nothing lost: one real worker, a corpus of bad records interleaved
with valid ones on every input topic (monitored-pvs, alarms, shelved-alarms,
alarm-activations, and pv-state, which the router consumes).

Every bad record must be dead-lettered exactly once, with its original key and
value, source topic/partition/offset and the reason the engine's checks give
(`verdict`, the same code run here); every valid record must take effect
(active-alarms, pv-state); the worker must keep running; the CLI's
`list-dead-letters` must show them.

The corpus is generated up front by hypothesis with a fixed seed
(tests/unit/test_bad_input_corpus.py): ALARM_ENGINE_BAD_INPUT_N records per
topic (default 200; the soak-sized run is e.g. 2000).

Rules over a PV nobody monitors: accepted, and the alarm stays inactive until
the PV reports (`ok-unknown` below). The engine cannot tell "not monitored
yet" from "never going to be monitored"; see the hand-over notes for the
proposed NOT_MONITORED/NEVER_CONNECTED-after-grace change in the core.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import random
import time
import uuid
from contextlib import redirect_stdout

import pytest
from aiokafka import AIOKafkaProducer

from alarm_engine import cli
from alarm_engine.config import Settings
from alarm_engine.kafka_io import replay
from alarm_engine.registry import make_codec
from alarm_engine.topics import ensure_topics
from tests.integration.engine import ActiveView, Worker
from tests.unit.test_bad_input_corpus import INPUT_TOPICS, NOW_MS, VALID, bad_corpus, verdict

pytestmark = pytest.mark.integration

N_BAD = int(os.environ.get("ALARM_ENGINE_BAD_INPUT_N", "200"))
SEED = 5
V = 5  # valid records of each kind
FAR = 32_503_593_600_000  # 2999-12-31: absurd but legal


@pytest.fixture
def s() -> Settings:
    # Own topics without FAST_COMPACTION: dead-letters is compacted by key, and every
    # dead letter must still be there to be counted.
    s = Settings.from_env(topic_prefix=f"b{uuid.uuid4().hex[:8]}.", partitions=3, connect_grace_s=2.0)
    asyncio.run(ensure_topics(s))
    return s


def _j(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def valid_records(codec) -> dict[str, list[tuple[bytes, bytes | None]]]:
    """Valid records of every input topic, and their expected effects (see the test)."""
    alarm = lambda producer, **kw: codec.encode("alarms", {**VALID["alarms"], "producer": producer, **kw})  # noqa: E731
    pv = lambda value, **kw: _j({**VALID["pv-state"], "value": value, **kw})  # noqa: E731
    out: dict[str, list] = {t: [] for t in INPUT_TOPICS}
    big = {f: "d" * 60_000 for f in ("docUrl", "edmPath", "description")}  # large but legal
    for i in range(V):
        out["alarms"] += [
            (f"ok-ext-{i}".encode(), alarm({"source": "t"}, **(big if i == 0 else {}))),
            (f"ok-shelf-{i}".encode(), _j({**VALID["alarms"], "producer": {"source": "t"}})),
            (f"ok-pvs-{i}".encode(), alarm({"pv": f"OKPVS:{i}"})),
            (f"ok-mon-{i}".encode(), alarm({"pv": f"OKMON:{i}"})),
            (f"ok-rule-{i}".encode(), alarm({"expression": f"`OKPVS:{i}` > 5 or `NOBODY:{i}` > 1",
                                             "severity": "MINOR"})),
        ]
        note = "n" * 60_000 if i == 0 else f"note {i} ✓"
        out["alarm-activations"] += [(f"ok-ext-{i}".encode(), codec.encode("alarm-activations", {"priority": "P1_LIFE", "note": note})),
                                     (f"ok-shelf-{i}".encode(), _j({"note": "x"}))]
        out["shelved-alarms"].append((f"ok-shelf-{i}".encode(), _j({"user": "op", "expiration": FAR if i % 2 else None})))
        out["monitored-pvs"].append((f"OKMON:{i}".encode(), codec.encode("monitored-pvs", VALID["monitored-pvs"]) if i % 2
                                     else _j({"mask": []})))
        out["pv-state"].append((f"OKPVS:{i}".encode(), codec.encode("pv-state", {**VALID["pv-state"], "value": 10.0}) if i % 2
                                else pv(10)))
    out["alarms"] += [(b"ok-unknown", alarm({"expression": "`NOBODY:AT:ALL` > 1", "severity": "MAJOR"})),
                      (b"ok-nan", alarm({"pv": "OKNAN"})), (b"ok-wave", alarm({"pv": "OKWAVE"}))]
    out["pv-state"] += [(b"OKNAN", b'{"connection":"CONNECTED","value":NaN,"severity":"MAJOR","status":"HIHI","receivedAt":1}'),
                        (b"OKWAVE", pv([1.5] * 1000))]
    out["monitored-pvs"] += [(b"NEVER:SET:1", None), (b"NEVER:SET:2", None)]  # tombstones: accepted, no effect
    for topic, recs in out.items():
        for k, v in recs:
            assert verdict(topic, k, v, codec) is None, (topic, k)
    return out


def expected_shown(st: dict) -> list[str]:
    """What active-alarms still lacks of the valid records' effects."""
    want = {}
    for i in range(V):
        want[f"ok-ext-{i}"] = dict(state="ACTIVE", cause="EXTERNAL", priority="P1_LIFE")
        want[f"ok-shelf-{i}"] = dict(state="SHELVED")
        want[f"ok-pvs-{i}"] = dict(state="ACTIVE", cause="PV_ALARM", severity="MAJOR")
        want[f"ok-mon-{i}"] = dict(cause="NEVER_CONNECTED", severity="INVALID")
        want[f"ok-rule-{i}"] = dict(cause="RULE", severity="MINOR")
    want["ok-nan"] = dict(cause="PV_ALARM", severity="MAJOR")
    want["ok-wave"] = dict(cause="PV_ALARM", severity="MAJOR")
    return [k for k, fields in want.items()
            if k not in st or any(st[k].get(f) != v for f, v in fields.items())]


async def send(settings: Settings, topic: str, recs) -> list[tuple[int, int]]:
    """Produce in order; (partition, offset) of each record."""
    producer = AIOKafkaProducer(**settings.kafka_kwargs(), acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, key=k, value=v) for k, v in recs]
        return [(md.partition, md.offset) for md in await asyncio.gather(*futures)]
    finally:
        await producer.stop()


async def read_all(settings: Settings, topic: str, codec, keys=None) -> list[dict]:
    out = []
    async for rec in replay(settings, settings.topic(topic)):
        if rec is not None and (keys is None or rec.key in keys):
            out.append({"_key": rec.key, **(codec.decode(topic, rec.value) or {})})
    return out


def test_bad_records_on_every_topic_are_dead_lettered_and_valid_ones_processed(s, tmp_path, capsys):
    codec = make_codec(s)
    rng = random.Random(SEED)
    valid = valid_records(codec)
    batches, bad_by_topic = {}, {}
    for topic in INPUT_TOPICS:
        # A compacted topic refuses a record without a key (the broker, not the engine):
        # the null-key draws cannot reach a worker; b"" keys do.
        bad = [b for b in bad_corpus(topic, codec, N_BAD, SEED, s) if b[1] is not None]
        bad_by_topic[topic] = bad
        items = [("bad", c, k, v, r) for c, k, v, r in bad] + [("ok", None, k, v, None) for k, v in valid[topic]]
        rng.shuffle(items)
        batches[topic] = items

    view = ActiveView(s)
    w = Worker(dataclasses.replace(s), tmp_path / "w", "bad-input",
               extra_env={"EPICS_CA_ADDR_LIST": "127.0.0.1:1", "EPICS_CA_AUTO_ADDR_LIST": "NO"})
    view.workers = [w]
    try:
        w.start()
        expected = {}  # (topic, partition, offset) -> (category, key, value, reason)
        t0 = time.monotonic()
        for topic, items in batches.items():
            coords = asyncio.run(send(s, s.topic(topic), [(k, v) for _, _, k, v, _ in items]))
            for (kind, cat, k, v, r), (p, o) in zip(items, coords):
                if kind == "bad":
                    expected[(topic, p, o)] = (cat, k, v, r)
        n_bad = len(expected)

        deadline = time.monotonic() + 180
        letters = []
        while time.monotonic() < deadline:
            letters = asyncio.run(read_all(s, "dead-letters", codec))
            if len(letters) >= n_bad:
                break
            assert w.running, w.output()[-4000:]
            time.sleep(2)
        view.wait_for(lambda st: not expected_shown(st), timeout=max(10, deadline - time.monotonic()),
                      what="every valid record's effect")
        elapsed = time.monotonic() - t0
        time.sleep(2)  # nothing more may come (a duplicate dead letter, say)
        letters = asyncio.run(read_all(s, "dead-letters", codec))

        seen: dict[tuple, dict] = {}
        duplicates = []
        for d in letters:
            coord = (d["sourceTopic"], d["partition"], d["offset"])
            if coord in seen:
                duplicates.append(coord)
            seen[coord] = d
        missing = sorted(set(expected) - set(seen))
        unexpected = sorted(set(seen) - set(expected))
        assert not duplicates, f"dead-lettered more than once: {duplicates[:10]}"
        assert not missing, f"{len(missing)} bad record(s) not dead-lettered, e.g. " + \
            "; ".join(f"{c}: {expected[c][0]} {expected[c][3]}" for c in missing[:5])
        assert not unexpected, "valid records dead-lettered: " + \
            "; ".join(f"{c}: {seen[c]['key']!r} {seen[c]['reason']}" for c in unexpected[:5])
        for coord, (cat, k, v, reason) in expected.items():
            d = seen[coord]
            assert d["key"] == k and d["value"] == v, (coord, cat)
            assert d["_key"] == (k or b"")
            # The same check's reason (a schema-resolution error quotes the writer schema
            # as the worker fetched it, so only the start is compared).
            assert d["reason"][:40] == reason[:40], (coord, cat, d["reason"][:200], reason[:200])
            assert "internal error" not in d["reason"]

        st = view.state
        assert "ok-unknown" not in st  # a rule over an unmonitored PV stays inactive
        assert st["ok-ext-1"]["message"] == "external: note 1 ✓"
        assert len(st["ok-ext-0"]["message"]) > 60_000  # the large-but-legal note came through
        mon = {f"OKMON:{i}".encode() for i in range(V)}  # pv-state also holds the bad ones sent
        pv_states = {r["_key"]: r for r in asyncio.run(read_all(s, "pv-state", codec, mon))}
        for i in range(V):  # the CA bridge took the valid monitored PVs
            assert pv_states[f"OKMON:{i}".encode()]["connection"] == "NEVER_CONNECTED"
        assert w.running
        assert "Traceback" not in w.output(), w.output()[-4000:]

        # The operator sees them (keyed by the original key: one row per distinct key).
        capsys.readouterr()
        assert cli.main(["--topic-prefix", s.topic_prefix, "list-dead-letters", "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)
        keys = {(k or b"").decode("utf-8", errors="replace") for _, k, _, _ in expected.values()}
        assert keys <= set(shown), sorted(keys - set(shown))[:5]
        assert all(shown[k]["reason"] for k in keys)

        with capsys.disabled():
            print(f"\nbad input: one worker, {elapsed:.0f}s for {n_bad} bad + "
                  f"{sum(len(v) for v in valid.values())} valid records")
            print(f"{'topic':<18} {'bad tried':>9} {'dead-lettered':>13} {'valid sent':>10} {'valid processed':>15}")
            for topic in INPUT_TOPICS:
                n = len(bad_by_topic[topic])
                dl = sum(1 for c in seen if c[0] == topic)
                print(f"{topic:<18} {n:>9} {dl:>13} {len(valid[topic]):>10} {len(valid[topic]):>15}")
    finally:
        view.close()
        w.kill()
