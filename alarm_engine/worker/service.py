"""The worker as a service, wired into the Faust app in one call (worker/__init__.py):
heartbeat on engine-status (liveness.py), /healthz and /metrics (health.py), the
crash watch (watchdog.py) and quiet logs during a Kafka outage (quiet_logs.py)."""

from __future__ import annotations

import logging

from alarm_engine.config import STATUS_TOPIC
from alarm_engine.worker import health, liveness, quiet_logs, watchdog

log = logging.getLogger("alarm_engine")


def install(app, settings, logical: dict[str, str], outputs: dict[str, str], bridge, worker_id: str, hot):
    """`logical`: physical input topic -> logical name (the agents' inputs); `outputs`:
    the same for outputs; `hot`: the hot path (its inputs, its own consumer)."""
    health.install(app, logical, hot)
    beat = liveness.install(app, settings, logical, outputs, bridge, worker_id, health.metrics, hot)

    @app.task
    async def _service_watch() -> None:
        quiet_logs.install()  # the worker's log handlers are set up by now
        log.info("worker %s: heartbeat every %.0f s on %s; /healthz and /metrics on port %s",
                 worker_id, liveness.HEARTBEAT_S, settings.topic(STATUS_TOPIC), app.conf.web_port)
        await watchdog.watch(app)

    return beat
