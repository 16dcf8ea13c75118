"""Each worker says that it is alive: a heartbeat record every HEARTBEAT_S seconds on
the compacted `engine-status` topic, keyed by the worker's id (its group instance
id, stable across restarts, so compaction keeps one record per worker).

The value is JSON (see `heartbeat()` for the fields). A reader treats a heartbeat
older than 3 intervals as "worker down" (`alarm-engine status`, alarm_engine/status.py).
A worker that has stopped keeps its last heartbeat, which ages into "down".

The counters come from a Faust sensor (records in per topic, records out, dead
letters, the time of the last input record), which also feeds the Prometheus
metrics (alarm_engine/health.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time

import faust
from faust.sensors import Sensor

from alarm_engine import __version__
from alarm_engine.config import STATUS_TOPIC

log = logging.getLogger("alarm_engine")

HEARTBEAT_S = float(os.environ.get("ALARM_ENGINE_HEARTBEAT_S", "3"))


class Counters(Sensor):
    """Records in and out per logical topic, seen by Faust's sensor hooks."""

    def __init__(self, logical: dict[str, str], metrics=None):
        super().__init__()
        self.logical = logical  # physical input topic -> logical name
        self.outputs: dict[str, str] = {}  # physical output topic -> logical name
        self.metrics = metrics
        self.records_in = 0
        self.last_record_ms: int | None = None

    def on_message_in(self, tp, offset, message) -> None:
        topic = self.logical.get(tp.topic)
        if topic is None:
            return  # changelogs, the leader topic
        self.records_in += 1
        now = time.time()
        self.last_record_ms = int(now * 1000)
        if self.metrics is not None:
            self.metrics.record_in(topic, message.timestamp, now)

    def on_send_initiated(self, producer, topic, message, keysize, valsize):
        name = self.outputs.get(topic) or ("changelog" if topic.endswith("-changelog") else None)
        if name is not None and self.metrics is not None:
            self.metrics.record_out(name)
        return None


def partitions_owned(app, logical: dict[str, str]) -> list[int]:
    try:
        actives = app.assignor.assigned_actives()
    except Exception:  # not assigned yet
        return []
    return sorted({tp.partition for tp in actives if tp.topic in logical})


def input_lag(app, logical: dict[str, str]) -> dict[str, int]:
    """Records not yet committed, per logical input topic, over the owned partitions
    whose end offset the consumer knows."""
    lag: dict[str, int] = {}
    try:
        consumer = app.consumer
        actives = app.assignor.assigned_actives()
    except Exception:
        return lag
    for tp in actives:
        name = logical.get(tp.topic)
        if name is None:
            continue
        try:
            high = consumer.highwater(tp)
        except Exception:
            high = None
        if high is None or high < 0:
            continue
        committed = consumer.first_offset(tp) if hasattr(consumer, "first_offset") else 0
        lag[name] = lag.get(name, 0) + max(0, high - (committed or 0))
    return lag


def heartbeat(*, worker: str, host: str, pid: int, started_ms: int, now_ms: int, partitions: list[int],
              partitions_total: int, lag: dict[str, int], pvs: dict[str, int], records_in: int,
              last_record_ms: int | None, kafka_outage_s: float | None) -> dict:
    """The heartbeat value (plain data)."""
    return {
        "worker": worker, "host": host, "pid": pid, "version": __version__,
        "started": started_ms, "time": now_ms, "intervalSeconds": HEARTBEAT_S,
        "partitions": partitions, "partitionsTotal": partitions_total,
        "inputLag": lag, "inputLagTotal": sum(lag.values()),
        "pvs": pvs, "recordsHandled": records_in, "lastRecordTime": last_record_ms,
        "lastKafkaOutageSeconds": kafka_outage_s,
    }


class Heartbeat:
    def __init__(self, app, settings, logical: dict[str, str], counters: Counters, bridge, worker_id: str,
                 metrics=None, hot=None):
        self.app = app
        self.settings = settings
        self.logical = logical
        self.counters = counters
        self.bridge = bridge
        self.worker_id = worker_id
        self.metrics = metrics
        self.hot = hot  # the hot path: its own consumer, not seen by Faust's sensors
        self.started_ms = int(time.time() * 1000)
        self.topic = app.topic(settings.topic(STATUS_TOPIC), key_type=bytes, value_type=bytes,
                               key_serializer="raw", value_serializer="raw")

    def pvs(self) -> dict[str, int]:
        monitor = getattr(self.bridge, "monitor", None)
        if monitor is None:
            return {"subscribed": 0, "connected": 0, "disconnected": 0, "never_connected": 0}
        return monitor.connection_counts()

    def value(self) -> dict:
        from alarm_engine.worker import quiet_logs

        lag = input_lag(self.app, self.logical)
        records_in, last_ms = self.counters.records_in, self.counters.last_record_ms
        if self.hot is not None:
            lag.update(self.hot.lag())
            records_in += self.hot.records
            last_ms = max((t for t in (last_ms, self.hot.last_record_ms) if t is not None), default=None)
        pvs = self.pvs()
        if self.metrics is not None:
            self.metrics.set_gauges(lag, pvs)
        return heartbeat(worker=self.worker_id, host=socket.gethostname(), pid=os.getpid(),
                         started_ms=self.started_ms, now_ms=int(time.time() * 1000),
                         partitions=partitions_owned(self.app, self.logical),
                         partitions_total=self.settings.partitions, lag=lag, pvs=pvs,
                         records_in=records_in, last_record_ms=last_ms,
                         kafka_outage_s=quiet_logs.gate.last_outage_s)

    async def send(self) -> None:
        from alarm_engine.worker import quiet_logs

        value = json.dumps(self.value(), separators=(",", ":")).encode()
        fut = await self.topic.send(key=self.worker_id.encode(), value=value)

        def acked(f: asyncio.Future) -> None:
            if not f.cancelled() and f.exception() is None:
                quiet_logs.kafka_ok()  # an acknowledged send: Kafka is back, if it was away

        fut.add_done_callback(acked)


def install(app: faust.App, settings, logical: dict[str, str], outputs: dict[str, str], bridge,
            worker_id: str, metrics=None, hot=None) -> Heartbeat:
    counters = Counters(logical, metrics)
    counters.outputs = dict(outputs)
    app.sensors.add(counters)
    beat = Heartbeat(app, settings, logical, counters, bridge, worker_id, metrics, hot)

    @app.timer(interval=HEARTBEAT_S)
    async def _heartbeat() -> None:
        try:
            await beat.send()
        except Exception as e:  # Kafka away: the missing heartbeats are what readers see
            log.debug("heartbeat not sent: %s: %s", e.__class__.__name__, e)

    return beat
