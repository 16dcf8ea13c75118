"""A worker never runs with a part of it dead: an agent or a service that crashes
ends the process with a non-zero status, so that its supervisor (`alarm-engine
worker`, or any process manager around `faust -A alarm_engine worker`) restarts it
and the restarted worker replays from its committed offsets.

Faust's own reaction is to log "Crashed reason=..." and go on: an agent's actor is
restarted by its supervisor a few times and then given up, a crashed service stays
crashed, while the process stays alive and keeps its partitions. Two mechanisms:

- agents: Faust calls the app's agent error handler (`App._on_agent_error`, see
  "agent-errors" in Faust's agents guide) with the exception that ended an agent;
  `agent_crashed` exits from there, before the actor is restarted;
- any other service (timers, tables, the consumer, the web server): `watch` walks
  the app's service tree every second and exits when a service reports `crashed`
  (mode's public flag). Agent actors are left out: Faust marks them crashed when it
  restarts them on a rebalance, which is not an error.

- the consumer: aiokafka's group coordination can end with an error while the
  process runs on without partitions; `watch` exits then too.

Test-only fault: ALARM_ENGINE_FAULT_CRASH_AGENT=<agent function name, or hot_path> makes
that agent (or the hot path's task) raise, from its own loop at its first batch ALARM_ENGINE_FAULT_AFTER_S (default 5)
seconds after it starts, once per data directory (a marker file there keeps the
restarted worker from crashing again).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from pathlib import Path

from alarm_engine.worker.exits import EXIT_CRASHED

log = logging.getLogger("alarm_engine")

FAULT_ENV = "ALARM_ENGINE_FAULT_CRASH_AGENT"
FAULT_MARKER = "injected-fault-done"


class InjectedFault(RuntimeError):
    """Raised by the test-only fault (ALARM_ENGINE_FAULT_CRASH_AGENT)."""


def exit_now(line: str, status: int = EXIT_CRASHED, exc: BaseException | None = None) -> None:
    if exc is not None:
        log.critical("%s: exiting so that the worker restarts", line,
                     exc_info=(type(exc), exc, exc.__traceback__))
    else:
        log.critical("%s: exiting so that the worker restarts", line)
    logging.shutdown()
    os._exit(status)


async def agent_crashed(agent, exc: BaseException) -> None:
    exit_now(f"agent {getattr(agent, 'name', agent)} crashed ({exc.__class__.__name__}: {exc})", exc=exc)


def crashed_services(root) -> list:
    """The services below `root` (mode beacon tree) that say they crashed, actors left out."""
    from faust.agents.actor import Actor

    found, seen, todo = [], set(), [root.beacon]
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        data = getattr(node, "data", None)
        if getattr(data, "crashed", False) and not isinstance(data, Actor):
            found.append(data)
        todo.extend(getattr(node, "children", ()) or ())
    return found


def coordination_failed(app) -> BaseException | None:
    """aiokafka's group coordination task ended with an error (it logs "Unexpected error in
    coordinator routine" and stops: the consumer then never gets partitions again, while
    the process runs on). Read from aiokafka's consumer, which has no public flag for it."""
    consumer = getattr(getattr(app.consumer, "_thread", None), "_consumer", None)
    task = getattr(getattr(consumer, "_coordinator", None), "_coordination_task", None)
    if task is None or not task.done() or task.cancelled():
        return None
    return task.exception()


async def watch(app, interval: float = 1.0) -> None:
    while True:
        await asyncio.sleep(interval)
        failed = coordination_failed(app)
        if failed is not None:
            exit_now(f"the Kafka consumer's group coordination failed ({failed.__class__.__name__}: {failed})",
                     exc=failed)
        dead = crashed_services(app)
        if dead:
            reason = getattr(dead[0], "crash_reason", None)
            exit_now(f"service {dead[0]!r} crashed ({reason.__class__.__name__}: {reason})"
                     if reason is not None else f"service {dead[0]!r} crashed")


class _FaultyStream:
    """The agent's stream, whose batches stop with InjectedFault once the fault is due:
    the exception comes out of the agent's own loop, between two batches."""

    def __init__(self, stream, due: float, fire):
        self._stream, self._due, self._fire = stream, due, fire

    def __getattr__(self, name):
        return getattr(self._stream, name)

    def noack_take(self, *args, **kwargs):
        async def batches():
            async for batch in self._stream.noack_take(*args, **kwargs):
                if asyncio.get_running_loop().time() >= self._due:
                    self._fire()
                yield batch
        return batches()


def fault(name: str, datadir_of):
    """For a loop of its own (the hot path): a function to call once per iteration,
    which raises InjectedFault once the fault is due; None if no fault is set for `name`."""
    if os.environ.get(FAULT_ENV) != name:
        return None
    due = time.monotonic() + float(os.environ.get("ALARM_ENGINE_FAULT_AFTER_S", "5"))

    def check() -> None:
        marker = Path(datadir_of()) / FAULT_MARKER
        if time.monotonic() >= due and not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("1")
            raise InjectedFault(f"fault injected by {FAULT_ENV}={name}")

    return check


def with_fault(fun, datadir_of):
    """`fun` (an agent function), made to crash if ALARM_ENGINE_FAULT_CRASH_AGENT names it."""
    if os.environ.get(FAULT_ENV) != fun.__name__:
        return fun
    after = float(os.environ.get("ALARM_ENGINE_FAULT_AFTER_S", "5"))

    @functools.wraps(fun)
    async def crashing(stream):
        marker = Path(datadir_of()) / FAULT_MARKER
        if marker.exists():
            return await fun(stream)

        def fire():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("1")
            raise InjectedFault(f"fault injected by {FAULT_ENV}={fun.__name__}")

        return await fun(_FaultyStream(stream, asyncio.get_running_loop().time() + after, fire))

    return crashing
