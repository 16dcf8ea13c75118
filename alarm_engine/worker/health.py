"""`/healthz` and `/metrics` on the worker's web server (Faust's, aiohttp).

The port is ALARM_ENGINE_WEB_PORT (default: a free port, logged at start-up as
"web: http://127.0.0.1:PORT"; `faust worker --web-port N` pins it too), bound to
ALARM_ENGINE_WEB_BIND (default 127.0.0.1).

- `/healthz`: 200 when every agent runs and Kafka answers (the worker owns partitions
  or is waiting for an assignment); 503 otherwise. The body is JSON with the reasons.
- `/metrics`: Prometheus text format (prometheus-client), in a registry of its own:
  records in per input topic, records out per output topic, batch sizes, the age of
  each input record when the worker reads it (per topic: the delay of that hop of the
  pipeline; pv-state's is CA bridge -> router, alarm-inputs' router -> alarm agent),
  dead letters, CA connections, input lag, Kafka outage.
"""

from __future__ import annotations


from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_AGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.records_in = Counter("alarm_engine_records_in", "Input records read, per logical topic",
                                  ["topic"], registry=r)
        self.records_out = Counter("alarm_engine_records_out", "Records sent, per logical topic "
                                   "(table changelogs as 'changelog')", ["topic"], registry=r)
        self.dead_letters = Counter("alarm_engine_dead_letters", "Records rejected to dead-letters", registry=r)
        self.batch_size = Histogram("alarm_engine_batch_size", "Input records per agent batch", ["agent"],
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.record_age = Histogram("alarm_engine_record_age_seconds", "Age of an input record (its "
                                    "timestamp) when the worker reads it, per logical topic", ["topic"],
                                    buckets=_AGE_BUCKETS, registry=r)
        self.lag = Gauge("alarm_engine_input_lag", "Input records not yet committed, per logical topic "
                         "(owned partitions)", ["topic"], registry=r)
        self.pvs = Gauge("alarm_engine_ca_pvs", "CA subscriptions by connection state", ["state"], registry=r)
        self.outage = Gauge("alarm_engine_kafka_outage", "1 while Kafka is unreachable", registry=r)
        self.healthy = Gauge("alarm_engine_healthy", "1 when /healthz answers 200", registry=r)

    def record_in(self, topic: str, timestamp_s: float | None, now_s: float) -> None:
        self.records_in.labels(topic).inc()
        if timestamp_s:
            self.record_age.labels(topic).observe(max(0.0, now_s - timestamp_s))

    def record_out(self, topic: str) -> None:
        self.records_out.labels(topic).inc()
        if topic == "dead-letters":
            self.dead_letters.inc()

    def batch(self, agent: str, size: int) -> None:
        self.batch_size.labels(agent).observe(size)

    def records_read(self, topic: str, n: int, newest_timestamp_s: float | None, now_s: float) -> None:
        """`n` records of one partition's batch (the hot path's): one age sample, its newest record's."""
        self.records_in.labels(topic).inc(n)
        if newest_timestamp_s:
            self.record_age.labels(topic).observe(max(0.0, now_s - newest_timestamp_s))

    def records_sent(self, counts: dict[str, int]) -> None:
        for topic, n in counts.items():
            self.records_out.labels(topic).inc(n)
            if topic == "dead-letters":
                self.dead_letters.inc(n)

    def set_gauges(self, lag: dict[str, int], pvs: dict[str, int]) -> None:
        for topic, n in lag.items():
            self.lag.labels(topic).set(n)
        for state, n in pvs.items():
            self.pvs.labels(state).set(n)

    def text(self) -> bytes:
        return generate_latest(self.registry)


metrics = Metrics()


def health(agents_running: dict[str, bool], kafka_outage: bool, partitions: list[int],
           rebalancing: bool) -> tuple[bool, dict]:
    """(healthy, details): pure, for /healthz."""
    reasons = [f"agent {name} not running" for name, ok in sorted(agents_running.items()) if not ok]
    if kafka_outage:
        reasons.append("Kafka unreachable")
    return not reasons, {"healthy": not reasons, "reasons": reasons, "partitions": partitions,
                         "waitingForPartitions": rebalancing or not partitions,
                         "agents": agents_running}


def agents_running(app) -> dict[str, bool]:
    """Each agent has a live actor task (Faust's actors; an agent restarting on a
    rebalance counts as running)."""
    out = {}
    for name, agent in app.agents.items():
        actors = getattr(agent, "_actors", ())
        out[name.rsplit(".", 1)[-1]] = bool(actors) and any(
            a.actor_task is not None and not a.actor_task.done() for a in actors)
    return out


def install(app, logical: dict[str, str], hot=None) -> None:
    from alarm_engine.worker import liveness, quiet_logs

    def running() -> dict[str, bool]:
        out = agents_running(app)
        if hot is not None:
            out["hot_path"] = hot.running
        return out

    @app.page("/healthz")
    async def healthz(web, request):
        ok, details = health(running(), quiet_logs.gate.in_outage,
                             liveness.partitions_owned(app, logical), bool(app.rebalancing))
        metrics.healthy.set(1 if ok else 0)
        return web.json(details, status=200 if ok else 503)

    @app.page("/metrics")
    async def metrics_page(web, request):
        metrics.outage.set(1 if quiet_logs.gate.in_outage else 0)
        return web.bytes(metrics.text(), content_type=CONTENT_TYPE_LATEST.split(";")[0])

