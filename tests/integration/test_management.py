"""Alarm management end to end: real Kafka, registry, IOC and worker processes; the
operator's acks and disables through the CLI, and their survival of a killed worker."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.integration.ioc import caput
from tests.integration.test_end_to_end import MAJOR, NORMAL, active, eng, gone  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration


def test_ack_latch_and_disable_survive_a_killed_worker(eng, tmp_path):
    pv, latched = eng.ioc.pv("PV3"), eng.ioc.pv("PV4")
    caput(pv, NORMAL)
    caput(latched, NORMAL)
    eng.alarm_on("pv3 high", pv)
    eng.cli("set-monitored", latched)
    eng.cli("set-alarm", "pv4 latched", "--pv", latched, "--location", "L", "--category", "C", "--latching")
    w = eng.worker("w1", data_dir=tmp_path / "w1")
    caput(pv, MAJOR)
    caput(latched, MAJOR)
    eng.view.wait_for(active("pv3 high", state="ACTIVE", ackState="UNACK"), what="pv3 unacknowledged")
    eng.view.wait_for(active("pv4 latched", state="ACTIVE", ackState="UNACK"), what="pv4 unacknowledged")

    eng.cli("ack", "pv3 high", "--comment", "seen")
    eng.view.wait_for(active("pv3 high", ackState="ACK"), what="pv3 acknowledged")
    assert eng.view.state["pv3 high"]["ack"]["comment"] == "seen"
    caput(latched, NORMAL)  # latched: still shown until acknowledged
    eng.view.wait_for(active("pv4 latched", ackState="RTN_UNACK", severity="MAJOR"), what="pv4 latched")

    w.kill()  # between the alarm and its ack: the ack and the latch are in Kafka, not in the worker
    eng.worker("w1", data_dir=tmp_path / "w1")
    caput(pv, MAJOR + 1)  # a new value, same severity: still acknowledged
    eng.view.wait_for(active("pv3 high", ackState="ACK"), what="pv3 still acknowledged after the restart")
    assert eng.view.state["pv4 latched"]["ackState"] == "RTN_UNACK"

    eng.cli("ack", "pv4 latched")
    eng.view.wait_for(gone("pv4 latched"), what="the latched alarm gone once acknowledged")

    eng.cli("disable", "pv3 high", "--reason", "maintenance", "--duration", "1h")
    eng.view.wait_for(active("pv3 high", state="DISABLED"), what="pv3 disabled")
    assert eng.view.state["pv3 high"]["disabled"]["reason"] == "maintenance"
    eng.cli("enable", "pv3 high")
    eng.view.wait_for(active("pv3 high", state="ACTIVE", severity="MAJOR"), what="pv3 enabled, still in alarm")
    caput(pv, NORMAL)
    eng.view.wait_for(gone("pv3 high"), what="pv3 clears")


def test_location_summaries_roll_up_acks_and_disables(eng, tmp_path):
    from tests.integration.engine import ActiveView

    summaries = ActiveView(eng.s, "alarm-summaries")
    try:
        bay, hall = eng.ioc.pv("PV5"), eng.ioc.pv("TEMP")  # TEMP: HIGH=50 MINOR
        caput(bay, NORMAL)
        caput(hall, 20)
        eng.cli("set-location", "Site")
        eng.cli("set-location", "Hall", "--parent", "Site")
        eng.cli("set-location", "Bay", "--parent", "Hall")
        for name, pv, loc in (("bay pump", bay, "Bay"), ("hall fan", hall, "Hall")):
            eng.cli("set-monitored", pv)
            eng.cli("set-alarm", name, "--pv", pv, "--location", loc, "--category", "C")
        eng.worker("w1", data_dir=tmp_path / "w1")
        summaries.wait_for(lambda st: st.get("Site", {}).get("defined") == 2, what="Site summary: 2 alarms below")
        assert summaries.state["Site"]["level"] == "OK"

        caput(bay, MAJOR)
        summaries.wait_for(lambda st: st.get("Site", {}).get("level") == "MAJOR", what="Site raised by Bay")
        assert summaries.state["Hall"]["level"] == summaries.state["Bay"]["level"] == "MAJOR"
        assert summaries.state["Site"]["unacknowledged"] == 1

        eng.cli("ack", "--location", "Hall")  # every alarm at or below Hall
        summaries.wait_for(lambda st: st.get("Site", {}).get("level") == "MAJOR_ACK", what="acknowledged below Hall")
        caput(hall, 60)  # a MINOR, unacknowledged, outranks the acknowledged MAJOR
        summaries.wait_for(lambda st: st.get("Site", {}).get("level") == "MINOR", what="unacked MINOR above acked MAJOR")
        assert summaries.state["Bay"]["level"] == "MAJOR_ACK"

        eng.cli("disable", "--location", "Site", "--reason", "maintenance")
        summaries.wait_for(lambda st: st.get("Site", {}).get("level") == "OK"
                           and st["Site"]["states"]["DISABLED"] == 2, what="all disabled: Site OK")
        # A cycle: refused by the CLI, and dead-lettered by the engine when written past it.
        from alarm_engine import cli
        from alarm_engine.kafka_io import produce
        from alarm_engine.registry import make_codec

        assert cli.main(["--topic-prefix", eng.s.topic_prefix, "set-location", "Site", "--parent", "Bay"]) == 2
        cyclic = make_codec(eng.s).encode("alarm-locations", {"parent": "Bay", "description": ""})
        asyncio.run(produce(eng.s, eng.s.topic("alarm-locations"), [(b"Site", cyclic)]))
        dead = ActiveView(eng.s, "dead-letters")
        try:
            dead.wait_for(lambda st: "would make a cycle" in st.get("Site", {}).get("reason", ""),
                          what="the cyclic location dead-lettered")
        finally:
            dead.close()
        assert summaries.state["Site"]["defined"] == 2  # the tree as it was
        eng.cli("set-location", "Hall", "--unset")  # Hall, still named by Bay and an alarm, is a top of its own
        summaries.wait_for(lambda st: st.get("Site", {}).get("defined") == 0 and st["Hall"]["defined"] == 2,
                           what="Hall and Bay no longer under Site")
    finally:
        summaries.close()


def test_escalation_of_an_acknowledged_alarm_alarms_again(eng, tmp_path):
    pv = eng.ioc.pv("PRESSURE")  # HIGH=8 MINOR, HIHI=10 MAJOR
    caput(pv, 5)
    eng.alarm_on("pressure", pv)
    eng.worker("w1", data_dir=tmp_path / "w1")
    caput(pv, 9)
    eng.view.wait_for(active("pressure", severity="MINOR", ackState="UNACK"), what="MINOR unacknowledged")
    eng.cli("ack", "pressure")
    eng.view.wait_for(active("pressure", ackState="ACK"), what="MINOR acknowledged")
    caput(pv, 12)
    eng.view.wait_for(active("pressure", severity="MAJOR", ackState="UNACK"), what="MAJOR: unacknowledged again")
    caput(pv, 5)
    eng.view.wait_for(gone("pressure"), what="cleared (not latching)")


def test_on_delay_cancelled_by_a_clear_then_shown_once_held(eng, tmp_path):
    pv = eng.ioc.pv("PV12")
    caput(pv, NORMAL)
    eng.cli("set-monitored", pv)
    eng.cli("set-alarm", "delayed", "--pv", pv, "--location", "L", "--category", "C", "--delay", "3s")
    eng.alarm_on("marker", eng.ioc.pv("PV13"))  # a second alarm: proves the engine has moved on
    eng.worker("w1", data_dir=tmp_path / "w1")
    caput(pv, MAJOR)
    time.sleep(1)
    caput(pv, NORMAL)  # within the delay: cancelled (Phoebus' rule)
    time.sleep(4)  # past the delay: had the clear not cancelled it, it would be shown now
    caput(eng.ioc.pv("PV13"), MAJOR)
    eng.view.wait_for(active("marker"), what="the marker alarm")
    shown = [(t, v) for t, name, v in eng.view.changes if name == "delayed" and v is not None]
    assert not shown, f"a cancelled on-delay was shown: {shown}"
    caput(pv, MAJOR)  # held: shown after the delay
    eng.view.wait_for(active("delayed", state="ACTIVE", severity="MAJOR"), what="shown once held for the delay")


def test_disable_until_ends_by_itself(eng, tmp_path):
    pv = eng.ioc.pv("PV14")
    caput(pv, NORMAL)
    eng.alarm_on("disabled for a while", pv)
    eng.worker("w1", data_dir=tmp_path / "w1")
    caput(pv, MAJOR)
    eng.view.wait_for(active("disabled for a while", state="ACTIVE"), what="in alarm")
    eng.cli("disable", "disabled for a while", "--reason", "test", "--duration", "4s")
    eng.view.wait_for(active("disabled for a while", state="DISABLED"), what="disabled")
    eng.view.wait_for(active("disabled for a while", state="ACTIVE", severity="MAJOR"),
                      what="enabled by itself at the end, still in alarm")


def test_filter_suppresses_while_false(eng, tmp_path):
    pv, mode = eng.ioc.pv("PV15"), eng.ioc.pv("PV16")
    caput(pv, NORMAL)
    caput(mode, 10)
    eng.cli("set-monitored", pv)
    eng.cli("set-monitored", mode)
    eng.cli("set-alarm", "filtered", "--pv", pv, "--location", "L", "--category", "C",
            "--filter", f"`{mode}` > 50")
    eng.worker("w1", data_dir=tmp_path / "w1")
    caput(pv, MAJOR)
    eng.view.wait_for(active("filtered", state="SUPPRESSED", severity="MAJOR"), what="suppressed: filter false")
    caput(mode, 60)
    eng.view.wait_for(active("filtered", state="ACTIVE"), what="active: filter true")


def test_one_parent_masks_fifty_children(eng, tmp_path):
    parent_pv, child_pv = eng.ioc.pv("PV17"), eng.ioc.pv("PV18")
    caput(parent_pv, NORMAL)
    caput(child_pv, NORMAL)
    children = [f"child {i:02d}" for i in range(50)]
    facility = tmp_path / "masks.yaml"
    facility.write_text(
        "version: 1\ndefaults: {category: C, location: L}\nalarms:\n"
        f"  parent: {{pv: '{parent_pv}'}}\n"
        + "".join(f"  {c}: {{pv: '{child_pv}', maskedBy: parent}}\n" for c in children))
    eng.cli("apply", str(facility))
    eng.worker("w1", data_dir=tmp_path / "w1")
    caput(parent_pv, MAJOR)
    eng.view.wait_for(active("parent", state="ACTIVE"), what="the parent in alarm")
    caput(child_pv, MAJOR)
    eng.view.wait_for(lambda st: all(st.get(c, {}).get("state") == "MASKED" for c in children),
                      what="all 50 children masked")
    eng.cli("ack", "parent")  # acknowledged, still in alarm: still masks
    eng.view.wait_for(active("parent", ackState="ACK"), what="the parent acknowledged")
    assert all(eng.view.state[c]["state"] == "MASKED" for c in children)
    caput(parent_pv, NORMAL)
    eng.view.wait_for(lambda st: "parent" not in st and all(st.get(c, {}).get("state") == "ACTIVE" for c in children),
                      what="parent cleared: all 50 children shown")
