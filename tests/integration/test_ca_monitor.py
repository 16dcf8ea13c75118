"""CAMonitor against a real softioc IOC (tests/integration/ioc.py) over loopback CA."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import threading
import time

import pytest

# The helper sets the CA client environment (conftest.py imported it first); it must come before `epics`.
from tests.integration.ioc import CA_PORT, SESSION_COUNT, DemoIOC, caget, caput

import epics  # noqa: E402
from epics import ca  # noqa: E402

from alarm_engine.ca_monitor import (  # noqa: E402
    CAMonitor,
    convert_value,
    mask_bits,
    status_name,
)
from alarm_engine.core.model import Connection, PVState, Severity  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

TEMP, PRESSURE, FLOW = "DEMO:TEMP", "DEMO:PRESSURE", "DEMO:FLOW"
MISSING = "DEMO:NO_SUCH_PV"
GRACE_S = 1.0
# libca re-searches a lost channel with back-off; without a CA repeater
# (none ships for Linux) reconnection after an IOC restart takes ~5-10 s.
RECONNECT_TIMEOUT_S = 40.0


class Recorder:
    """on_state sink: keeps every (name, state, thread id) and lets tests wait."""

    def __init__(self) -> None:
        self.events: list[tuple[str, PVState, int]] = []
        self.cond = threading.Condition()

    def __call__(self, name: str, state: PVState) -> None:
        with self.cond:
            self.events.append((name, state, threading.get_ident()))
            self.cond.notify_all()

    def mark(self) -> int:
        with self.cond:
            return len(self.events)

    def since(self, mark: int, name: str | None = None) -> list[PVState]:
        with self.cond:
            return [s for n, s, _ in self.events[mark:] if name is None or n == name]

    def wait_for(self, name: str, pred, mark: int = 0, timeout: float = 10.0) -> PVState:
        """The first state of `name` after `mark` that satisfies pred."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for n, s, _ in self.events[mark:]:
                    if n == name and pred(s):
                        return s
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [s for n, s, _ in self.events[mark:] if n == name]
                    raise AssertionError(f"no matching state for {name} within {timeout}s; "
                                         f"got {seen}")
                self.cond.wait(left)

    def wait_count(self, names: set[str], mark: int, timeout: float) -> None:
        """Until every name in `names` has a CONNECTED state after `mark`."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                seen = {n for n, s, _ in self.events[mark:]
                        if s.connection is Connection.CONNECTED}
                if names <= seen:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{len(names - seen)} PVs never reported CONNECTED, "
                                         f"e.g. {sorted(names - seen)[:5]}")
                self.cond.wait(left)


def connected(value=None):
    return lambda s: s.connection is Connection.CONNECTED and (value is None or s.value == value)


@pytest.fixture
def loop():
    """An event loop running in its own thread, as the Faust worker's would."""
    lp = asyncio.new_event_loop()
    thread = threading.Thread(target=lp.run_forever, name="test-loop", daemon=True)
    thread.start()
    lp.thread_ident = None

    def _ident():
        lp.thread_ident = threading.get_ident()

    lp.call_soon_threadsafe(_ident)
    yield lp
    lp.call_soon_threadsafe(lp.stop)
    thread.join(5)
    lp.close()


@pytest.fixture
def rec():
    return Recorder()


@pytest.fixture
def mon(loop, rec):
    m = CAMonitor(rec, loop, connect_grace_s=GRACE_S)
    yield m
    m.close()


def run_in_loop(loop, fn, *args):
    """Call fn on the loop's thread and return its result."""
    async def call():
        return fn(*args)
    return asyncio.run_coroutine_threadsafe(call(), loop).result(10)


def channel_cache_sizes() -> tuple[int, int, int]:
    """pyepics' channel bookkeeping: chid cache, per-context name cache, get_pv cache."""
    return (len(ca._chid_cache), sum(len(v) for v in ca._cache.values()),
            len(epics.pv._PVcache_))


def live_pv_objects() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, epics.PV))


# ---- pure helpers (no IOC) ---------------------------------------------------

def test_status_names_and_masks():
    assert [status_name(i) for i in (0, 3, 4, 5, 6, 11, 17, 21)] == [
        "NO_ALARM", "HIHI", "HIGH", "LOLO", "LOW", "HWLIMIT", "UDF", "WRITE_ACCESS"]
    assert status_name(99) == "UNKNOWN_99"
    assert mask_bits(frozenset()) == 1 | 4
    assert mask_bits({"VALUE", "ALARM", "LOG", "ATTRIBUTE"}) == 1 | 4 | 2 | 8
    assert mask_bits({"alarm"}) == 4
    with pytest.raises(ValueError):
        mask_bits({"PROPERTY"})


def test_convert_value_shapes():
    np = pytest.importorskip("numpy")
    arr = convert_value(np.arange(5000, dtype=np.int32))
    assert isinstance(arr, tuple) and len(arr) == 1000
    assert arr[:3] == (0.0, 1.0, 2.0) and all(type(v) is float for v in arr)
    assert convert_value(np.float64(2.5)) == 2.5 and type(convert_value(np.float64(2.5))) is float
    assert convert_value(7) == 7 and convert_value("on") == "on"
    assert convert_value(["a", "b"]) == ("a", "b")
    assert convert_value(np.frombuffer(b"hello\0junk", dtype=np.uint8), "X:MSG$") == "hello"


# ---- against the IOC ----------------------------------------------------------

def test_first_state_is_connected_with_value(running_ioc, mon, rec, loop):
    caput(TEMP, 20)
    before = int(time.time() * 1000)
    mon.subscribe(TEMP, frozenset())
    state = rec.wait_for(TEMP, lambda s: True, timeout=10)
    after = int(time.time() * 1000)
    assert state.connection is Connection.CONNECTED
    assert state.value == 20.0 and isinstance(state.value, float)
    assert state.severity is Severity.NO_ALARM
    assert state.status == "NO_ALARM"
    assert before <= state.received_ms <= after
    # The record was last processed by the caput above, on this machine.
    assert state.ioc_time_ms is not None and before - 60_000 <= state.ioc_time_ms <= after
    assert mon.subscribed() == {TEMP} and mon.count() == 1
    # Delivered in the event loop, not on a libca thread.
    assert {t for _, _, t in rec.events} == {loop.thread_ident}


def test_caput_drives_alarm_states(running_ioc, mon, rec):
    caput(TEMP, 20)
    mon.subscribe(TEMP, frozenset())
    rec.wait_for(TEMP, connected(20.0))

    for value, severity, status in [(90.0, Severity.MAJOR, "HIHI"),
                                    (60.0, Severity.MINOR, "HIGH"),
                                    (-5.0, Severity.MAJOR, "LOLO"),
                                    (20.0, Severity.NO_ALARM, "NO_ALARM")]:
        mark = rec.mark()
        caput(TEMP, value)
        state = rec.wait_for(TEMP, connected(value), mark)
        assert (state.severity, state.status) == (severity, status), value
    # The IOC agrees (checks the demo IOC itself, independent of pyepics).
    assert caget(TEMP) == (20.0, 0, 0)


def test_same_mask_is_noop_other_mask_resubscribes(running_ioc, mon, rec):
    caput(TEMP, 20)
    mon.subscribe(TEMP, frozenset())
    rec.wait_for(TEMP, connected(20.0))
    assert mon.wait_idle(10) and mon.channel_count() == 1

    mark = rec.mark()
    for _ in range(5):
        mon.subscribe(TEMP, frozenset({"VALUE", "ALARM"}))  # same bits as the default
        mon.subscribe(" DEMO:TEMP ", frozenset())
    time.sleep(0.5)
    assert rec.since(mark, TEMP) == []  # no new subscription, so no new initial event
    assert mon.wait_idle(10) and mon.count() == 1 and mon.channel_count() == 1

    # ALARM only: a resubscription (fresh initial event), then value-only
    # changes are not reported but alarm changes are.
    mark = rec.mark()
    mon.subscribe(TEMP, frozenset({"ALARM"}))
    assert mon.mask(TEMP) == frozenset({"ALARM"})
    rec.wait_for(TEMP, connected(20.0), mark)
    mark = rec.mark()
    caput(TEMP, 21)
    caput(TEMP, 55)
    state = rec.wait_for(TEMP, connected(55.0), mark)
    assert (state.severity, state.status) == (Severity.MINOR, "HIGH")
    assert [s.value for s in rec.since(mark, TEMP)] == [55.0]
    assert mon.wait_idle(10) and mon.count() == 1 and mon.channel_count() == 1
    caput(TEMP, 20)


def test_unsubscribe_stops_events(running_ioc, mon, rec):
    caput(TEMP, 20)
    caput(PRESSURE, 5)
    mon.subscribe(TEMP, frozenset())
    mon.subscribe(PRESSURE, frozenset())
    rec.wait_for(TEMP, connected(20.0))
    rec.wait_for(PRESSURE, connected(5.0))

    mon.unsubscribe(TEMP)
    mon.unsubscribe("DEMO:NOT_SUBSCRIBED")  # ignored
    assert mon.subscribed() == {PRESSURE}
    mark = rec.mark()
    caput(TEMP, 90)
    caput(PRESSURE, 9)  # control: the other PV still reports
    state = rec.wait_for(PRESSURE, connected(9.0), mark)
    assert (state.severity, state.status) == (Severity.MINOR, "HIGH")
    time.sleep(0.5)
    assert rec.since(mark, TEMP) == []
    caput(TEMP, 20)
    caput(PRESSURE, 5)


def test_event_queued_before_unsubscribe_is_dropped(running_ioc, mon, rec, loop):
    """A state already handed to the loop when unsubscribe() runs is not delivered."""
    caput(TEMP, 20)
    mon.subscribe(TEMP, frozenset())
    rec.wait_for(TEMP, connected(20.0))

    handed_over = []
    deliver = mon._deliver

    def spy(sub, state):
        handed_over.append(state)
        deliver(sub, state)

    mon._deliver = spy  # callbacks look the method up on the instance
    gate = threading.Event()
    loop.call_soon_threadsafe(gate.wait, 10)  # block the loop
    try:
        mark = rec.mark()
        caput(TEMP, 90)
        deadline = time.monotonic() + 10
        while not any(s.value == 90.0 for s in handed_over) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert any(s.value == 90.0 for s in handed_over), "monitor event never arrived"
        mon.unsubscribe(TEMP)  # while the event waits in the loop's queue
    finally:
        gate.set()
    run_in_loop(loop, lambda: None)  # drain the loop
    assert rec.since(mark, TEMP) == []
    caput(TEMP, 20)


def test_never_connected_after_grace(running_ioc, mon, rec):
    t0 = time.monotonic()
    mon.subscribe(MISSING, frozenset())
    mon.subscribe(FLOW, frozenset())
    state = rec.wait_for(MISSING, lambda s: True, timeout=GRACE_S + 5)
    elapsed = time.monotonic() - t0
    assert state == PVState(Connection.NEVER_CONNECTED, None, Severity.INVALID,
                            "NEVER_CONNECTED", None, state.received_ms)
    assert GRACE_S - 0.05 <= elapsed <= GRACE_S + 3, elapsed
    time.sleep(GRACE_S + 0.5)
    assert rec.since(0, MISSING) == [state]  # once
    # A PV that connected in time never gets NEVER_CONNECTED.
    assert [s.connection for s in rec.since(0, FLOW)] == [Connection.CONNECTED]


def test_never_connected_without_loop(running_ioc):
    """No loop: callbacks run on libca/helper threads; the clock is injectable."""
    rec = Recorder()
    mon = CAMonitor(rec, None, connect_grace_s=0.5, clock=lambda: 1234.5678)
    try:
        mon.subscribe(MISSING, frozenset())
        mon.subscribe(FLOW, frozenset())
        missing = rec.wait_for(MISSING, lambda s: True, timeout=5)
        flow = rec.wait_for(FLOW, connected(), timeout=5)
        assert missing.connection is Connection.NEVER_CONNECTED
        assert missing.received_ms == flow.received_ms == 1234567
        assert flow.value == 12.5
        time.sleep(1.0)
        assert len(rec.since(0, MISSING)) == 1
        assert threading.get_ident() not in {t for _, _, t in rec.events}
    finally:
        mon.close()
    assert mon.count() == 0
    with pytest.raises(RuntimeError):
        mon.subscribe(FLOW, frozenset())


def test_subscribe_from_the_loop_thread(running_ioc, mon, rec, loop):
    """Faust agents call subscribe() inside the loop; the timer path differs."""
    run_in_loop(loop, mon.subscribe, MISSING, frozenset())
    run_in_loop(loop, mon.subscribe, FLOW, frozenset())
    rec.wait_for(FLOW, connected(), timeout=10)
    state = rec.wait_for(MISSING, lambda s: True, timeout=GRACE_S + 5)
    assert state.connection is Connection.NEVER_CONNECTED
    run_in_loop(loop, mon.unsubscribe, MISSING)
    run_in_loop(loop, mon.clear)
    assert mon.count() == 0


def test_ioc_kill_and_restart(running_ioc, mon, rec):
    ioc = running_ioc
    caput(TEMP, 90)
    mon.subscribe(TEMP, frozenset())
    mon.subscribe(PRESSURE, frozenset())
    first = rec.wait_for(TEMP, connected(90.0))
    assert first.severity is Severity.MAJOR
    rec.wait_for(PRESSURE, connected())

    mark = rec.mark()
    ioc.kill()
    for name in (TEMP, PRESSURE):
        state = rec.wait_for(name, lambda s: s.connection is not Connection.CONNECTED, mark,
                             timeout=10)
        assert state == PVState(Connection.DISCONNECTED, None, Severity.INVALID,
                                "DISCONNECTED", None, state.received_ms)
    # While the IOC is down: a new subscription never connects in time.
    mon.subscribe(FLOW, frozenset())
    never = rec.wait_for(FLOW, lambda s: True, mark, timeout=GRACE_S + 5)
    assert never.connection is Connection.NEVER_CONNECTED

    mark = rec.mark()
    ioc.start()
    # The fresh IOC starts from its initial values: TEMP is back to 20, no alarm.
    temp = rec.wait_for(TEMP, connected(), mark, timeout=RECONNECT_TIMEOUT_S)
    assert (temp.value, temp.severity, temp.status) == (20.0, Severity.NO_ALARM, "NO_ALARM")
    rec.wait_for(PRESSURE, connected(5.0), mark, timeout=RECONNECT_TIMEOUT_S)
    rec.wait_for(FLOW, connected(12.5), mark, timeout=RECONNECT_TIMEOUT_S)
    assert all(s.connection is Connection.CONNECTED for s in rec.since(mark))
    # And the monitors still follow the new IOC.
    mark = rec.mark()
    caput(TEMP, 85)
    state = rec.wait_for(TEMP, connected(85.0), mark)
    assert (state.severity, state.status) == (Severity.MAJOR, "HIHI")
    caput(TEMP, 20)


def test_unsubscribe_keeps_channels_others_use(running_ioc, mon, rec):
    """A channel that epics.caget() also holds must survive our unsubscribe."""
    assert epics.caget(FLOW, timeout=10) == 12.5
    cached = [p for k, p in epics.pv._PVcache_.items() if k[0] == FLOW]
    assert len(cached) == 1
    mon.subscribe(FLOW, frozenset())
    rec.wait_for(FLOW, connected(12.5))
    mon.unsubscribe(FLOW)
    assert [p for k, p in epics.pv._PVcache_.items() if k[0] == FLOW] == cached
    assert cached[0].chid.value in ca._chid_cache
    assert epics.caget(FLOW, timeout=5) == 12.5


def test_subscribe_unsubscribe_cycles_release_everything(running_ioc, mon, rec):
    names = [f"DEMO:PV{i}" for i in range(SESSION_COUNT)]
    cycles = 10
    base_caches = channel_cache_sizes()
    base_pvs = live_pv_objects()
    base_threads = threading.active_count()
    base_fds = len(os.listdir("/proc/self/fd"))

    t0 = time.monotonic()
    for cycle in range(cycles):
        mark = rec.mark()
        for name in names:
            mon.subscribe(name, frozenset())
        assert mon.count() == len(names)
        # One libca channel per PV while subscribed (never two for one name).
        assert mon.wait_idle(30) and mon.channel_count() == len(names)
        rec.wait_count(set(names), mark, timeout=30)
        for name in names:
            mon.unsubscribe(name)
        assert mon.count() == 0 and mon.subscribed() == set()
        assert mon.wait_idle(30) and mon.channel_count() == 0, f"cycle {cycle}"
    elapsed = time.monotonic() - t0

    # Everything released: channels, threads, sockets; pyepics' own caches untouched.
    assert channel_cache_sizes() == base_caches
    assert live_pv_objects() == base_pvs
    assert threading.active_count() <= base_threads
    assert len(os.listdir("/proc/self/fd")) <= base_fds + 2
    # Nothing arrives for released PVs.
    mark = rec.mark()
    time.sleep(0.5)
    assert rec.since(mark) == []
    print(f"{cycles} x {len(names)} subscribe/unsubscribe cycles: {elapsed:.1f}s "
          f"(CA port {CA_PORT})")


def test_subscribe_then_unsubscribe_before_the_channel_thread_costs_nothing(running_ioc, mon, rec):
    """A wave of subscriptions withdrawn at once (a rebalance) never reaches libca twice."""
    names = [f"DEMO:PV{i}" for i in range(SESSION_COUNT)]
    assert mon.subscribe_many((n, frozenset()) for n in names) == names
    mon.unsubscribe_many(names)
    assert mon.wait_idle(30) and mon.channel_count() == 0 and mon.count() == 0
    time.sleep(0.5)
    assert rec.events == []
    # And subscribed again, every PV reports its value once connected.
    mark = rec.mark()
    mon.subscribe_many((n, frozenset()) for n in names)
    rec.wait_count(set(names), mark, timeout=30)
    assert {n: mon.last_state(n).value for n in names} == {n: rec.since(mark, n)[-1].value for n in names}
    assert mon.last_state("DEMO:NOT_SUBSCRIBED") is None


def test_a_failed_channel_thread_is_reported(running_ioc, loop, monkeypatch):
    """No channel could be made any more: the owner is told (the worker exits on it)."""
    import alarm_engine.ca_monitor as ca_monitor

    def broken():
        raise RuntimeError("no CA context")

    monkeypatch.setattr(ca_monitor, "_attach_context", broken)
    failed = threading.Event()
    seen = []
    mon = CAMonitor(Recorder(), loop, connect_grace_s=GRACE_S,
                    on_failure=lambda exc: (seen.append(exc), failed.set()))
    try:
        assert failed.wait(10)
        assert isinstance(seen[0], RuntimeError)
    finally:
        mon.close(timeout=1)


def test_value_shapes_from_the_ioc(running_ioc, mon, rec):
    """Each native type decoded from its DBR_TIME buffer as convert_value() makes
    pyepics' value of it (numeric arrays as tuples of float, '$' char arrays as str)."""
    from alarm_engine.demo_ioc import SHAPES

    running_ioc.kill()
    shapes = DemoIOC(count=0, extra_args=("--shapes",))
    try:
        shapes.start()
        for suffix in SHAPES:
            mon.subscribe("DEMO:" + suffix, frozenset())
        for suffix, expected in SHAPES.items():
            state = rec.wait_for("DEMO:" + suffix, connected(), timeout=20)
            assert state.value == expected and type(state.value) is type(expected), (suffix, state)
            if isinstance(expected, tuple):
                assert all(type(v) is float for v in state.value), suffix
            assert state.ioc_time_ms is not None and state.severity is Severity.NO_ALARM, state
            # pyepics reads the same value.
            pv = epics.PV("DEMO:" + suffix, form="time")
            assert convert_value(pv.get(timeout=10), "DEMO:" + suffix) == expected, suffix
            pv.disconnect()
    finally:
        shapes.stop()
        running_ioc.start()


def test_one_sweep_reports_many_never_connected(running_ioc, mon, rec, loop):
    """Hundreds of unconnected PVs, subscribed in waves: each reported once, in few sweeps."""
    first = [f"DEMO:MISSING_A{i}" for i in range(300)]
    later = [f"DEMO:MISSING_B{i}" for i in range(100)]
    dropped = first[:20]
    for name in first:
        mon.subscribe(name, frozenset())
    run_in_loop(loop, lambda: [mon.subscribe(n, frozenset()) for n in (FLOW, TEMP)])
    # On the loop, so no drain is under way meanwhile; normally long before their deadline.
    run_in_loop(loop, lambda: [mon.unsubscribe(n) for n in dropped])
    unsubscribed = rec.mark()
    expected = set(first) - set(dropped)
    wait_never_connected(rec, expected, timeout=GRACE_S + 30)
    # A new wave once the first is done: the sweep arms again.
    run_in_loop(loop, lambda: [mon.subscribe(n, frozenset()) for n in later[:50]])
    for name in later[50:]:
        mon.subscribe(name, frozenset())
    wait_never_connected(rec, set(later), timeout=GRACE_S + 30)

    time.sleep(GRACE_S + 0.5)

    def never_connected(events):
        return [(n, s) for n, s, _ in events if s.connection is Connection.NEVER_CONNECTED]

    never = never_connected(rec.events)
    names = [n for n, _ in never]
    early = {n for n, _ in never_connected(rec.events[:unsubscribed])} & set(dropped)
    # Each once, none for connected PVs nor after an unsubscribe.
    assert sorted(names) == sorted(expected | set(later) | early)
    assert not {n for n, _ in never_connected(rec.events[unsubscribed:])} & set(dropped)
    # Reported in subscription order, many per sweep (a sweep stamps them all alike).
    assert [n for n in names if n in expected] == [n for n in first if n in expected]
    assert len({s.received_ms for n, s in never if n in expected}) < len(expected) // 2
    assert [s.connection for s in rec.since(0, FLOW)] == [Connection.CONNECTED]
    assert [s.connection for s in rec.since(0, TEMP)] == [Connection.CONNECTED]
    assert {t for _, _, t in rec.events} == {loop.thread_ident}


def wait_never_connected(rec: Recorder, names: set[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with rec.cond:
        while True:
            seen = {n for n, s, _ in rec.events if s.connection is Connection.NEVER_CONNECTED}
            if names <= seen:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{len(names - seen)} PVs never reported NEVER_CONNECTED, "
                                     f"e.g. {sorted(names - seen)[:5]}")
            rec.cond.wait(left)


class BatchRecorder(Recorder):
    """on_states sink: keeps every batch and, flattened, every (name, state, thread id)."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[tuple[str, PVState]]] = []

    def __call__(self, batch) -> None:  # type: ignore[override]
        with self.cond:
            self.batches.append(list(batch))
            self.events.extend((n, s, threading.get_ident()) for n, s in batch)
            self.cond.notify_all()


def on_state_must_not_run(name, state):
    raise AssertionError(f"on_state called for {name} although on_states is given")


def test_on_states_gets_each_drain_as_one_batch_in_order(running_ioc, loop):
    brec = BatchRecorder()
    mon = CAMonitor(on_state_must_not_run, loop, connect_grace_s=GRACE_S, on_states=brec)
    try:
        caput(TEMP, 20)
        caput(PRESSURE, 5)
        for name in (TEMP, PRESSURE, MISSING):
            mon.subscribe(name, frozenset())
        brec.wait_for(TEMP, connected(20.0))
        brec.wait_for(PRESSURE, connected(5.0))
        assert brec.wait_for(MISSING, lambda s: True, timeout=GRACE_S + 5).connection \
            is Connection.NEVER_CONNECTED

        handed_over: list[tuple[str, PVState]] = []
        deliver = mon._deliver

        def spy(sub, state):
            deliver(sub, state)  # queued once this returns
            handed_over.append((sub.name, state))

        mon._deliver = spy
        blocked, gate = threading.Event(), threading.Event()
        loop.call_soon_threadsafe(lambda: (blocked.set(), gate.wait(20)))
        assert blocked.wait(10)
        batches_before = len(brec.batches)
        temps = [21.0, 55.0, 85.0, 30.0, 25.0]
        pressures = [2.1, 5.5, 8.5, 3.0, 2.5]
        try:
            for t, p in zip(temps, pressures):
                caput(TEMP, t)
                caput(PRESSURE, p)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not (
                    (TEMP, 25.0) in [(n, s.value) for n, s in handed_over]
                    and (PRESSURE, 2.5) in [(n, s.value) for n, s in handed_over]):
                time.sleep(0.01)
            # While the loop is blocked: PRESSURE's queued states must not be delivered.
            mon.unsubscribe(PRESSURE)
            queued = list(handed_over)
        finally:
            gate.set()
        run_in_loop(loop, lambda: None)
        assert [s.value for n, s in queued if n == TEMP][-1] == 25.0, queued
        assert [s.value for n, s in queued if n == PRESSURE][-1] == 2.5, queued

        # Everything queued while the loop was blocked came in one call, in order.
        new = brec.batches[batches_before:]
        assert new == [[(n, s) for n, s in queued if n == TEMP]]
        values = [s.value for _, s in new[0]]
        assert values == [v for v in temps if v in values]  # the IOC's order (CA may merge)
        assert [s.received_ms for _, s in new[0]] == sorted(s.received_ms for _, s in new[0])
        assert {t for _, _, t in brec.events} == {loop.thread_ident}
    finally:
        mon.close()


@pytest.mark.parametrize("callback", ["on_state", "on_states"])
def test_ioc_burst_delivers_every_pvs_last_value(running_ioc, loop, callback):
    """The IOC updates all numbered PVs as fast as it can: the last state of each is its value."""
    names = [f"DEMO:PV{i}" for i in range(SESSION_COUNT)]
    rec = BatchRecorder() if callback == "on_states" else Recorder()
    running_ioc.kill()
    burst = DemoIOC(count=SESSION_COUNT, extra_args=("--update-rate", "10000", "--update-paused"))
    mon = None
    try:
        burst.start()
        if callback == "on_states":
            mon = CAMonitor(on_state_must_not_run, loop, connect_grace_s=60, on_states=rec)
        else:
            mon = CAMonitor(rec, loop, connect_grace_s=60)
        for name in names:
            mon.subscribe(name, frozenset())
        rec.wait_count(set(names), 0, timeout=RECONNECT_TIMEOUT_S)

        mark = rec.mark()
        os.kill(burst.pid, signal.SIGUSR1)  # start updating
        deadline = time.monotonic() + 60
        while rec.mark() - mark < 30 * len(names) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(burst.pid, signal.SIGUSR1)  # pause
        assert rec.mark() - mark >= 30 * len(names), "the IOC burst did not arrive"
        # Until the IOC's last puts have arrived.
        count = rec.mark()
        while True:
            time.sleep(1.0)
            if rec.mark() == count:
                break
            count = rec.mark()

        final = {name: caget(name)[0] for name in names}
        last = {}
        for name, state, _ in rec.events[mark:]:
            last[name] = state
        assert {n: s.value for n, s in last.items()} == final
        assert all(s.connection is Connection.CONNECTED for s in last.values())
        if callback == "on_states":
            print(f"{rec.mark() - mark} states in {len(rec.batches)} batches")
    finally:
        if mon is not None:
            mon.close()
        burst.stop()
        running_ioc.start()
