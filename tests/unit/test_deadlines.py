from alarm_engine.deadlines import FORCE_MS, fireable

T = 1_000_000


def test_a_deadline_not_reached_does_not_fire_even_when_settled():
    assert fireable({"A": (0, "PV", T + 1)}, T, {0: T + 5}, {0}) == []


def test_a_due_deadline_of_a_settled_partition_fires():
    assert fireable({"A": (0, "PV", T)}, T + 1, {}, {0}) == ["A"]


def test_a_due_deadline_waits_for_a_backlog_older_than_it():
    # pv-state of partition 0 applied up to T - 2000 and more is waiting: the clear
    # that may cancel the on-delay could be in it.
    assert fireable({"A": (0, "PV", T)}, T + 500, {0: T - 2000}, set()) == []


def test_a_due_deadline_fires_once_the_stream_time_reaches_it():
    assert fireable({"A": (0, "PV", T)}, T + 500, {0: T}, set()) == ["A"]


def test_the_stream_time_of_another_partition_does_not_count():
    assert fireable({"A": (0, "PV", T)}, T + 500, {1: T + 400}, {1}) == []


def test_a_stuck_input_holds_a_deadline_back_only_for_a_while():
    d = {"A": (0, "PV", T)}
    assert fireable(d, T + FORCE_MS - 1, {0: T - 1}, set()) == []
    assert fireable(d, T + FORCE_MS, {0: T - 1}, set()) == ["A"]


def test_each_alarm_is_decided_by_its_own_partition():
    d = {"A": (0, "P0", T), "B": (1, "P1", T), "C": (2, "P2", T + 10)}
    assert sorted(fireable(d, T + 5, {0: T + 5}, {2})) == ["A"]


# --- what the CA bridge holds back (alarm_engine.worker.bridge.Bridge.held) ----------

class _Monitor:
    """CAMonitor's bookkeeping without libca: what is subscribed, with which mask."""

    def __init__(self):
        self.subs: dict[str, frozenset] = {}
        self.last: dict[str, object] = {}
        self.created: list[str] = []
        self.cleared: list[str] = []

    def subscribe(self, pv, mask):
        return bool(self.subscribe_many([(pv, mask)]))

    def subscribe_many(self, items):
        new = []
        for pv, mask in items:
            if self.subs.get(pv) != mask:
                self.subs[pv] = mask
                self.last.pop(pv, None)
                new.append(pv)
        self.created += new
        return new

    def unsubscribe_many(self, pvs):
        for pv in pvs:
            if self.subs.pop(pv, None) is not None:
                self.last.pop(pv, None)
                self.cleared.append(pv)

    def last_state(self, pv):
        return self.last.get(pv)


def _bridge():
    from alarm_engine.worker.bridge import Bridge

    b = Bridge()
    b.monitor = _Monitor()
    return b


def test_partitions_not_yet_resubscribed_are_held():
    b = _bridge()
    assert b.held({0, 1}) == {0, 1}  # assigned, subscriptions not made yet
    b.sync({}, {0, 1})
    assert b.held({0, 1}) == set()
    b.revoke({1})
    assert b.held({0, 1}) == {1}


def test_a_pv_is_held_until_its_first_state_and_while_its_states_are_unsent():
    b = _bridge()
    b.sync({"A": ([], 0), "B": ([], 1)}, {0, 1})
    assert b.held({0, 1}) == {0, 1}  # subscribed, no value yet
    b.wake = type("E", (), {"set": lambda self: None})()
    b.on_state("A", object())
    assert b.held({0, 1}) == {0, 1}  # A's state not sent yet
    b.pending.clear()
    assert b.held({0, 1}) == {1}
    b.remove("B")
    assert b.held({0, 1}) == set()


class _Wake:
    def set(self):
        pass


def test_a_rebalance_that_gives_partitions_back_costs_no_channel_work():
    b = _bridge()
    b.wake = _Wake()
    m = b.monitor
    b.sync({"A": ([], 0), "B": ([], 1), "C": ([], 1)}, {0, 1})
    assert m.created == ["A", "B", "C"]
    m.last.update(A="a0", B="b0")  # states reported: A and B; C not connected yet
    b.pending.clear()
    b.awaiting.pop("A"), b.awaiting.pop("B")

    b.revoke({0, 1})
    assert b.partition_of == {} and set(b.parked) == {"A", "B", "C"}
    b.on_state("A", "a1")  # parked: not this worker's to send
    assert b.pending == {}
    m.last["A"] = "a1"
    # The new assignment gives partition 1 back, with a new PV; partition 0 went elsewhere.
    b.sync({"B": ([], 1), "C": ([], 1), "D": ([], 1)}, {1})
    assert m.created == ["A", "B", "C", "D"] and m.cleared == ["A"]
    assert b.parked == {} and b.partition_of == {"B": 1, "C": 1, "D": 1}
    # B reports its latest state as a first event would; C and D are awaited.
    assert b.pending == {"B": ["b0"]}
    assert b.awaiting == {"C": 1, "D": 1}
    assert b.held({1}) == {1}


def test_states_queued_before_a_revoke_are_not_sent_and_parked_channels_expire():
    b = _bridge()
    b.wake = _Wake()
    m = b.monitor
    b.sync({"A": ([], 0), "B": ([], 1)}, {0, 1})
    b.on_state("A", "a0")
    b.on_state("B", "b0")
    b.revoke({0})
    assert b.pending == {"B": ["b0"]}
    b.revoke({1})
    b.expire_parked(1)  # only what the first revoke parked
    assert m.cleared == ["A"] and set(b.parked) == {"B"}
    b.add("B", [], 1)  # a monitored-pvs record adopts it again
    assert b.parked == {} and b.awaiting == {"B": 1}  # no state known: awaited
    b.expire_parked(2)
    assert m.cleared == ["A"] and b.partition_of == {"B": 1}


def test_a_parked_pv_with_another_mask_is_subscribed_again():
    b = _bridge()
    b.wake = _Wake()
    m = b.monitor
    b.sync({"A": ([], 0)}, {0})
    m.last["A"] = "a0"
    b.awaiting.clear()
    b.revoke({0})
    b.sync({"A": (["ALARM"], 0)}, {0})
    assert m.created == ["A", "A"] and b.awaiting == {"A": 0} and b.pending == {}
