"""Topic set-up: every topic compacted, partition counts configurable, idempotent."""

from __future__ import annotations

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
        if missing:
            await admin.create_topics([
                NewTopic(settings.topic(t), settings.partitions, settings.replication, topic_configs=config(t))
                for t in missing])
        present = [t for t in topics if settings.topic(t) in existing]
        if present:
            await admin.alter_configs([
                ConfigResource(ConfigResourceType.TOPIC, settings.topic(t), configs=config(t)) for t in present])
        return [settings.topic(t) for t in missing]
    finally:
        await admin.close()


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
