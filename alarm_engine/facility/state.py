"""The current state of the configuration topics, read with one consumer to their end offsets.

No consumer group: reading must not disturb the engine. Later records replace earlier ones,
tombstones remove. A value that does not decode is kept as None (the key is there, its
record unreadable), so that apply rewrites it if the file has the key, and prune removes it
if not. Equal value bytes are decoded once (most monitored PVs share one value).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition

from alarm_engine.codec import BadRecord, Codec, decode_key
from alarm_engine.config import Settings


def _key(raw: bytes | None) -> str:
    """codec.decode_key, with a quick path for the usual key (checked with C string methods)."""
    try:
        key = raw.decode("utf-8")
    except (AttributeError, UnicodeDecodeError):
        return decode_key(raw)
    if not key or len(key) > 512 or "\x00" in key or "\n" in key or "\r" in key or key.isspace():
        return decode_key(raw)
    return key


@dataclass
class State:
    topics: dict[str, dict[str, dict | None]]  # logical topic → key → datum (None: unreadable)
    records_read: int = 0
    unreadable: list[str] = field(default_factory=list)  # "topic[partition]@offset: reason"
    seconds: float = 0.0


async def read(settings: Settings, codec: Codec, topics: list[str], progress=None) -> State:
    t0 = time.perf_counter()
    consumer = AIOKafkaConsumer(**settings.kafka_kwargs(), enable_auto_commit=False, group_id=None,
                                auto_offset_reset="earliest", max_partition_fetch_bytes=8 << 20,
                                fetch_max_bytes=64 << 20)
    try:
        await consumer.start()
    except BaseException:
        await consumer.stop()
        raise
    try:
        physical = {settings.topic(t): t for t in topics}
        await consumer._client.force_metadata_update()
        tps = []
        for name in physical:
            parts = consumer.partitions_for_topic(name)
            if not parts:
                raise LookupError(f"topic {name!r} does not exist (run: alarm-engine topics create)")
            tps += [TopicPartition(name, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        total = sum(end.values())
        pending = {tp for tp in tps if end[tp] > 0}
        for tp in list(pending):
            if await consumer.position(tp) >= end[tp]:
                pending.discard(tp)
        state = State({t: {} for t in topics})
        raw_state: dict[str, dict[bytes, bytes | None]] = {t: {} for t in topics}
        read_n = 0
        while pending:
            batch = await consumer.getmany(*pending, timeout_ms=500, max_records=50_000)
            for tp, msgs in batch.items():
                table = raw_state[physical[tp.topic]]
                for m in msgs:
                    if m.offset >= end[tp]:
                        continue  # written after the start: not part of this state
                    # Keep the latest value per key; offsets are read in order per partition.
                    table[m.key] = (m.value, tp.partition, m.offset)
                read_n += len(msgs)
                if msgs and msgs[-1].offset + 1 >= end[tp]:
                    pending.discard(tp)
            for tp in list(pending):
                if await consumer.position(tp) >= end[tp]:
                    pending.discard(tp)
            if progress:
                progress(min(read_n, total), total)
        state.records_read = read_n
        decoded: dict[tuple[str, bytes], dict] = {}
        for topic, table in raw_state.items():
            out = state.topics[topic]
            for raw_key, (value, partition, offset) in table.items():
                if value is None:
                    continue  # tombstone
                try:
                    key = _key(raw_key)
                except BadRecord as e:
                    state.unreadable.append(f"{settings.topic(topic)}[{partition}]@{offset}: {e}")
                    continue
                memo = (topic, value)
                if memo in decoded:
                    out[key] = decoded[memo]
                    continue
                try:
                    datum = codec.decode(topic, value)
                except BadRecord as e:
                    state.unreadable.append(f"{settings.topic(topic)}[{partition}]@{offset} {key!r}: {e}")
                    out[key] = None
                    continue
                decoded[memo] = datum
                out[key] = datum
        state.seconds = time.perf_counter() - t0
        return state
    finally:
        await consumer.stop()
