"""The Faust app as `faust -A alarm_engine` sees it (no broker needed)."""

from __future__ import annotations

import subprocess
import sys


def test_faust_lists_every_table_with_its_help():
    proc = subprocess.run([sys.executable, "-m", "faust", "-A", "alarm_engine", "tables"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cells = [[c.strip() for c in line.split("|")[1:3]] for line in proc.stdout.splitlines()
             if line.startswith("| ")]
    tables = {name: help_text for name, help_text in cells if name != "name"}
    assert set(tables) == {"monitored", "pv-latest", "pv-dependents", "alarm-state"}
    assert all(len(help_text) > 20 for help_text in tables.values()), tables


def test_every_agent_runs_with_concurrency_one():
    # faust-streaming #606: concurrency > 1 loses offsets.
    from alarm_engine.agents import app

    agents = list(app.agents.values())
    assert {a.name.rsplit(".", 1)[-1] for a in agents} == {"monitored_agent", "router_agent", "alarm_agent"}
    assert all(a.concurrency == 1 for a in agents)
