"""Small Kafka helpers for the CLI and tests: produce records, replay a topic."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator, Iterable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from alarm_engine.config import Settings


@dataclass(frozen=True)
class Raw:
    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None


async def _start(client) -> None:
    # A client that failed to start still holds connections: close it before raising.
    try:
        await client.start()
    except BaseException:
        await client.stop()
        raise


async def produce(settings: Settings, topic: str, records: Iterable[tuple[bytes, bytes | None]],
                  headers: list[tuple[str, bytes]] | None = None) -> int:
    """Send (key, value) pairs to a physical topic and wait for every ack."""
    producer = AIOKafkaProducer(**settings.kafka_kwargs(), acks="all", linger_ms=5)
    await _start(producer)
    try:
        futures = [await producer.send(topic, key=k, value=v, headers=headers) for k, v in records]
        await asyncio.gather(*futures)
        return len(futures)
    finally:
        await producer.stop()


async def replay(settings: Settings, topic: str, follow: bool = False) -> AsyncIterator[Raw | None]:
    """Every record of a topic from the beginning to its end offsets at the
    time of the call, then None once (caught up), then (with follow) every
    new record as it comes.

    No consumer group: reading must not disturb the engine or other readers.
    """
    consumer = AIOKafkaConsumer(**settings.kafka_kwargs(), enable_auto_commit=False,
                                auto_offset_reset="earliest", group_id=None)
    await _start(consumer)
    try:
        partitions = consumer.partitions_for_topic(topic)
        if partitions is None:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise LookupError(f"topic {topic!r} does not exist (run: alarm-engine topics create)")
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        pending = {tp for tp in tps if end[tp] > 0}
        for tp in list(pending):
            if await consumer.position(tp) >= end[tp]:
                pending.discard(tp)
        caught_up = False
        while True:
            if not pending and not caught_up:
                caught_up = True
                yield None
                if not follow:
                    return
            batch = await consumer.getmany(timeout_ms=200)
            for tp, msgs in batch.items():
                for m in msgs:
                    yield Raw(m.topic, m.partition, m.offset, m.timestamp, m.key, m.value)
            for tp in list(pending):
                if await consumer.position(tp) >= end[tp]:
                    pending.discard(tp)
    finally:
        await consumer.stop()
