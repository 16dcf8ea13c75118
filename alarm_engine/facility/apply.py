"""`alarm-engine apply`: files → validation → current state → plan → only the changes.

A file with problems is refused as a whole, before anything is read or written. The plan is
computed against the compacted topics, so applying the same files again writes nothing, and
an apply cut short (a broker lost in the middle, Ctrl-C) leaves keys that are either at
their old or at their new value: a second apply finds the ones still to do and writes those.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import socket
import sys
import time

from aiokafka import AIOKafkaProducer

from alarm_engine.config import Settings
from alarm_engine.facility import diff, fileformat, state
from alarm_engine.facility.fileformat import META_FIELDS


class Progress:
    """A bar on a terminal, a plain line every 10 % (or 10 s) otherwise."""

    def __init__(self, label: str, stream=None, min_total: int = 2000):
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.min_total = min_total
        self.last_t = 0.0
        self.last_step = -1
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        if total < self.min_total:
            return  # short runs: no progress lines
        now = time.monotonic()
        if self.tty:
            if now - self.last_t < 0.1 and done < total:
                return
            width = 30
            filled = int(width * done / total) if total else width
            self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] "
                              f"{100 * done // max(total, 1):3d}% {done:,}/{total:,}")
            if done >= total:
                self.stream.write("\n")
            self.stream.flush()
        else:
            step = 10 * done // max(total, 1)
            if done < total and step == self.last_step and now - self.last_t < 10:
                return
            self.last_step = step
            self.stream.write(f"{self.label}: {done:,}/{total:,} ({100 * done // max(total, 1)}%)\n")
            self.stream.flush()
        self.last_t = now
        self.shown = True


def who() -> tuple[str, str]:
    try:
        user = os.environ.get("USER") or getpass.getuser()
    except Exception:  # no passwd entry (containers)
        user = ""
    return user, socket.gethostname()


def with_meta(datum: dict, schema_fields: set[str], user: str, host: str) -> dict:
    """The record as written: user and host filled in where the schema has them and the
    file did not give them."""
    if not schema_fields & set(META_FIELDS):
        return datum
    out = dict(datum)
    for name, value in (("user", user), ("host", host)):
        if name in schema_fields and not out.get(name):
            out[name] = value
    return out


def print_problems(problems, out) -> None:
    for p in sorted(problems, key=lambda p: (p.file, p.line)):
        out.write(f"{p}\n")
    n = len(problems)
    out.write(f"{n} problem{'s' if n != 1 else ''}: nothing was written\n")


async def produce(settings: Settings, codec, writes, progress=None, user: str = "", host: str = "") -> int:
    """Send every (topic, key, datum) with one producer; returns how many were acknowledged.

    Records go out in batches per partition (the producer's batch API: one future per batch,
    not per record), partitioned as the Java client and the CLI do (murmur2 of the key).
    One topic is acknowledged before the next starts, so that the engine sees a PV monitored
    before an alarm reads it (and, for tombstones, the alarm gone before its PV).
    Raises ApplyIncomplete if any batch failed, after every batch has settled."""
    from aiokafka.partitioner import DefaultPartitioner

    schemas = fileformat.schemas()
    fields = {t: {f["name"] for f in s["fields"]} for t, s in schemas.items()}
    headers = [("user", user.encode()), ("host", host.encode()), ("client", b"alarm-engine apply")]
    producer = AIOKafkaProducer(**settings.kafka_kwargs(), acks="all", linger_ms=20,
                                max_batch_size=512 * 1024, enable_idempotence=True)
    try:
        await producer.start()
    except BaseException:
        await producer.stop()
        raise
    partitioner = DefaultPartitioner()
    total, acked, failed = len(writes), 0, []
    try:
        # Consecutive writes of one topic form a phase (plan.ordered: definitions by topic,
        # then tombstones by topic).
        phases: list[tuple[str, list]] = []
        for topic, key, datum in writes:
            if not phases or phases[-1][0] != topic or (datum is None) != (phases[-1][1][-1][1] is None):
                phases.append((topic, []))
            phases[-1][1].append((key, datum))
        for topic, items in phases:
            name = settings.topic(topic)
            parts = sorted(await producer.partitions_for(name))
            # Encode and append to each partition's open batch; a full batch is sent at once,
            # so the broker works while the rest is encoded.
            encoded: dict[int, bytes] = {}  # datums shared by many keys (implied PVs) are encoded once
            open_batches: dict[int, list] = {}  # partition → [batch, records in it]
            sent = []
            for key, datum in items:
                k = key.encode()
                if datum is None:
                    value = None
                elif id(datum) in encoded:
                    value = encoded[id(datum)]
                else:
                    value = encoded[id(datum)] = codec.encode(topic, with_meta(datum, fields[topic], user, host))
                partition = partitioner(k, parts, parts)
                slot = open_batches.get(partition)
                if slot is None:
                    slot = open_batches[partition] = [producer.create_batch(), 0]
                if slot[0].append(key=k, value=value, timestamp=None, headers=headers) is None:
                    sent.append((await producer.send_batch(slot[0], name, partition=partition), slot[1]))
                    slot[0], slot[1] = producer.create_batch(), 0
                    if slot[0].append(key=k, value=value, timestamp=None, headers=headers) is None:
                        raise ValueError(f"record {k[:80]!r} does not fit in a batch")
                slot[1] += 1
            for partition, (batch, n) in open_batches.items():
                if n:
                    sent.append((await producer.send_batch(batch, name, partition=partition), n))
            for fut, n in sent:
                try:
                    await fut
                    acked += n
                except Exception as e:  # the others still settle; the next apply completes
                    failed.append(e)
                if progress:
                    progress(acked + len(failed), total)
    finally:
        await producer.stop()
    if failed:
        raise ApplyIncomplete(acked, total, failed[0])
    return acked


class ApplyIncomplete(RuntimeError):
    def __init__(self, acked: int, total: int, cause: BaseException):
        super().__init__(f"{total - acked} of {total} records were not acknowledged "
                         f"({cause.__class__.__name__}: {cause}); apply again: it writes what is still missing")
        self.acked = acked


async def run(paths: list[str], settings: Settings, dry_run: bool = False, prune: bool = False,
              show: int = 10, out=None, err=None, codec=None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    t0 = time.perf_counter()
    desired, problems = fileformat.load(paths, settings)
    if problems:
        print_problems(problems, err)
        return 1
    for w in desired.warnings:
        err.write(f"warning: {w}\n")
    t_files = time.perf_counter() - t0
    if codec is None:
        from alarm_engine.registry import make_codec

        codec = make_codec(settings)
    topics = list(desired.records)
    current = await state.read(settings, codec, topics, Progress("reading the topics", err, 50_000))
    for line in current.unreadable[:10]:
        err.write(f"warning: unreadable record {line}\n")
    if len(current.unreadable) > 10:
        err.write(f"warning: ... and {len(current.unreadable) - 10} more unreadable records\n")
    p = diff.plan(current.topics, desired.records, prune)
    for line in diff.summary(p, show):
        out.write(line + "\n")
    writes = p.ordered()
    out.write(f"read {desired.count():,} entries from {len(paths)} file(s) in {t_files:.1f} s, "
              f"{current.records_read:,} records from the topics in {current.seconds:.1f} s\n")
    if dry_run:
        out.write(f"dry run: nothing written ({len(writes):,} record(s) would be)\n")
        return 0
    if not writes:
        out.write("nothing to write: the topics already hold what the files say\n")
        return 0
    user, host = who()
    t1 = time.perf_counter()
    n = await produce(settings, codec, writes, Progress("writing", err), user, host)
    out.write(f"wrote {n:,} record(s) in {time.perf_counter() - t1:.1f} s\n")
    out.flush()
    return 0
