"""Reads offsets of a partition straight from Kafka, outside Faust.

An agent that gets offset 120 where 101 was next cannot tell from Faust's hand-over
whether records 101..119 were lost on their way (Faust drops records around
rebalances) or are not in the log (compacted away, or removed by retention). This
asks Kafka itself, with a plain consumer of its own: no group, no commits.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 30.0


class LogProbe:
    def __init__(self, kafka_kwargs: dict):
        self._kw = kafka_kwargs
        self._consumer = None
        self._lock = asyncio.Lock()

    async def offsets(self, topic: str, partition: int, start: int, stop: int) -> list[int]:
        """The offsets Kafka has in `topic`/`partition` from `start` up to `stop`
        (a record known to be there) and on to the end of the fetch that reaches it:
        one probe tells about the holes of a whole stretch of a compacted log."""
        from aiokafka import TopicPartition

        async with self._lock:
            consumer = await self._started()
            tp = TopicPartition(topic, partition)
            consumer.assign([tp])
            consumer.seek(tp, start)
            found: list[int] = []
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                while not found or found[-1] < stop:
                    fetched = await consumer.getmany(tp, timeout_ms=1000)
                    found += [r.offset for r in fetched.get(tp, ()) if r.offset >= start]
            return found

    async def _started(self):
        if self._consumer is None:
            from aiokafka import AIOKafkaConsumer

            consumer = AIOKafkaConsumer(**self._kw, group_id=None, enable_auto_commit=False,
                                        auto_offset_reset="earliest")
            await consumer.start()
            self._consumer = consumer
        return self._consumer

    async def close(self) -> None:
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await consumer.stop()


def holes(start: int, offsets: list[int]) -> dict[int, int]:
    """{first: end} of the offset ranges missing from `offsets` (ascending), from `start`."""
    found, position = {}, start
    for offset in offsets:
        if offset > position:
            found[position] = offset
        position = max(position, offset + 1)
    return found
