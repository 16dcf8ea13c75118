"""Alarm management end to end: real Kafka, registry, IOC and worker processes; the
operator's acks and disables through the CLI, and their survival of a killed worker."""

from __future__ import annotations

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
