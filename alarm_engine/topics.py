"""Topic set-up: every topic compacted, partition counts configurable, idempotent."""

from __future__ import annotations

import asyncio
import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from alarm_engine.config import ALL_TOPICS, INTERNAL_TOPICS, Settings

log = logging.getLogger(__name__)

COMPACTED = {"cleanup.policy": "compact"}
STREAM = {"cleanup.policy": "delete", "retention.ms": str(7 * 24 * 3600 * 1000)}


async def ensure_topics(settings: Settings, topics=ALL_TOPICS, extra_config: dict | None = None) -> list[str]:
    """Create the missing topics; returns the physical names it created.

    Every topic but the internal repartition streams is compacted. Existing
    topics keep their partition count (changing it would move keys between
    partitions and break the tables' co-partitioning); their cleanup settings
    are brought in line.
    """
    def config(logical: str) -> dict:
        if logical in INTERNAL_TOPICS:
            return STREAM
        return {**COMPACTED, **(extra_config or {})}

    admin = AIOKafkaAdminClient(**settings.kafka_kwargs())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in topics if settings.topic(t) not in existing]
        created: list[str] = []
        if missing:
            response = await admin.create_topics([
                NewTopic(settings.topic(t), settings.partitions, settings.replication, topic_configs=config(t))
                for t in missing])
            for name, code, *rest in response.topic_errors:
                if code == 0:
                    created.append(name)
                elif code != TOPIC_ALREADY_EXISTS:  # another process won the race: fine
                    message = rest[0] if rest and rest[0] else f"error code {code}"
                    raise RuntimeError(f"cannot create topic {name}: {message}")
            await _until_visible(admin, set(created))
        present = [t for t in topics if settings.topic(t) in existing]
        if present:
            await admin.alter_configs([
                ConfigResource(ConfigResourceType.TOPIC, settings.topic(t), configs=config(t)) for t in present])
        return [settings.topic(t) for t in missing if settings.topic(t) in created]
    finally:
        await admin.close()


TOPIC_ALREADY_EXISTS = 36


async def _until_visible(admin: AIOKafkaAdminClient, names: set[str], timeout: float = 30.0) -> None:
    # A KRaft broker answers CreateTopics once the controller has committed the
    # topic, but its own metadata cache catches up a moment later; a client that
    # produces (or lists) at once would not find the topic yet.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while names - set(await admin.list_topics()):
        if loop.time() > deadline:
            raise RuntimeError(f"topics not visible after {timeout:.0f} s: {sorted(names)}")
        await asyncio.sleep(0.05)


async def describe(settings: Settings, topics=ALL_TOPICS) -> dict[str, dict]:
    admin = AIOKafkaAdminClient(**settings.kafka_kwargs())
    await admin.start()
    try:
        names = [settings.topic(t) for t in topics]
        meta = await admin.describe_topics(names)
        out = {m["topic"]: {"partitions": len(m["partitions"]), "error": m["error_code"]} for m in meta}
        return out
    finally:
        await admin.close()
