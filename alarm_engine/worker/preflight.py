"""What a worker checks before any agent starts: every topic it needs exists, has the
right partition count and is visible in the cluster metadata with a leader for each
partition; the schema registry answers.

Faust creates its own topics (table changelogs, the assignor's leader topic) as its
services start, and a KRaft broker lists a new topic a moment before its partitions:
a table that checked its changelog then saw 0 partitions and its agent crashed
(PartitionsMismatch). Here they are created up front, with Faust's names, partition
counts and compaction, and waited for. A misconfiguration (a topic with the wrong
partition count, a topic that cannot be created, Kafka or the registry unreachable)
ends the worker with one line that names it and a non-zero status: it never runs
half-working.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass

log = logging.getLogger("alarm_engine")

EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: Kafka or the registry cannot be reached
EXIT_CONFIG = 78  # EX_CONFIG: a topic is not as the engine needs it

COMPACTED = {"cleanup.policy": "compact"}


class PreflightError(Exception):
    """One line for the operator, and the exit status."""

    def __init__(self, line: str, status: int):
        super().__init__(line)
        self.status = status


@dataclass(frozen=True)
class TopicSpec:
    name: str  # physical name
    partitions: int
    config: dict


def faust_topics(app, partitions: int) -> list[TopicSpec]:
    """The topics Faust would create for `app`: one compacted changelog per table
    (its partition count is the table's), and the leader topic (one partition)."""
    specs = [TopicSpec(table.changelog_topic_name, table.partitions or partitions, COMPACTED)
             for table in app.tables.values()]
    if not app.conf.topic_disable_leader:
        specs.append(TopicSpec(f"{app.conf.id}-__assignor-__leader", 1, {}))
    return specs


def partition_problems(wanted: list[TopicSpec], described: dict[str, int]) -> list[str]:
    """One line per existing topic whose partition count differs from the wanted one."""
    return [f"topic {s.name} has {described[s.name]} partition(s), the engine needs {s.partitions} "
            f"(ALARM_ENGINE_PARTITIONS); recreate it or set ALARM_ENGINE_PARTITIONS={described[s.name]}"
            for s in wanted if s.name in described and described[s.name] != s.partitions]


def not_ready(wanted: list[TopicSpec], metadata: list[dict]) -> list[str]:
    """The topics of `wanted` that the metadata does not yet show complete: listed,
    without error, every partition present and with a leader."""
    by_name = {m["topic"]: m for m in metadata}
    missing = []
    for s in wanted:
        m = by_name.get(s.name)
        if m is None or m["error_code"] != 0:
            missing.append(s.name)
            continue
        leaders = {p["partition"] for p in m["partitions"] if p["error_code"] == 0 and p["leader"] >= 0}
        if len(m["partitions"]) < s.partitions or len(leaders) < len(m["partitions"]):
            missing.append(s.name)
    return missing


TOPIC_ALREADY_EXISTS = 36


async def ensure_ready(settings, specs: list[TopicSpec], timeout: float = 60.0) -> list[str]:
    """Create the missing topics of `specs`, check the partition counts of all, and wait
    until the metadata shows every one complete. Returns the names created."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import KafkaConnectionError

    admin = AIOKafkaAdminClient(**settings.kafka_kwargs())
    try:
        await admin.start()
    except KafkaConnectionError as e:
        await admin.close()
        raise PreflightError(f"cannot reach Kafka at {settings.bootstrap}: {e}", EXIT_UNAVAILABLE) from None
    try:
        existing = set(await admin.list_topics())
        present = [s.name for s in specs if s.name in existing]
        if present:
            described = {m["topic"]: len(m["partitions"]) for m in await admin.describe_topics(present)
                         if m["error_code"] == 0}
            problems = partition_problems(specs, described)
            if problems:
                raise PreflightError(problems[0], EXIT_CONFIG)
        missing = [s for s in specs if s.name not in existing]
        created = []
        if missing:
            response = await admin.create_topics([
                NewTopic(s.name, s.partitions, settings.replication, topic_configs=s.config) for s in missing])
            for name, code, *rest in response.topic_errors:
                if code == 0:
                    created.append(name)
                elif code != TOPIC_ALREADY_EXISTS:  # another worker won the race: fine
                    why = rest[0] if rest and rest[0] else f"error code {code}"
                    raise PreflightError(f"cannot create topic {name}: {why}", EXIT_CONFIG)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            waiting = not_ready(specs, await admin.describe_topics([s.name for s in specs]))
            if not waiting:
                return created
            if loop.time() > deadline:
                raise PreflightError(f"topic {waiting[0]} not complete in the cluster metadata after "
                                     f"{timeout:.0f} s ({len(waiting)} topic(s) waiting)", EXIT_UNAVAILABLE)
            await asyncio.sleep(0.1)
    finally:
        await admin.close()


def check_registry(settings, attempts: int = 3, pause: float = 1.0) -> None:
    """The registry answers a list of subjects (a few tries: it may be restarting)."""
    import time

    from alarm_engine.registry import client

    last = None
    for i in range(attempts):
        try:
            client(settings).get_subjects()
            return
        except Exception as e:  # any failure to answer: connection, TLS, auth, HTTP error
            last = e
            if i + 1 < attempts:
                time.sleep(pause)
    raise PreflightError(f"cannot reach the schema registry at {settings.registry_url_redacted()}: "
                         f"{last.__class__.__name__}: {last}", EXIT_UNAVAILABLE)


async def run(app, settings, engine_topics) -> None:
    """Everything before the agents start; on a problem, one CRITICAL line and exit."""
    from alarm_engine.topics import ensure_topics

    try:
        specs = [TopicSpec(settings.topic(t), settings.partitions, {}) for t in engine_topics]
        # The engine's own topics first (their cleanup policies), then Faust's.
        try:
            await ensure_topics(settings, engine_topics)
        except RuntimeError as e:
            if str(e).startswith("cannot create topic"):  # ensure_topics names the topic and the cause
                raise PreflightError(str(e), EXIT_CONFIG) from None
            raise PreflightError(f"cannot set up the topics at {settings.bootstrap}: "
                                 f"{e.__class__.__name__}: {e}", EXIT_UNAVAILABLE) from None
        except Exception as e:
            raise PreflightError(f"cannot set up the topics at {settings.bootstrap}: "
                                 f"{e.__class__.__name__}: {e}", EXIT_UNAVAILABLE) from None
        await ensure_ready(settings, specs + faust_topics(app, settings.partitions))
        if os.environ.get("ALARM_ENGINE_CHECK_REGISTRY", "1") not in ("0", "no", "false"):
            await asyncio.get_running_loop().run_in_executor(None, check_registry, settings)
    except PreflightError as e:
        fail(str(e), e.status)


def fail(line: str, status: int) -> None:
    log.critical("%s: exiting", line)
    logging.shutdown()
    os._exit(status)
