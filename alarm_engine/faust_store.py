"""Direct access to a Faust RocksDB table's store: the one place that leans on
faust-streaming internals (pinned to 0.15.3 in pyproject.toml).

The hot path (hotpath.py) reads and writes a Faust table itself, a batch at a
time, instead of through `table[key] = value`: Faust's per-write path (one
changelog send through its producer buffer, one RocksDB put, one persisted-offset
put per acknowledgement) is most of the CPU of a record (docs/performance.md).
The table stays Faust's: the same RocksDB files, the same changelog topic and
partitions, so Faust's assignment, recovery and `faust tables` work unchanged.
What this needs from Faust: the store's per-partition database
(`Store._db_for_partition`, opened by Faust on assignment and recovery) and
`set_persisted_offset`, which tells Faust's recovery where the changelog is
already applied locally.
"""

from __future__ import annotations

import json

import rocksdict
from faust.types import TP


class TableStore:
    def __init__(self, table):
        self.table = table

    @property
    def changelog(self) -> str:
        return self.table.changelog_topic.get_topic_name()

    def _db(self, partition: int):
        return self.table.data._db_for_partition(partition)

    def get(self, partition: int, key: bytes) -> bytes | None:
        return self._db(partition).get(key)

    def write(self, partition: int, items: dict[bytes, bytes | None], changelog_offset: int | None) -> None:
        """One WriteBatch; then the changelog offset it corresponds to."""
        batch = rocksdict.WriteBatch(raw_mode=True)
        for k, v in items.items():
            if v is None:
                batch.delete(k)
            else:
                batch.put(k, v)
        db = self._db(partition)
        db.write(batch)
        if changelog_offset is not None:
            self.table.data.set_persisted_offset(TP(self.changelog, partition), changelog_offset)

    def items(self, partition: int):
        """(key, decoded value) of one partition, Faust's own offset key left out."""
        offset_key = self.table.data.offset_key
        for k, v in self._db(partition).items():
            if k != offset_key:
                yield k, json.loads(v)
