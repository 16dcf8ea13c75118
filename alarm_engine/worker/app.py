"""The Faust app: settings, topics and tables. The agents, tasks and timers that use
them are in the modules named for their job (see the package's docstring)."""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

import faust

from alarm_engine.config import ALL_TOPICS, STATUS_TOPIC, Settings, engine_app_id
from alarm_engine.worker import faust_internals, membership, preflight, trace, watchdog
from alarm_engine.worker.faust_internals import Table, Transport

log = logging.getLogger("alarm_engine")

settings = Settings.from_env()
P = settings.partitions


def _credentials(s: Settings):
    if s.security_protocol == "PLAINTEXT":
        return None
    ssl_context = s.kafka_kwargs().get("ssl_context")
    if s.security_protocol.startswith("SASL"):
        return faust.SASLCredentials(username=s.sasl_username, password=s.sasl_password,
                                     ssl_context=ssl_context, mechanism=s.sasl_mechanism)
    return ssl_context


class AlarmEngineApp(faust.App):
    #: Called, in order, when partitions are revoked and before Faust closes the
    #: tables' stores of those partitions (the hot path finishes its batch first).
    before_revoke: list = []

    def _new_transport(self):
        return Transport(self.conf.broker_consumer, self)

    async def _on_partitions_revoked(self, revoked) -> None:
        for hook in self.before_revoke:
            await hook(revoked)
        await super()._on_partitions_revoked(revoked)

    async def on_first_start(self) -> None:
        # Faust creates the data directory but not its parents.
        Path(self.conf.datadir).parent.mkdir(parents=True, exist_ok=True)
        await super().on_first_start()
        # Every topic (Faust's changelogs too) must exist, with its partition count,
        # before the consumer subscribes; a misconfiguration exits in one line.
        await preflight.run(self, settings, ALL_TOPICS + (STATUS_TOPIC,))

    async def _on_agent_error(self, agent, exc: BaseException) -> None:
        # An agent that crashed ends the worker (non-zero): never a worker with a dead agent.
        await watchdog.agent_crashed(agent, exc)

    def agent(self, channel=None, **kwargs):
        decorate = super().agent(channel, **kwargs)
        return lambda fun: decorate(watchdog.with_fault(fun, lambda: self.conf.datadir))


APP_ID = engine_app_id(settings)
DATA_DIR = os.environ.get("ALARM_ENGINE_DATA_DIR", f".alarm-engine-data/{APP_ID}-{socket.gethostname()}")
WEB_PORT, SAME_WEB_PORT = membership.web_port(DATA_DIR)
app = AlarmEngineApp(
    APP_ID,
    broker=";".join(f"kafka://{h.strip()}" for h in settings.bootstrap.split(",")),
    broker_credentials=_credentials(settings),
    store="rocksdb://",
    datadir=DATA_DIR,
    topic_partitions=P,
    topic_replication_factor=settings.replication,
    key_serializer="raw",
    value_serializer="raw",
    consumer_auto_offset_reset="earliest",
    producer_acks=-1,
    # `faust worker` turns the web server on unless given --without-web; a free
    # port by default lets several workers share a machine (--web-port N pins it).
    # The port is kept across restarts (membership.web_port: static membership needs it).
    web_port=WEB_PORT,
    web_bind="127.0.0.1",
    # On a rebalance, finish the records in hand (send, acknowledge, write the
    # tables) before giving the partitions up: otherwise the old owner could still
    # write a table key, or an active-alarms record, after the new owner took over.
    stream_wait_empty=True,
    table_standby_replicas=0,
    # Failover in seconds and static group membership (membership.py).
    **membership.group_settings(APP_ID, DATA_DIR, static=SAME_WEB_PORT),
)


def _topic(logical: str, **kw) -> faust.TopicT:
    return app.topic(settings.topic(logical), key_type=bytes, value_type=bytes,
                     key_serializer="raw", value_serializer="raw", partitions=P, **kw)


# Outputs, by logical name (topics.ensure_topics creates them all, with their cleanup policies).
OUT = {name: _topic(name) for name in ("pv-state", "active-alarms", "dead-letters", "alarm-deps", "alarm-inputs")}

monitored_in = _topic("monitored-pvs")
ALARM_KEYED = ("alarms", "shelved-alarms", "alarm-activations", "alarm-acks", "disabled-alarms", "alarm-inputs")
alarm_keyed_in = app.topic(*(settings.topic(t) for t in ALARM_KEYED),
                           key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
# The inputs of the Faust agents (the control path); pv-state and alarm-deps are the hot path's.
LOGICAL = {settings.topic(t): t for t in ("monitored-pvs",) + ALARM_KEYED}
trace.LOGICAL.update(LOGICAL)
faust_internals.KAFKA_KWARGS.update(settings.kafka_kwargs())


def _table(name: str, help: str) -> faust.Table:
    # key_type bytes: raw keys (the record keys as they are); values are JSON.
    return app.tables.add(Table(app, name=name, default=None, beacon=app.tables.beacon, partitions=P,
                                 help=help, key_type=bytes))


monitored = _table("monitored", "Monitored PVs of this worker's partitions: PV -> CA monitor mask and partition.")
pv_home = _table("pv-home", "PV -> its latest state, its per-PV alarms' states, the rule alarms reading it "
                            "(the hot path's table, written in batches by hotpath.py).")
alarm_state = _table("alarm-state", "Alarm -> definition, shelving, activation; for rule and external "
                                    "alarms also their PV inputs and what they show.")

_codec = None


def codec():
    # Created on first use: the registry is contacted from the worker, not at import.
    global _codec
    if _codec is None:
        from alarm_engine.registry import make_codec

        _codec = make_codec(settings)
    return _codec


def now_ms() -> int:
    return int(time.time() * 1000)
