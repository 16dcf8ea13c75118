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
    def subscribe(self, pv, mask):
        pass

    def unsubscribe(self, pv):
        pass


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
