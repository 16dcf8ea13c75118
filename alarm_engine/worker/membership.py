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
  ALARM_ENGINE_INSTANCE_ID, or made at the first start and kept in the data directory
  (one per worker, since two workers cannot share a RocksDB directory). Two processes with one
  id fence each other (FencedInstanceIdError): give each worker its own directory.
  A static member does not leave the group when it stops (aiokafka sends no
  LeaveGroup for it): a cleanly stopped worker's partitions move after the session
  timeout too. ALARM_ENGINE_STATIC_MEMBERSHIP=0 turns it off.

A static member's assignment, kept by the broker, carries the worker's web URL, and
Faust refuses an assignment with another URL than its own (an assertion in its
assignor kills the consumer's group coordination). So the web port must not change
across restarts: without ALARM_ENGINE_WEB_PORT the port chosen at the first start is
kept in the data directory (`web-port`) and taken again; when it cannot be (the port
is taken), the worker runs this once as a dynamic member.

Faust's own variables (BROKER_SESSION_TIMEOUT, BROKER_HEARTBEAT_INTERVAL,
BROKER_REBALANCE_TIMEOUT, CONSUMER_GROUP_INSTANCE_ID) still win over these.
"""

from __future__ import annotations

import os
import socket
import uuid

SESSION_TIMEOUT_S = 6.0
HEARTBEAT_INTERVAL_S = 2.0
REBALANCE_TIMEOUT_S = 30.0


def instance_id(app_id: str, datadir: str, env=None, host: str | None = None) -> str | None:
    """This worker's group.instance.id, stable across restarts; None: static membership off.
    Kept in the data directory (`instance-id`): a worker whose directory is lost comes
    back as a new member (its old one expires after the session timeout), never as
    the old one with an assignment made for another web URL."""
    env = os.environ if env is None else env
    if env.get("ALARM_ENGINE_STATIC_MEMBERSHIP", "1").strip().lower() in ("0", "no", "false", "off"):
        return None
    given = (env.get("ALARM_ENGINE_INSTANCE_ID") or "").strip()
    if given:
        return given
    path = os.path.join(datadir, "instance-id")
    try:
        with open(path) as f:
            kept = f.read().strip()
        if kept:
            return kept
    except OSError:
        pass
    made = f"{app_id}-{host or socket.gethostname()}-{uuid.uuid4().hex[:10]}"
    os.makedirs(datadir, exist_ok=True)
    with open(path, "w") as f:
        f.write(made + "\n")
    return made


def _bindable(port: int, host: str) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp binds
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def web_port(datadir: str, env=None, host: str = "127.0.0.1") -> tuple[int, bool]:
    """(port, the same as at the last start): ALARM_ENGINE_WEB_PORT, else the port kept
    in the data directory if it can be bound, else a free one (kept from now on)."""
    env = os.environ if env is None else env
    if env.get("ALARM_ENGINE_WEB_PORT"):
        return int(env["ALARM_ENGINE_WEB_PORT"]), True
    path = os.path.join(datadir, "web-port")
    try:
        with open(path) as f:
            kept = int(f.read().strip())
    except (OSError, ValueError):
        kept = None
    if kept is not None and _bindable(kept, host):
        return kept, True
    # A first start (no instance id kept yet) has no assignment to disagree with.
    first = kept is None and not os.path.exists(os.path.join(datadir, "instance-id"))
    port = _free_port(host)
    os.makedirs(datadir, exist_ok=True)
    with open(path, "w") as f:
        f.write(f"{port}\n")
    return port, first


def group_settings(app_id: str, datadir: str, env=None, static: bool = True) -> dict:
    """Faust App keyword arguments; `static` False: a dynamic member this time."""
    return {
        "broker_session_timeout": SESSION_TIMEOUT_S,
        "broker_heartbeat_interval": HEARTBEAT_INTERVAL_S,
        "broker_rebalance_timeout": REBALANCE_TIMEOUT_S,
        "consumer_group_instance_id": instance_id(app_id, datadir, env) if static else None,
    }
