"""The engine's two processors (alarm-keyed AlarmProcessor, PV-keyed PVHome) against the
core-only oracle of the convergence test, with messages delivered in any order Kafka
allows: each (sender, topic, key) is a FIFO channel, channels interleave at random; the
PV homes replay (send their current outputs again) and the alarm partition crashes (its
table back to what it last persisted, the records it consumed since read again).

This is where a lost message between the two sides shows (an alarm moving between its
PV's home and its own partition while the PVs it now reads answer), with no broker.
"""

from __future__ import annotations

import collections
import copy
import random

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from alarm_engine.config import Settings
from alarm_engine.engine import AlarmProcessor
from alarm_engine.pv_home import PVHome, decode_entry, encode_entry
from tests.integration.engine import Oracle, Workload, divergence

S = Settings()


class Network:
    """Each processor's outputs wait in its outbox, one FIFO per (sender, topic, key), until
    they are appended to their topic's log (one FIFO per (topic, key), as a partition
    keeps a key's records in order); logs are consumed in order. Which outbox appends
    and which log is consumed next is chosen at random: every order Kafka allows.
    A handover is appended only after every earlier record of its sender (acknowledged
    first, as the shell sends it)."""

    def __init__(self, codec, rnd: random.Random):
        self.codec = codec
        self.rnd = rnd
        self.alarms = AlarmProcessor(S, codec, {})
        self.home = PVHome(codec)
        self.entries: dict[str, bytes] = {}
        self.active: dict[str, dict] = {}
        self.outbox: dict[tuple, collections.deque] = collections.defaultdict(collections.deque)
        self.logs: dict[tuple, collections.deque] = collections.defaultdict(collections.deque)
        self.seq = 0
        self.replays = 0  # how many replays at PV homes may still happen
        # Crashes of the alarm partition: its table as last persisted, and the records it
        # consumed since, which it reads again from its fence after a crash.
        self.crashes = 0
        self.persisted: dict = {}
        self.unpersisted: list[tuple] = []
        self.clock = 0
        self.now = 0  # the latest record time: a replay's records are sent now

    def put(self, sender: str, outs, ts: int) -> None:
        for o in outs:
            self.seq += 1
            self.outbox[(sender, o.topic, o.key.decode())].append((self.seq, o, ts))

    def log(self, topic: str, key: str, value, ts: int) -> None:
        self.now = max(self.now, ts)
        self.logs[(topic, key)].append((value, ts))

    def _deliver(self, topic, key, value, ts) -> None:
        if topic == "active-alarms":
            datum = self.codec.decode("active-alarms", value)
            if datum is None:
                self.active.pop(key, None)
            else:
                self.active[key] = datum
        elif topic in ("pv-state", "alarm-deps"):
            e = decode_entry(key, self.entries.get(key))
            outs = self.home.handle(topic, key, value, ts, e)
            self.entries[key] = encode_entry(e)
            self.put(f"home:{key}", outs, ts)
        elif topic == "dead-letters":
            raise AssertionError(f"dead letter: {self.codec.decode('dead-letters', value)['reason']}")
        else:
            self.unpersisted.append((topic, key, value, ts))
            self.clock += 1  # the time of handling: later for a record read again
            self.put("processor", self.alarms.handle(topic, key, value, ts, self.clock), ts)

    def _appendable(self, channel) -> bool:
        seq, o, _ = self.outbox[channel][0]
        if not o.handover:
            return True
        sender = channel[0]
        return not any(q and q[0][0] < seq for c, q in self.outbox.items() if c[0] == sender)

    def step(self) -> bool:
        moves = [("append", c) for c, q in self.outbox.items() if q and self._appendable(c)]
        moves += [("consume", c) for c, q in self.logs.items() if q]
        if self.replays and self.entries:
            moves.append(("replay", self.rnd.choice(sorted(self.entries))))
        if self.unpersisted:
            moves.append(("persist", None))
            if self.crashes:
                moves.append(("crash", None))
        if not moves:
            assert not any(self.outbox.values()), "a handover waits for ever"
            return False
        what, channel = self.rnd.choice(moves)
        if what == "persist":
            self.persisted, self.unpersisted = copy.deepcopy(self.alarms.table), []
        elif what == "crash":
            # The partition restarts from its persisted table and reads again, in order per
            # key, every record it had consumed since; what it sent meanwhile stays sent.
            self.crashes -= 1
            self.alarms.table.clear()
            self.alarms.table.update(copy.deepcopy(self.persisted))
            self.alarms.forget()  # a new process
            for topic, key, value, ts in reversed(self.unpersisted):
                self.logs[(topic, key)].appendleft((value, ts))
            self.unpersisted = []
        elif what == "replay":
            # A record of this PV read again after a crash: already applied, so the home
            # sends what its entry implies now (PVHome.current_outputs).
            self.replays -= 1
            self.put(f"home:{channel}", self.home.current_outputs(channel, decode_entry(channel, self.entries[channel])), self.now)
        elif what == "append":
            _, o, ts = self.outbox[channel].popleft()
            self.log(o.topic, o.key.decode(), o.value, ts)
        else:
            value, ts = self.logs[channel].popleft()
            self._deliver(*channel, value, ts)
        return True


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**30), n_alarms=st.integers(1, 5), n_pvs=st.integers(2, 4),
       n_records=st.integers(5, 80), deliveries_per_record=st.integers(0, 6), replays=st.integers(0, 10),
       crashes=st.integers(0, 4))
def test_any_delivery_order_converges_to_the_oracle(codec, seed, n_alarms, n_pvs, n_records,
                                                    deliveries_per_record, replays, crashes):
    rnd = random.Random(seed)
    workload, oracle = Workload(seed, n_alarms=n_alarms, n_pvs=n_pvs), Oracle(S)
    net = Network(codec, rnd)
    net.replays = replays
    net.crashes = crashes
    ts = workload.t0
    for _ in range(n_records):
        topic, key, datum = workload.next()
        ts += 1
        oracle.apply(topic, key, datum, ts)
        value = None if datum is None else codec.encode(topic, codec._json[topic].read(datum))
        net.log(topic, key, value, ts)
        for _ in range(rnd.randint(0, deliveries_per_record)):
            net.step()
    while net.step():
        pass
    expected = oracle.expected()
    # As in the convergence test: only workloads whose result does not depend on how
    # the input topics interleave (the engine reads them in any order) have one answer.
    assume(not divergence(expected, oracle.expected_from_final_values()))
    diff = divergence(expected, net.active)
    assert not diff, sorted(diff.items())


def test_a_replay_at_the_alarm_partition_does_not_hide_what_the_home_shows(codec):
    # Found by the SIGKILL convergence test (seed 949626212): an external alarm with an
    # activation is deleted and defined again as a per-PV alarm, so it moves to its PV's
    # home, which shows it ACTIVE. The alarm's partition is killed before its state after
    # those two records is persisted: it reads them again from its earlier state, publishes
    # the delete's tombstone again and hands the alarm over again. The home had the alarm
    # with the same state already; it must publish it again over the replayed tombstone.
    from bench.data import alarm_datum

    net = Network(codec, random.Random(0))

    def feed(topic, key, datum, ts):
        net.log(topic, key, codec.encode(topic, datum), ts)

    def drain():
        while net.step():
            pass

    feed("alarms", "a", alarm_datum(external=True), 1)
    feed("alarm-activations", "a", {"priority": "P1_LIFE", "note": ""}, 2)
    drain()
    assert net.active["a"]["cause"] == "EXTERNAL"
    persisted = copy.deepcopy(net.alarms.table)
    later = [("alarms", "a", None, 3), ("alarms", "a", alarm_datum("P:1"), 4)]
    for record in later:
        feed(*record)
    drain()
    assert (net.active["a"]["state"], net.active["a"]["cause"]) == ("ACTIVE", "EXTERNAL")
    net.alarms.table.clear()
    net.alarms.table.update(copy.deepcopy(persisted))  # restored from its changelog
    net.alarms.forget()  # a new process
    for record in later:  # read again from its fence
        feed(*record)
    drain()
    assert "a" in net.active, "the replayed tombstone hides the alarm the home shows"
    assert (net.active["a"]["state"], net.active["a"]["cause"]) == ("ACTIVE", "EXTERNAL")
