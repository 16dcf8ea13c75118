"""Settings, read from the environment with loopback defaults.

One place for every knob so the CLI, the workers and the tests agree on
topic names and addresses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

# Logical topic names; the physical name is prefix + logical name.
INPUT_TOPICS = ("monitored-pvs", "alarms", "shelved-alarms", "alarm-activations")
# Per-location counts of what is shown (output, compacted, keyed by location).
SUMMARY_TOPIC = "alarm-summaries"
OUTPUT_TOPICS = ("pv-state", "active-alarms", "dead-letters", SUMMARY_TOPIC)
# Repartition streams between the engine's agents: plain retention, since the
# tables hold the state (a compacted alarm-deps would keep one alarm per PV).
INTERNAL_TOPICS = ("alarm-deps", "alarm-inputs")
# Operator actions and the location tree (compacted, keyed by alarm or location name).
MANAGEMENT_TOPICS = ("alarm-acks", "disabled-alarms", "alarm-locations")
ALL_TOPICS = INPUT_TOPICS + OUTPUT_TOPICS + INTERNAL_TOPICS + MANAGEMENT_TOPICS
# Each worker's heartbeat, keyed by worker (compacted; alarm_engine/worker/liveness.py).
STATUS_TOPIC = "engine-status"

# Which schema file describes the values of each logical topic.
VALUE_SCHEMAS = {
    "monitored-pvs": "monitored-pvs-value",
    "alarms": "alarms-value",
    "shelved-alarms": "shelved-alarms-value",
    "alarm-activations": "alarm-activations-value",
    "pv-state": "pv-state-value",
    "active-alarms": "active-alarms-value",
    "dead-letters": "dead-letters-value",
    "alarm-history": "alarm-history-value",  # append-only (alarm_engine/history.py)
    "alarm-acks": "alarm-acks-value",
    "disabled-alarms": "disabled-alarms-value",
    "alarm-locations": "alarm-locations-value",
    SUMMARY_TOPIC: "alarm-summaries-value",
}

SHELVE_REASONS = ("Stale", "Chattering", "Fleeting", "Maintenance", "Nuisance", "Other")


def _list(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


def _bool(value: str | None, default: bool) -> bool:
    if value is None or not value.strip():
        return default
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, not {value!r}")


@dataclass(frozen=True)
class Settings:
    bootstrap: str = "127.0.0.1:9092"
    registry_url: str = "http://127.0.0.1:8081/apis/ccompat/v7"
    topic_prefix: str = ""
    partitions: int = 3
    replication: int = 1
    # Empty tuple: any value is accepted.
    locations: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    # Seconds a PV may take to connect after subscribing before it alarms.
    connect_grace_s: float = 5.0
    app_id: str = "alarm-engine"
    data_dir: str = ".alarm-engine-data"
    # Kafka security: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "PLAIN"
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)  # never in logs or test output
    ssl_cafile: str | None = None
    # Client certificate (mutual TLS), PEM; the key file may be the same file.
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_key_password: str | None = field(default=None, repr=False)
    # Schema registry over HTTPS: CA bundle (default: certifi's CAs) and basic auth
    # (also accepted in the URL, https://user:password@host/...; these win).
    registry_cafile: str | None = None
    registry_username: str | None = None
    registry_password: str | None = field(default=None, repr=False)
    # Alarm management: latching when an alarm record leaves it null; the longest
    # shelving in seconds (0: no limit, indefinite shelving allowed); the shelving reasons.
    latching_default: bool = False
    max_shelve_s: int = 0
    shelve_reasons: tuple[str, ...] = SHELVE_REASONS
    extra: dict = field(default_factory=dict)

    def kafka_kwargs(self) -> dict:
        """Connection options shared by every aiokafka client."""
        kw = {"bootstrap_servers": self.bootstrap, "security_protocol": self.security_protocol}
        if self.security_protocol.startswith("SASL"):
            kw.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                      sasl_plain_password=self.sasl_password)
        if self.security_protocol.endswith("SSL"):
            from aiokafka.helpers import create_ssl_context

            kw["ssl_context"] = create_ssl_context(cafile=self.ssl_cafile, certfile=self.ssl_certfile,
                                                   keyfile=self.ssl_keyfile, password=self.ssl_key_password)
        return kw

    def registry_url_redacted(self) -> str:
        """The registry URL for messages: a password in it is replaced by ***."""
        import re

        return re.sub(r"(//[^/@:]*):[^/@]*@", r"\1:***@", self.registry_url)

    def topic(self, logical: str) -> str:
        return self.topic_prefix + logical

    @classmethod
    def from_env(cls, env=None, **overrides) -> "Settings":
        env = os.environ if env is None else env
        values = dict(
            bootstrap=env.get("BOOTSTRAP_SERVERS", cls.bootstrap),
            registry_url=env.get("SCHEMA_REGISTRY", cls.registry_url),
            topic_prefix=env.get("ALARM_ENGINE_TOPIC_PREFIX", ""),
            partitions=int(env.get("ALARM_ENGINE_PARTITIONS", cls.partitions)),
            replication=int(env.get("ALARM_ENGINE_REPLICATION", cls.replication)),
            locations=_list(env.get("ALARM_ENGINE_LOCATIONS")),
            categories=_list(env.get("ALARM_ENGINE_CATEGORIES")),
            connect_grace_s=float(env.get("ALARM_ENGINE_CONNECT_GRACE", cls.connect_grace_s)),
            app_id=env.get("ALARM_ENGINE_APP_ID", cls.app_id),
            data_dir=env.get("ALARM_ENGINE_DATA_DIR", cls.data_dir),
            security_protocol=env.get("KAFKA_SECURITY_PROTOCOL", cls.security_protocol),
            sasl_mechanism=env.get("KAFKA_SASL_MECHANISM", cls.sasl_mechanism),
            sasl_username=env.get("KAFKA_SASL_USERNAME"),
            sasl_password=env.get("KAFKA_SASL_PASSWORD"),
            ssl_cafile=env.get("KAFKA_SSL_CAFILE"),
            ssl_certfile=env.get("KAFKA_SSL_CERTFILE"),
            ssl_keyfile=env.get("KAFKA_SSL_KEYFILE"),
            ssl_key_password=env.get("KAFKA_SSL_KEY_PASSWORD"),
            registry_cafile=env.get("SCHEMA_REGISTRY_CAFILE"),
            registry_username=env.get("SCHEMA_REGISTRY_USERNAME"),
            registry_password=env.get("SCHEMA_REGISTRY_PASSWORD"),
            latching_default=_bool(env.get("ALARM_ENGINE_LATCHING"), cls.latching_default),
            max_shelve_s=int(env.get("ALARM_ENGINE_MAX_SHELVE_S", cls.max_shelve_s)),
            shelve_reasons=_list(env.get("ALARM_ENGINE_SHELVE_REASONS")) or SHELVE_REASONS,
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def engine_app_id(s: Settings) -> str:
    """The worker's Faust app id: its consumer group and the prefix of its changelogs.
    A topic prefix isolates a whole engine (tests, staging), so it gets its own."""
    prefix = s.topic_prefix.strip(".-_")
    return f"{s.app_id}-{prefix}" if prefix else s.app_id


def hot_group(app_id: str) -> str:
    """The consumer group the worker's hot path commits its positions to: not its
    source of truth (the fences in its changelog are), but where lag tools read them."""
    return f"{app_id}-hotpath"
