"""Which partition a key belongs in, and what becomes of a record found elsewhere.

The engine, its CLI and the Java clients put a record in partition
murmur2(key bytes), made positive, modulo the partition count (Kafka's
DefaultPartitioner; aiokafka's too). kcat and other librdkafka clients
(confluent-kafka among them) default to CRC32 instead, unless given
`-X topic.partitioner=murmur2_random`: a key written by them can land in another
partition than the same key written by the CLI. Compaction then keeps two live
records of one key, and a tombstone in the wrong partition deletes nothing: an
alarm stayed SHELVED after an unshelve.

Choice: such a record on an operators' topic is rejected to `dead-letters`, with a
reason that names the partition it belongs in and the option to use; it is not
applied (neither a record nor a tombstone). Moving it instead (re-producing it to
its partition) would apply a record in an order no one wrote, against a newer one
there possibly; the operator who sees the dead letter writes it again correctly.
The engine's own topics (pv-state, alarm-deps, alarm-inputs) are written by
the engine with murmur2 and are not checked. `list-*` warns about a key found in
two partitions.
"""

from __future__ import annotations

from alarm_engine.codec import BadRecord

CHECKED_TOPICS = ("monitored-pvs", "alarms", "shelved-alarms", "alarm-activations")
KCAT_OPTION = "-X topic.partitioner=murmur2_random"


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (org.apache.kafka.common.utils.Utils.murmur2), as a signed 32-bit int."""
    m, r = 0x5BD1E995, 24
    length = len(data)
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    for i in range(0, length - length % 4, 4):
        k = data[i] | (data[i + 1] << 8) | (data[i + 2] << 16) | (data[i + 3] << 24)
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = (h * m) & 0xFFFFFFFF
        h ^= k
    tail, rest = length & ~3, length % 4
    if rest == 3:
        h ^= data[tail + 2] << 16
    if rest >= 2:
        h ^= data[tail + 1] << 8
    if rest >= 1:
        h ^= data[tail]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def partition_of(key: bytes, partitions: int) -> int:
    """Kafka's partition for `key`: toPositive(murmur2(key)) % partitions."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def wrong_partition(topic: str, key: bytes | None, partition: int, partitions: int) -> str | None:
    """The reason to reject a record of `topic` found in `partition`, or None if it is where it belongs."""
    if topic not in CHECKED_TOPICS or key is None:
        return None
    right = partition_of(key, partitions)
    if right == partition:
        return None
    return (f"wrong partition: key {key.decode('utf-8', 'replace')!r} belongs in partition {right} of "
            f"{topic} (murmur2 of the key, as the Java client and alarm-engine write it), not {partition}; "
            f"not applied: write it again with a murmur2 partitioner (kcat: {KCAT_OPTION}; "
            f"librdkafka/confluent-kafka: partitioner=murmur2_random)")


def checked(compute, partitions: int):
    """An agent's per-record `compute(topic, key, value, msg)`, which first rejects
    (BadRecord -> dead-letters) a record in the wrong partition."""
    def compute_checked(topic, key, value, msg):
        reason = wrong_partition(topic, msg.key, msg.partition, partitions)
        if reason is not None:
            raise BadRecord(reason)
        return compute(topic, key, value, msg)

    return compute_checked


def split_keys(partitions_of: dict[str, set[int]]) -> dict[str, list[int]]:
    """Keys seen in more than one partition (from a replay of a topic)."""
    return {k: sorted(ps) for k, ps in partitions_of.items() if len(ps) > 1}


def split_key_warning(topic: str, key: str, found: list[int], partitions: int) -> str:
    right = partition_of(key.encode(), partitions)
    return (f"warning: key {key!r} has records in partitions {', '.join(map(str, found))} of {topic}; "
            f"it belongs in partition {right} (the engine rejects the others to dead-letters); "
            f"write with a murmur2 partitioner (kcat: {KCAT_OPTION})")
