"""ALARM_ENGINE_TRACE=1 logs every input record handled, and the consumer's seeks,
jumps, holes, dropped copies, refused acknowledgements and commits: what it takes to
follow a record through rebalances and restarts (the crash tests turn it on)."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("alarm_engine")

TRACE = os.environ.get("ALARM_ENGINE_TRACE", "") in ("1", "true", "yes")

#: Kafka topic name -> logical name, for the inputs of the Faust agents (set by app.py).
LOGICAL: dict[str, str] = {}


def trace(fmt: str, *args) -> None:
    if TRACE:
        log.info("trace: " + fmt, *args)


def tp_name(tp) -> str:
    return f"{LOGICAL.get(tp.topic, tp.topic)}[{tp.partition}]"
