"""The engine end to end: real Kafka, registry, IOC and worker processes."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from tests.integration.ioc import caput
from tests.integration.engine import ActiveView, Worker

from alarm_engine import cli
from alarm_engine.codec import decode_key
from alarm_engine.kafka_io import produce, replay
from alarm_engine.registry import make_codec

pytestmark = pytest.mark.integration

NORMAL, MAJOR = 10, 95  # DEMO:PVn: HIHI=90 MAJOR


@pytest.fixture
def eng(settings, tmp_path, running_ioc):
    """A worker on fresh topics, a live view of active-alarms, and the CLI."""
    settings = dataclasses.replace(settings, connect_grace_s=2.0)
    workers: list[Worker] = []

    class Engine:
        s = settings
        ioc = running_ioc

        def worker(self, name="w1", data_dir=None):
            w = Worker(settings, data_dir or tmp_path / name, name).start()
            workers.append(w)
            return w

        def cli(self, *args):
            status = cli.main(["--topic-prefix", settings.topic_prefix, *args])
            assert status == 0, args

        def alarm_on(self, name, pv):
            self.cli("set-monitored", pv)
            self.cli("set-alarm", name, "--pv", pv, "--location", "L", "--category", "C")

    e = Engine()
    e.view = ActiveView(settings)
    e.view.workers = workers
    yield e
    e.view.close()
    for w in workers:
        w.kill()


def active(name, **fields):
    return lambda st: name in st and all(st[name][k] == v for k, v in fields.items())


def gone(name):
    return lambda st: name not in st


def test_pv_major_activates_and_normal_tombstones(eng):
    pv = eng.ioc.pv("PV0")
    caput(pv, NORMAL)
    eng.alarm_on("pv0 high", pv)
    eng.worker()
    caput(pv, MAJOR)
    eng.view.wait_for(active("pv0 high", severity="MAJOR", state="ACTIVE", cause="PV_ALARM"),
                      what="MAJOR alarm")
    assert "HIHI" in eng.view.state["pv0 high"]["message"]
    caput(pv, NORMAL)
    eng.view.wait_for(gone("pv0 high"), what="tombstone")
    assert eng.view.changes[-1][1:] == ("pv0 high", None)


def test_rule_over_two_pvs(eng):
    a, b = eng.ioc.pv("PV1"), eng.ioc.pv("PV2")
    caput(a, 1)
    caput(b, 1)
    for pv in (a, b):
        eng.cli("set-monitored", pv)
    eng.cli("set-alarm", "both", "--rule", f"`{a}` > 50 and `{b}` > 50", "--rule-severity", "MINOR",
            "--location", "L", "--category", "C")
    eng.worker()
    caput(a, 60)
    time.sleep(1.0)
    assert "both" not in eng.view.state
    caput(b, 70)
    eng.view.wait_for(active("both", cause="RULE", severity="MINOR"), what="rule alarm")
    caput(a, 5)
    eng.view.wait_for(gone("both"), what="rule cleared")


def test_shelving_timed_oneshot_and_unshelve(eng):
    pv = eng.ioc.pv("PV3")
    caput(pv, MAJOR)
    eng.alarm_on("shelf", pv)
    eng.worker()
    eng.view.wait_for(active("shelf", state="ACTIVE"))
    # Timed: shown SHELVED, then ACTIVE again by itself at the expiration.
    eng.cli("set-shelved", "shelf", "--user", "op", "--duration", "3s")
    eng.view.wait_for(active("shelf", state="SHELVED"), what="shelved")
    assert eng.view.state["shelf"]["shelving"]["kind"] == "TIMED"
    eng.view.wait_for(active("shelf", state="ACTIVE"), timeout=15, what="expiry")
    # One-shot: ends when the alarm returns to normal; the next alarm is ACTIVE.
    eng.cli("set-shelved", "shelf", "--user", "op", "--oneshot")
    eng.view.wait_for(active("shelf", state="SHELVED"), what="one-shot shelved")
    caput(pv, NORMAL)
    eng.view.wait_for(gone("shelf"))
    caput(pv, MAJOR)
    eng.view.wait_for(active("shelf", state="ACTIVE"), what="active after one-shot")
    # Indefinite, then unshelve: re-evaluated at once.
    eng.cli("set-shelved", "shelf", "--user", "op", "--reason", "Maintenance")
    eng.view.wait_for(active("shelf", state="SHELVED"))
    eng.cli("set-shelved", "shelf", "--unset")
    eng.view.wait_for(active("shelf", state="ACTIVE"), what="unshelved")
    caput(pv, NORMAL)


def test_ioc_killed_shows_disconnected_then_recovers(eng):
    pv = eng.ioc.pv("PV4")
    caput(pv, NORMAL)
    eng.alarm_on("link", pv)
    eng.worker()
    time.sleep(2)
    eng.ioc.kill()
    try:
        eng.view.wait_for(active("link", severity="INVALID", cause="DISCONNECTED"), timeout=60,
                          what="disconnected alarm")
    finally:
        eng.ioc.start()
    caput(pv, NORMAL)
    eng.view.wait_for(gone("link"), timeout=60, what="reconnected and normal")


def test_pv_that_never_connects_alarms_after_the_grace_period(eng):
    eng.alarm_on("ghost", "NO:SUCH:PV")
    eng.worker()
    eng.view.wait_for(active("ghost", cause="NEVER_CONNECTED", severity="INVALID"), timeout=30)


def test_monitored_pv_added_and_removed_at_run_time(eng):
    pv = eng.ioc.pv("PV5")
    caput(pv, MAJOR)
    eng.cli("set-alarm", "late", "--pv", pv, "--location", "L", "--category", "C")
    eng.worker()
    time.sleep(2)
    assert "late" not in eng.view.state  # not monitored yet
    eng.cli("set-monitored", pv)
    eng.view.wait_for(active("late", severity="MAJOR"), what="alarm after adding the PV")
    eng.cli("set-monitored", pv, "--unset")
    eng.view.wait_for(gone("late"), what="alarm cleared after removing the PV")
    caput(pv, NORMAL)


def test_external_activation_through_set_active(eng):
    eng.cli("set-alarm", "ext", "--external", "--location", "L", "--category", "C")
    eng.worker()
    eng.cli("set-active", "ext", "--priority", "P1_LIFE", "--note", "beam permit")
    eng.view.wait_for(active("ext", cause="EXTERNAL", priority="P1_LIFE"))
    assert eng.view.state["ext"]["message"] == "external: beam permit"
    eng.cli("set-active", "ext", "--unset")
    eng.view.wait_for(gone("ext"))


def test_bad_records_are_dead_lettered_and_the_worker_goes_on(eng):
    s = eng.s
    eng.worker()
    asyncio.run(produce(s, s.topic("alarms"), [
        (b"bad rule", b'{"producer": {"expression": "`A` >"}, "location": "L", "category": "C"}'),
        (b"bad bytes", b"\x00\x00\x00\x00\x63junk"),
        (b"", b'{"producer": {"source": "x"}, "location": "L", "category": "C"}'),
    ]))
    eng.cli("set-alarm", "fine", "--external", "--location", "L", "--category", "C")
    eng.cli("set-active", "fine")
    eng.view.wait_for(active("fine"), what="valid record after bad ones")

    async def dead_letters():
        codec = make_codec(s)
        out = []
        async for rec in replay(s, s.topic("dead-letters")):
            if rec is not None:
                out.append(codec.decode("dead-letters", rec.value))
        return out

    deadline = time.monotonic() + 20
    while True:
        letters = asyncio.run(dead_letters())
        if len(letters) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    by_key = {d["key"]: d for d in letters}
    assert set(by_key) == {b"bad rule", b"bad bytes", b""}, letters
    assert "column" in by_key[b"bad rule"]["reason"]
    assert "unknown schema id 99" in by_key[b"bad bytes"]["reason"]
    assert "missing key" in by_key[b""]["reason"]
    assert all(d["sourceTopic"] == "alarms" for d in letters)
    assert by_key[b"bad bytes"]["value"] == b"\x00\x00\x00\x00\x63junk"


def test_worker_restart_keeps_state(eng, tmp_path):
    pv = eng.ioc.pv("PV6")
    caput(pv, MAJOR)
    eng.alarm_on("persist", pv)
    w = eng.worker(data_dir=tmp_path / "keep")
    eng.view.wait_for(active("persist", severity="MAJOR"))
    since = eng.view.state["persist"]["since"]
    n_changes = len(eng.view.changes)
    w.stop()
    w2 = eng.worker(name="w1-again", data_dir=tmp_path / "keep")
    time.sleep(3)
    # Still the same alarm, same start time, no spurious tombstone or duplicate.
    assert eng.view.state["persist"]["since"] == since
    assert all(v is not None for _, k, v in eng.view.changes[n_changes:] if k == "persist")
    caput(pv, NORMAL)
    try:
        eng.view.wait_for(gone("persist"))
    except AssertionError:
        print(w2.output())
        raise
    assert w2.running


def test_two_workers_share_partitions_and_take_over(eng, tmp_path):
    pvs = [eng.ioc.pv(f"PV{i}") for i in range(10, 22)]
    for pv in pvs:
        caput(pv, NORMAL)
    for i, pv in enumerate(pvs):
        eng.alarm_on(f"fleet {i}", pv)
    w1 = eng.worker("w1")
    w2 = eng.worker("w2")
    time.sleep(5)  # let the second join and the group settle
    for pv in pvs:
        caput(pv, MAJOR)
    eng.view.wait_for(lambda st: all(f"fleet {i}" in st for i in range(len(pvs))), timeout=60,
                      what="all fleet alarms")
    w1.stop()
    # The survivor owns every partition now: each PV change still comes through.
    for pv in pvs:
        caput(pv, NORMAL)
    eng.view.wait_for(lambda st: not any(k.startswith("fleet") for k in st), timeout=90,
                      what="every fleet alarm cleared by the surviving worker")
    assert w2.running
