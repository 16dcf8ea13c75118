"""Consumer-group settings for an alarm system: a dead worker's partitions move to
the others within seconds, and a restarted worker takes its own back at once.

- Session timeout 6 s (Kafka's smallest by default, group.min.session.timeout.ms),
  heartbeats every 2 s: a SIGKILLed worker is out of the group about 6 s after its
  last heartbeat, and the others take its partitions in the rebalance that follows.
  (Faust's defaults, 60 s and 3 s, left its partitions without an owner for a minute.)
- Rebalance timeout 30 s: how long the coordinator waits for the live members to
  rejoin (a member finishes its batch in hand first: stream_wait_empty).
- Static membership (Kafka's group.instance.id, KIP-345; aiokafka's
  group_instance_id, Faust's consumer_group_instance_id): a worker restarted within
  the session timeout rejoins as the same member, and gets its partitions back
  without waiting out its old session or a rebalance of the whole group. The id is
  ALARM_ENGINE_INSTANCE_ID, or made from the host and the data directory (one per
  worker, since two workers cannot share a RocksDB directory). Two processes with one
  id fence each other (FencedInstanceIdError): give each worker its own directory.
  A static member does not leave the group when it stops (aiokafka sends no
  LeaveGroup for it): a cleanly stopped worker's partitions move after the session
  timeout too. ALARM_ENGINE_STATIC_MEMBERSHIP=0 turns it off.

Faust's own variables (BROKER_SESSION_TIMEOUT, BROKER_HEARTBEAT_INTERVAL,
BROKER_REBALANCE_TIMEOUT, CONSUMER_GROUP_INSTANCE_ID) still win over these.
"""

from __future__ import annotations

import hashlib
import os
import socket

SESSION_TIMEOUT_S = 6.0
HEARTBEAT_INTERVAL_S = 2.0
REBALANCE_TIMEOUT_S = 30.0


def instance_id(app_id: str, datadir: str, env=None, host: str | None = None) -> str | None:
    """This worker's group.instance.id, stable across restarts; None: static membership off."""
    env = os.environ if env is None else env
    if env.get("ALARM_ENGINE_STATIC_MEMBERSHIP", "1").strip().lower() in ("0", "no", "false", "off"):
        return None
    given = (env.get("ALARM_ENGINE_INSTANCE_ID") or "").strip()
    if given:
        return given
    host = host or socket.gethostname()
    digest = hashlib.sha1(os.path.abspath(datadir).encode()).hexdigest()[:10]
    return f"{app_id}-{host}-{digest}"


def group_settings(app_id: str, datadir: str, env=None) -> dict:
    """Faust App keyword arguments."""
    return {
        "broker_session_timeout": SESSION_TIMEOUT_S,
        "broker_heartbeat_interval": HEARTBEAT_INTERVAL_S,
        "broker_rebalance_timeout": REBALANCE_TIMEOUT_S,
        "consumer_group_instance_id": instance_id(app_id, datadir, env),
    }
