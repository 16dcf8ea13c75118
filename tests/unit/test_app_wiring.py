"""The Faust app as `faust -A alarm_engine` sees it (no broker needed)."""

from __future__ import annotations

import subprocess
import sys


def test_faust_lists_every_table_with_its_help():
    proc = subprocess.run([sys.executable, "-m", "faust", "-A", "alarm_engine", "tables"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cells = [[c.strip() for c in line.split("|")[1:3]] for line in proc.stdout.splitlines()
             if line.startswith("| ")]
    tables = {name: help_text for name, help_text in cells if name != "name"}
    assert set(tables) == {"monitored", "pv-home", "alarm-state"}
    assert all(len(help_text) > 20 for help_text in tables.values()), tables


def test_table_values_keep_nan_and_read_what_the_json_module_wrote():
    """orjson is installed (pv-home entries), and Faust's "json" codec would use it."""
    import json
    import math

    from faust.serializers import codecs

    from alarm_engine.worker.app import alarm_state, monitored, pv_home

    value = {"inputs": {"P": {"value": float("nan")}, "Q": {"value": float("-inf")}}, "n": 2**40}
    for table in (alarm_state, monitored, pv_home):
        codec = codecs.get_codec(table.value_serializer)
        back = codec.loads(codec.dumps(value))
        assert math.isnan(back["inputs"]["P"]["value"]) and back["inputs"]["Q"]["value"] == -math.inf
        assert back["n"] == 2**40
        assert codec.loads(json.dumps(value).encode())["inputs"]["Q"]["value"] == -math.inf


def test_every_agent_runs_with_concurrency_one():
    # faust-streaming #606: concurrency > 1 loses offsets.
    from alarm_engine.worker import app

    agents = list(app.agents.values())
    assert {a.name.rsplit(".", 1)[-1] for a in agents} == {"monitored_agent", "alarm_agent"}
    assert all(a.concurrency == 1 for a in agents)


class _Msg:
    topic, partition, offset, key, value = "t.alarms", 0, 41, b"A", b"\x00\x00\x00\x00\x07"


def _run_guarded(monkeypatch, outages: int, retry_s: float):
    import asyncio

    from alarm_engine.worker import batches
    from alarm_engine.codec import RegistryUnavailable

    rejected, calls = [], []

    def compute():
        calls.append(1)
        if len(calls) <= outages:
            raise RegistryUnavailable("schema id 7: schema registry unreachable (ConnectError)")
        return ["out"]

    def reject(msg, reason):
        rejected.append(reason)
        return ["dead letter"]

    async def no_wait(delay):
        pass

    monkeypatch.setattr(batches, "rejected", reject)
    monkeypatch.setattr(batches, "REGISTRY_RETRY_S", retry_s)
    monkeypatch.setattr(batches.asyncio, "sleep", no_wait)
    outs = asyncio.run(batches.outputs_of(_Msg(), compute))
    return len(calls), rejected, outs


def test_a_registry_outage_is_waited_out_not_dead_lettered(monkeypatch):
    calls, rejected, outs = _run_guarded(monkeypatch, outages=3, retry_s=300)
    assert calls == 4 and rejected == [] and outs == ["out"]


def test_a_registry_outage_beyond_the_retry_time_dead_letters_with_the_reason(monkeypatch):
    calls, rejected, outs = _run_guarded(monkeypatch, outages=10**6, retry_s=0)
    assert calls == 1 and outs == ["dead letter"]
    assert rejected == ["schema id 7: schema registry unreachable (ConnectError); gave up after 0 s"]


def test_table_writes_reach_the_table_only_when_the_batch_commits():
    from alarm_engine.worker.batches import TableView as _StrKeyed

    table = {b"old": 1, b"gone": 2}
    view = _StrKeyed(table)
    view["a"] = 10  # first record of a batch: handled
    del view["gone"]
    view.keep()
    view["b"] = 20  # second record: fails, its writes are dropped
    view["a"] = 99
    view.discard()
    assert view.get("a") == 10 and "gone" not in view and "b" not in view
    assert table == {b"old": 1, b"gone": 2}  # nothing written before the acknowledgement
    view["c"] = 30  # third record, handled; the batch is acknowledged
    import asyncio

    asyncio.run(view.commit())  # no hot path producer here: Faust's way
    assert table == {b"old": 1, b"a": 10, b"c": 30}
    assert view.pending == {} and view.batch == {}


def test_each_record_of_a_batch_is_the_event_in_progress_while_it_is_handled():
    # Faust's RocksDB store reads a key from the partition of the event in progress;
    # in a batch no event is in progress unless the agent sets it.
    import asyncio

    from faust.streams import current_event

    from alarm_engine.worker import batches

    Event = _Event
    inputs = [[Event(0, 1), Event(2, 7)], [Event(1, 3)]]
    stream = _Stream(inputs)
    seen = []

    def compute(topic, key, value, msg):
        seen.append((current_event() and current_event().message.partition, msg.partition))
        return []

    asyncio.run(batches.handle_batches(stream, compute, (batches.TableView({}),)))
    assert seen == [(0, 0), (2, 2), (1, 1)]
    assert current_event() is None
    assert stream.acked == [(0, 1), (2, 7), (1, 3)]


def _key_in(partition: int) -> bytes:
    """A key that Kafka's partitioner puts in `partition` (the agents reject others)."""
    from alarm_engine.partitioning import partition_of
    from alarm_engine.worker.app import settings

    return next(k for k in (b"k%d" % i for i in range(1000)) if partition_of(k, settings.partitions) == partition)


class _Message:
    def __init__(self, partition, offset):
        from faust.types import TP

        from alarm_engine.worker import batches

        self.topic, self.partition, self.offset = next(iter(batches.LOGICAL)), partition, offset
        self.key, self.value, self.timestamp = _key_in(partition), b"v", 0.0
        self.tp, self.generation_id = TP(self.topic, partition), 1


class _Event:
    def __init__(self, partition, offset):
        self.message = _Message(partition, offset)


class _Stream:
    """Faust's Stream as the agents use it: noack_take() batches, ack() per event.
    Each partition starts at its first offset in the batches (its committed offset)."""

    def __init__(self, batches):
        from alarm_engine.worker.app import app

        self.batches = batches
        self.acked = []
        consumer = app.consumer
        consumer._committed_offset.clear()
        for batch in reversed(batches):
            for event in reversed(batch):
                consumer._committed_offset[event.message.tp] = event.message.offset

    async def noack_take(self, max_, within):
        for batch in self.batches:
            yield batch

    async def ack(self, event):
        from alarm_engine.worker import faust_internals

        assert faust_internals._acking.on
        self.acked.append((event.message.partition, event.message.offset))
        return True


def test_an_interrupted_batch_acknowledges_none_of_its_records():
    # Faust's take_events() acknowledged a whole batch on the way out, also when the
    # agent was interrupted before handling it: the commit then skipped the records.
    import asyncio

    import pytest

    from alarm_engine.worker import batches

    stream = _Stream([[_Event(0, 1), _Event(0, 2)], [_Event(0, 3), _Event(0, 4)]])
    view_table = {}
    view = batches.TableView(view_table)

    def compute(topic, key, value, msg):
        view[f"k{msg.offset}"] = msg.offset
        if msg.offset == 4:
            raise asyncio.CancelledError()  # e.g. the agent stopped mid-batch
        return []

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(batches.handle_batches(stream, compute, (view,)))
    assert stream.acked == [(0, 1), (0, 2)]
    # the second batch's writes are dropped with it, its fence too
    assert view_table == {b"k1": 1, b"k2": 2, b"\x00applied:0": {next(iter(batches.LOGICAL)): 2}}


def test_a_record_applied_already_is_acknowledged_and_not_applied_again():
    # A replay after a seek, or an old copy handed over again around a rebalance:
    # applying offset 1 after offset 2 of the same partition would undo offset 2.
    import asyncio

    from alarm_engine.worker import batches

    topic = next(iter(batches.LOGICAL))
    writes = []

    class Table(dict):
        def __setitem__(self, k, v):
            writes.append(k)
            super().__setitem__(k, v)

    view = batches.TableView(Table())
    stream = _Stream([[_Event(0, 1), _Event(0, 2), _Event(1, 5)], [_Event(0, 1)], [_Event(0, 2), _Event(0, 3)],
                      [_Event(1, 5), _Event(1, 6)]])
    applied = []

    def compute(topic, key, value, msg):
        applied.append((msg.partition, msg.offset))
        view[f"state{msg.partition}"] = msg.offset
        return []

    asyncio.run(batches.handle_batches(stream, compute, (view,)))
    assert applied == [(0, 1), (0, 2), (1, 5), (0, 3), (1, 6)]
    assert stream.acked == [(0, 1), (0, 2), (1, 5), (0, 1), (0, 2), (0, 3), (1, 5), (1, 6)]
    assert view.t == {b"state0": 3, b"state1": 6,
                      b"\x00applied:0": {topic: 3}, b"\x00applied:1": {topic: 6}}
    # In each batch the fence is written after the state it vouches for.
    assert writes == [b"state0", b"state1", b"\x00applied:0", b"\x00applied:1",
                      b"state0", b"\x00applied:0", b"state1", b"\x00applied:1"]


def test_the_consumer_acknowledges_input_records_only_for_the_agent_that_handled_them():
    # Faust acknowledges records it skips during a rebalance; a commit must not pass them.
    from faust.types import TP, Message

    from alarm_engine.worker import batches

    def message(topic):
        return Message(topic, 0, 5, 0.0, 0, None, b"k", b"v", None, tp=TP(topic, 0))

    consumer = batches.app.consumer  # created, not started
    skipped, handled, other = message(next(iter(batches.LOGICAL))), message(next(iter(batches.LOGICAL))), message("x")
    consumer.ack(skipped)
    consumer.ack(other)  # not an input topic of the agents: Faust's rules
    from alarm_engine.worker import faust_internals
    faust_internals._acking.on = True
    try:
        consumer.ack(handled)
    finally:
        faust_internals._acking.on = False
    assert (skipped.acked, handled.acked, other.acked) == (False, True, True)


def test_records_fetched_before_a_seek_of_their_partition_are_not_handled(monkeypatch):
    # Faust hands a fetched batch over one record at a time; a seek in between used
    # to let the rest through, ahead of the same records read again (out of order),
    # and its read position bookkeeping then skipped records for good.
    import asyncio

    from faust.types import TP

    from alarm_engine.worker import batches

    topic = next(iter(batches.LOGICAL))
    tp0, tp1 = TP(topic, 0), TP(topic, 1)
    fetched = [(tp0, 10), (tp0, 11), (tp1, 20), (tp0, 12)]
    consumer, seeks = _faust_consumer(monkeypatch, lambda: fetched)

    async def drain():
        handed = []
        async for tp, message in consumer.getmany(timeout=0):
            handed.append(message)
            if message.offset == 10:  # a seek of partition 0 to 9 runs while 10 is handed over
                await consumer.seek(tp0, 9)
                consumer._read_offset[tp0] = 10  # what Faust sets after handing 10 over
        return handed

    handed = asyncio.run(drain())
    assert [m.offset for m in handed] == [10, 20]  # 11 and 12 are from before the seek
    assert seeks == [(0, 9), (0, 9)]  # the seek, then again for the records fetched before it
    assert consumer._read_offset[tp0] == 9  # the seek's position, so 9.. are read again
    assert consumer.stale(handed[0]) and not consumer.stale(handed[1])


def test_records_arriving_while_a_seek_is_under_way_are_read_again(monkeypatch):
    # They may be from after the seek, and then nothing would bring them back.
    import asyncio

    from faust.types import TP

    from alarm_engine.worker import batches

    topic = next(iter(batches.LOGICAL))
    tp = TP(topic, 2)
    consumer, seeks = _faust_consumer(monkeypatch, lambda: [(tp, 40)])

    async def run():
        consumer._seeking(tp)  # a seek to 40 under way
        handed = [m async for _, m in consumer.getmany(timeout=0)]
        await consumer._sought(tp, 40)
        return handed

    assert asyncio.run(run()) == []
    assert seeks == [(2, 40)] and consumer._expect[tp] == 40


def test_a_stale_record_is_neither_handled_nor_acknowledged():
    import asyncio

    from alarm_engine.worker import batches

    consumer = batches.app.consumer
    old, fresh = _Event(2, 30), _Event(2, 31)
    consumer._handed[old.message] = consumer._epoch[old.message.tp]
    consumer._epoch[old.message.tp] += 1  # then its partition was seeked
    stream = _Stream([[old, fresh]])
    consumer._committed_offset[fresh.message.tp] = 31  # the seek that made `old` stale
    applied = []
    asyncio.run(batches.handle_batches(stream, lambda t, k, v, msg: applied.append(msg.offset) or [],
                                      (batches.TableView({}),)))
    assert applied == [31] and stream.acked == [(2, 31)]


def test_holes_are_the_offset_ranges_kafka_does_not_have():
    from alarm_engine.log_probe import holes

    assert holes(4, [5, 9, 10, 14]) == {4: 5, 6: 9, 11: 14}
    assert holes(5, [5, 6, 7]) == {} and holes(3, []) == {}


def test_records_lost_on_their_way_to_the_agent_are_read_again_holes_are_passed(monkeypatch):
    # Faust drops records between the consumer and the agents around rebalances:
    # a jump makes the consumer ask Kafka; records it has are read again from the
    # first missing one; a hole in the log is passed, and the commit moves over it.
    import asyncio

    from alarm_engine.worker import batches

    consumer, seeks = _faust_consumer(monkeypatch, lambda: [])
    probes = []

    class Log:  # offsets 7 and 8 compacted away
        async def offsets(self, topic, partition, start, stop):
            probes.append((start, stop))
            return [o for o in (5, 6, 9, 10, 12) if o >= start]

    consumer._probe = Log()
    # 6 lost on its way, read again after the seek back; then 7 and 8 are a hole.
    inputs = [[_Event(0, 5), _Event(0, 9)], [_Event(0, 6), _Event(0, 9), _Event(0, 10), _Event(0, 12)]]
    tp = inputs[0][0].message.tp

    class Fresh(_Stream):  # each batch is read after the seek the one before made
        async def noack_take(self, max_, within):
            for batch in self.batches:
                for event in batch:
                    consumer._handed[event.message] = consumer._epoch[tp]
                yield batch

    stream = Fresh(inputs)
    applied = []

    def compute(topic, key, value, msg):
        applied.append(msg.offset)
        return []

    asyncio.run(batches.handle_batches(stream, compute, (batches.TableView({}),)))
    assert applied == [5, 6, 9, 10, 12]
    assert seeks == [(0, 6)] and probes == [(6, 9)]  # the first probe told about 7..8 and 11 too
    assert consumer._holes[tp] == {7: 9, 11: 12}
    assert stream.acked == [(0, 5), (0, 6), (0, 9), (0, 10), (0, 12)]
    for _, offset in stream.acked:
        consumer._acked[tp].append(offset)
    assert consumer._new_offset(tp) == 13


def test_a_jump_kafka_cannot_be_asked_about_is_read_again(monkeypatch):
    import asyncio

    consumer, seeks = _faust_consumer(monkeypatch, lambda: [])

    class Down:
        async def offsets(self, topic, partition, start, stop):
            raise ConnectionError("broker down")

    consumer._probe = Down()
    event = _Event(1, 30)
    assert asyncio.run(consumer.missing(event.message.tp, 20, 30)) is False
    assert seeks == [(1, 20)] and not consumer._holes[event.message.tp]


def test_records_lost_on_their_way_in_a_quiet_partition_are_read_again(monkeypatch):
    # No later record comes to show the jump: the commit would wait before them for good.
    import asyncio

    from faust.types import TP

    from alarm_engine.worker import batches

    consumer, seeks = _faust_consumer(monkeypatch, lambda: [])
    tp = TP(next(iter(batches.LOGICAL)), 1)
    monkeypatch.setattr(type(consumer), "assignment", lambda self: {tp, TP("other", 1)})
    consumer._committed_offset[tp], consumer._expect[tp] = 40, 43  # 40..42 handed over

    def check():
        asyncio.run(consumer.reread_stalled())
        return list(seeks)

    assert check() == []  # first look
    consumer._expect[tp] = 44  # a new record handed over since: not stalled
    assert check() == []
    in_hand = _Message(1, 43)
    consumer._unacked_messages.add(in_hand)  # in an agent's hands
    assert check() == [] and check() == []
    consumer._unacked_messages.discard(in_hand)
    consumer._acked[tp].append(43)  # acknowledged, commit to come
    assert check() == [] and check() == []
    consumer._acked[tp].clear()
    assert check() == []
    consumer.app.rebalancing = True  # the committed offsets are not known until its seek
    try:
        assert check() == [] and check() == []
    finally:
        consumer.app.rebalancing = False
    assert check() == []
    assert check() == [(1, 40)]  # the same for a whole interval: read again
    assert consumer._expect[tp] == 40


def test_an_offset_is_committed_only_over_handled_records_and_holes_in_the_log():
    # Faust's own rule let the acknowledged offsets start one past the committed
    # offset: a record lost there was committed as if handled.
    from faust.types import TP

    from alarm_engine.worker import batches

    consumer = batches.app.consumer
    tp = TP(next(iter(batches.LOGICAL)), 1)
    consumer._committed_offset[tp] = 100
    consumer._acked[tp][:] = [102, 101, 104]
    assert consumer._new_offset(tp) is None  # 100 not handled
    consumer._acked[tp].append(100)
    assert consumer._new_offset(tp) == 103  # 103 not handled
    consumer._committed_offset[tp] = 103
    consumer._holes[tp][103] = 104
    consumer._acked[tp].append(99)  # an old copy
    assert consumer._new_offset(tp) == 105 and consumer._acked[tp] == [] and not consumer._holes[tp]


def _faust_consumer(monkeypatch, fetch):
    """The engine's consumer over a stand-in for Faust's: each getmany() hands over
    the (tp, offset) pairs `fetch()` returns, and seeks are recorded, not made."""
    from faust.transport.drivers.aiokafka import Transport
    from faust.types import Message

    from alarm_engine.worker import batches

    seeks = []

    async def getmany(self, timeout):
        for tp, offset in fetch():
            yield tp, Message(tp.topic, tp.partition, offset, 0.0, 0, None, b"k", b"v", None, tp=tp)

    async def seek(self, partition, offset):
        seeks.append((partition.partition, offset))
        self._read_offset[partition] = offset

    monkeypatch.setattr(Transport.Consumer, "getmany", getmany)
    monkeypatch.setattr(Transport.Consumer, "seek", seek)
    consumer = batches.app.consumer
    for state in (consumer._expect, consumer._holes, consumer._acked, consumer._stalled,
                  consumer._unacked_messages, consumer._committed_offset):
        state.clear()
    consumer._probe = None
    return consumer, seeks
