"""Channel Access monitors for the CA bridge: pyepics subscriptions -> PVState.

This is the I/O half of the bridge and knows nothing about Kafka.  A
`CAMonitor` owns one pyepics `PV` per subscribed name and turns every monitor
event, connection loss and "never connected" timeout into a `PVState` that is
handed to `on_state(pv_name, state)`, or, with `on_states` given, to
`on_states([(pv_name, state), ...])` a batch at a time.

Threads: pyepics (preemptive libca) calls back on libca's own threads.  With
an event loop given, states are queued and drained in that loop (e.g. the
Faust agent's), in the order libca delivered them; only the first state
queued after a drain wakes the loop (`call_soon_threadsafe`), so a burst of
events costs one wake-up, and each drain hands its whole batch to
`on_states` at once.  Without a loop, the callbacks run on the libca (or
helper) thread, one state at a time, and must be quick and must not call
subscribe/unsubscribe.  subscribe(), unsubscribe() and clear() may be called
from any thread (normally the loop's).

"Never connected": every new subscription gets a deadline `connect_grace_s`
ahead.  One sweep timer (in the loop, or on a helper thread without one)
reports all PVs past their deadline and still unconnected in one go, then
waits for the next deadline, but at least SWEEP_INTERVAL_S after a sweep
that reported any; so a PV is reported once, between connect_grace_s and
connect_grace_s + SWEEP_INTERVAL_S after subscribe(), and a timer per PV
is never needed.

Environment: libca reads EPICS_CA_* once, when its context is created (at the
first channel), so set them before that, ideally before importing `epics`.
Loopback-only setups need EPICS_CA_ADDR_LIST=127.0.0.1[:port] and
EPICS_CA_AUTO_ADDR_LIST=NO.  pyepics ships its own libca (epics/clibs); no
EPICS base install is needed.  It cannot start caRepeater (there is none on
Linux in the wheel) and says so on stderr once; that only makes reconnection
after an IOC restart rely on libca's search back-off instead of beacons.

Releasing channels: `PV.disconnect()` alone keeps the libca channel (and its
entry in `epics.ca._cache`) alive for reuse, so a subscribe/unsubscribe cycle
would leak one channel per new name.  unsubscribe() therefore also calls
`ca.clear_channel()` unless another PV object in the process (e.g. one that
`epics.caget` cached) still uses the same channel.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import logging
import threading
import time
from typing import Any, Callable, Iterable

from alarm_engine.core.model import Connection, PVState, Severity

log = logging.getLogger(__name__)

# Channel Access event mask bits (caeventmask.h); the values are fixed by the
# protocol, so they are spelled out here rather than importing epics early.
DBE_VALUE = 1
DBE_LOG = 2
DBE_ALARM = 4
DBE_PROPERTY = 8

MASK_BITS = {"VALUE": DBE_VALUE, "ALARM": DBE_ALARM, "LOG": DBE_LOG, "ATTRIBUTE": DBE_PROPERTY}
DEFAULT_MASK = frozenset({"VALUE", "ALARM"})

#: Longest array value passed on; monitors of big waveforms keep only the head.
MAX_ARRAY_ELEMENTS = 1000

#: menuAlarmStat names, indexed by the status number sent over CA.
ALARM_STATUS_NAMES = (
    "NO_ALARM", "READ", "WRITE", "HIHI", "HIGH", "LOLO", "LOW", "STATE", "COS",
    "COMM", "TIMEOUT", "HWLIMIT", "CALC", "SCAN", "LINK", "SOFT", "BAD_SUB",
    "UDF", "DISABLE", "SIMM", "READ_ACCESS", "WRITE_ACCESS",
)

# pyepics reports POSIX seconds; an IOC record that was never processed has
# the EPICS epoch (1990-01-01) as its time stamp, which means "no time".
_EPICS_EPOCH_POSIX = 631152000

#: Shortest time between two sweeps that reported NEVER_CONNECTED, so PVs
#: subscribed one after another are reported in a few batches, not one by one.
SWEEP_INTERVAL_S = 0.25

OnState = Callable[[str, PVState], None]
OnStates = Callable[[list[tuple[str, PVState]]], None]


def mask_bits(mask: Iterable[str]) -> int:
    """CA event mask for mask symbols; empty means VALUE|ALARM."""
    symbols = {str(m).upper() for m in mask} or DEFAULT_MASK
    unknown = symbols - MASK_BITS.keys()
    if unknown:
        raise ValueError(f"unknown monitor mask symbols {sorted(unknown)}; use {sorted(MASK_BITS)}")
    bits = 0
    for symbol in symbols:
        bits |= MASK_BITS[symbol]
    return bits


def status_name(status: Any) -> str:
    """menuAlarmStat name for a CA status number ('UNKNOWN_<n>' if out of range)."""
    if status is None:
        return "UDF"
    try:
        index = int(status)
    except (TypeError, ValueError):
        return str(status)
    if 0 <= index < len(ALARM_STATUS_NAMES):
        return ALARM_STATUS_NAMES[index]
    return f"UNKNOWN_{index}"


def to_severity(severity: Any) -> Severity:
    try:
        return Severity(int(severity))
    except (TypeError, ValueError):
        # A severity outside 0..3 cannot be trusted.
        return Severity.INVALID


def convert_value(value: Any, pvname: str = "") -> Any:
    """A pyepics monitor value as a plain, hashable Python value.

    Scalars stay int/float/str; numeric arrays become tuples of floats (capped
    at MAX_ARRAY_ELEMENTS); string arrays tuples of str; a char waveform whose
    name ends in '$' (the long-string convention) becomes str.
    """
    # Exact types: numpy scalars subclass float/int but must become plain ones.
    if value is None or type(value) in (int, float, str):
        return value
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        return value.item()
    for plain in (str, float, int):  # other subclasses (bool, IntEnum, ...)
        if isinstance(value, plain):
            return plain(value)
    if isinstance(value, bytes):
        return value.split(b"\0", 1)[0].decode("utf-8", "replace")
    if isinstance(value, (list, tuple)):
        return tuple(v if isinstance(v, str) else float(v) for v in value[:MAX_ARRAY_ELEMENTS])
    if getattr(value, "shape", None) is not None:  # numpy array
        if pvname.endswith("$") and value.dtype.kind in "iu" and value.dtype.itemsize == 1:
            return bytes(value.astype("uint8")).split(b"\0", 1)[0].decode("utf-8", "replace")
        return tuple(float(v) for v in value[:MAX_ARRAY_ELEMENTS].tolist())
    return value


def ioc_time_ms(posixseconds: Any, nanoseconds: Any) -> int | None:
    if posixseconds is None:
        return None
    secs, nsec = int(posixseconds), int(nanoseconds or 0)
    if secs <= _EPICS_EPOCH_POSIX and nsec == 0:
        return None
    return secs * 1000 + nsec // 1_000_000


class _Sub:
    """One subscription. `active` is the generation token: once it is False
    every callback that still arrives for this PV object is dropped."""

    __slots__ = ("name", "mask", "bits", "pv", "active", "connected", "ever_connected",
                 "never_sent")

    def __init__(self, name: str, mask: frozenset[str], bits: int) -> None:
        self.name = name
        self.mask = mask
        self.bits = bits
        self.pv: Any = None
        self.active = True
        self.connected = False
        self.ever_connected = False
        self.never_sent = False


class _Deadlines:
    """One daemon thread firing delayed calls, for use without an event loop
    (a threading.Timer per PV would mean a thread per unconnected PV)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._stopped = False
        self._thread: threading.Thread | None = None

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        with self._cond:
            if self._stopped:
                return
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._seq), fn))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ca-monitor-deadlines",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._heap.clear()
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (
                        not self._heap or self._heap[0][0] > time.monotonic()):
                    timeout = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cond.wait(timeout)
                if self._stopped:
                    return
                _, _, fn = heapq.heappop(self._heap)
            try:
                fn()
            except Exception:
                log.exception("deadline callback failed")


class CAMonitor:
    """Owns pyepics monitors and reports PVState changes.

    CAMonitor(on_state, loop, connect_grace_s=5.0, clock=time.time, on_states=None)

    `clock()` returns seconds since the epoch (like time.time); received_ms
    is int(clock() * 1000) at the moment libca delivered the event.

    With `on_states`, it gets every state instead of `on_state`: a list of
    (pv_name, state) in delivery order, once per drain of the loop's queue
    (without a loop, one state per call; a sweep's NEVER_CONNECTED all in
    one call).  States are never merged here; a batch may hold several
    states of one PV.  States of PVs unsubscribed before the batch is handed
    over are left out of it.
    """

    def __init__(self, on_state: OnState | None, loop: asyncio.AbstractEventLoop | None,
                 connect_grace_s: float = 5.0, clock: Callable[[], float] = time.time, *,
                 on_states: OnStates | None = None) -> None:
        # Imported here, not at module import, so importing this module does
        # not fix the CA environment before the caller has set it.
        import epics  # noqa: F401
        from epics import ca

        self._ca = ca
        self._pv_class = epics.PV
        self._pvcache = epics.pv._PVcache_
        if on_state is None and on_states is None:
            raise TypeError("CAMonitor needs on_state or on_states")
        self._on_state = on_state
        self._on_states = on_states
        self._loop = loop
        self._grace = float(connect_grace_s)
        self._clock = clock
        self._subs: dict[str, _Sub] = {}
        # _lock guards _subs and the per-_Sub flags; callbacks take only this
        # one, briefly.  _op_lock serializes the libca work of (un)subscribe
        # and is never taken by callbacks: ca_clear_subscription waits for a
        # callback in progress, so a callback waiting for a lock held by
        # an unsubscriber would deadlock.
        self._lock = threading.RLock()
        self._op_lock = threading.Lock()
        # Subscriptions not connected yet -> monotonic deadline.  One grace
        # for all, so insertion order is deadline order.  Under _lock.
        self._waiting: collections.OrderedDict[_Sub, float] = collections.OrderedDict()
        self._sweep_armed = False
        self._deadlines = _Deadlines() if loop is None else None
        # States waiting for the loop.  _queue_lock is a leaf lock: nothing
        # else is taken, and no libca call made, while holding it.
        self._queue: list[tuple[_Sub, PVState]] = []
        self._queue_lock = threading.Lock()
        self._drain_scheduled = False
        self._closed = False

    # ---- public API -------------------------------------------------------

    def subscribe(self, pv: str, mask: frozenset[str] = frozenset()) -> None:
        """Monitor `pv` with the mask symbols (VALUE, ALARM, LOG, ATTRIBUTE;
        empty = VALUE|ALARM).  Same mask again: no-op; other mask: resubscribe."""
        name = pv.strip()
        if not name:
            raise ValueError("empty PV name")
        bits = mask_bits(mask)
        with self._op_lock:
            if self._closed:
                raise RuntimeError("CAMonitor is closed")
            with self._lock:
                current = self._subs.get(name)
                if current is not None and current.bits == bits:
                    return
                if current is not None:
                    self._detach_locked(current)
            if current is not None:
                self._release(current)

            sub = _Sub(name, frozenset(m.upper() for m in mask), bits)
            with self._lock:
                # Registered before the PV exists: libca may call back (even
                # synchronously, for a channel that is already connected)
                # before the constructor returns.
                self._subs[name] = sub
                self._waiting[sub] = time.monotonic() + self._grace
                if not self._sweep_armed:
                    self._arm_sweep_locked(self._waiting[sub])
            try:
                sub.pv = self._pv_class(
                    name, form="time", auto_monitor=bits,
                    connection_callback=lambda pvname=None, conn=None, **kw: self._on_connection(sub, conn),
                    callback=lambda **kw: self._on_monitor(sub, kw),
                )
            except Exception:
                with self._lock:
                    self._detach_locked(sub)
                raise

    def unsubscribe(self, pv: str) -> None:
        """Stop monitoring `pv` and release its channel; unknown names are ignored."""
        name = pv.strip()
        with self._op_lock:
            with self._lock:
                sub = self._subs.get(name)
                if sub is None:
                    return
                self._detach_locked(sub)
            self._release(sub)

    def clear(self) -> None:
        """Unsubscribe everything."""
        with self._op_lock:
            with self._lock:
                subs = list(self._subs.values())
                for sub in subs:
                    self._detach_locked(sub)
            for sub in subs:
                self._release(sub)

    def close(self) -> None:
        """clear() and stop the helper thread (no-loop mode). Idempotent."""
        self.clear()
        with self._op_lock:
            self._closed = True
        if self._deadlines is not None:
            self._deadlines.stop()

    def subscribed(self) -> set[str]:
        with self._lock:
            return set(self._subs)

    def count(self) -> int:
        with self._lock:
            return len(self._subs)

    def connection_counts(self) -> dict[str, int]:
        """How many subscriptions are connected, disconnected (after a connection),
        and never connected yet: for the worker's heartbeat and metrics."""
        with self._lock:
            subs = list(self._subs.values())
        connected = sum(1 for s in subs if s.connected)
        lost = sum(1 for s in subs if not s.connected and s.ever_connected)
        return {"subscribed": len(subs), "connected": connected, "disconnected": lost,
                "never_connected": len(subs) - connected - lost}

    def mask(self, pv: str) -> frozenset[str] | None:
        """The mask symbols `pv` is subscribed with (None if not subscribed)."""
        with self._lock:
            sub = self._subs.get(pv.strip())
            return None if sub is None else (sub.mask or DEFAULT_MASK)

    # ---- teardown ---------------------------------------------------------

    def _detach_locked(self, sub: _Sub) -> None:
        sub.active = False
        if self._subs.get(sub.name) is sub:
            del self._subs[sub.name]
        self._waiting.pop(sub, None)

    def _release(self, sub: _Sub) -> None:
        """Free the libca resources of a detached subscription (caller holds _op_lock)."""
        pv, sub.pv = sub.pv, None
        if pv is None:
            return
        ca = self._ca
        chid = pv.chid
        # PV.disconnect() drops whatever epics.get_pv() cached under the same
        # (name, form, context) key, even if it is a different PV object (as
        # epics.caget/caput create).  Put that one back afterwards.
        pvid = (pv.pvname, pv.form, pv.context)
        cached = self._pvcache.get(pvid)
        try:
            # Threads other than the subscriber's may have no CA context yet.
            if ca.current_context() is None:
                ca.attach_context(pv.context)
            # Clears our callbacks, the subscription (libca waits for a
            # callback in progress) and our hooks in ca._cache.
            pv.disconnect()
            chid_int = getattr(chid, "value", chid)
            entry = ca._chid_cache.get(chid_int)
            # The channel is shared per name by every PV object in this
            # context; clear it only if no one else holds on to it.
            if entry is not None and not entry.callbacks and not entry.access_event_callback:
                ca.clear_channel(chid)
        except Exception:
            log.exception("releasing channel %s failed", sub.name)
        finally:
            # Drop the last reference now so PV.__del__ (another disconnect())
            # runs here, before the get_pv() entry is restored.
            del pv
            if cached is not None:
                self._pvcache.setdefault(pvid, cached)

    # ---- callbacks (libca threads) ------------------------------------------

    def _on_connection(self, sub: _Sub, conn: Any) -> None:
        with self._lock:
            if not sub.active:
                return
            if conn:
                sub.connected = True
                sub.ever_connected = True
                self._waiting.pop(sub, None)
                # The value follows as a monitor event (libca re-sends it on
                # every (re)connection), so nothing is emitted here.
                return
            was_connected, sub.connected = sub.connected, False
        if was_connected:
            self._deliver(sub, PVState(Connection.DISCONNECTED, None, Severity.INVALID,
                                       "DISCONNECTED", None, self._now_ms()))

    def _on_monitor(self, sub: _Sub, kw: dict) -> None:
        if not sub.active:
            return
        received = self._now_ms()
        try:
            state = PVState(
                Connection.CONNECTED,
                convert_value(kw.get("value"), sub.name),
                to_severity(kw.get("severity")),
                status_name(kw.get("status")),
                ioc_time_ms(kw.get("posixseconds"), kw.get("nanoseconds")),
                received,
            )
        except Exception:
            log.exception("cannot convert monitor event of %s", sub.name)
            return
        self._deliver(sub, state)

    def _deliver(self, sub: _Sub, state: PVState) -> None:
        if self._loop is None:
            self._dispatch([(sub, state)])
            return
        with self._queue_lock:
            self._queue.append((sub, state))
            if self._drain_scheduled:
                return
            self._drain_scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # loop closed: nobody left to tell
            with self._queue_lock:
                self._queue.clear()
                self._drain_scheduled = False

    def _drain(self) -> None:
        # The flag drops with the swap: a state queued from now on schedules
        # the next drain, which runs after this one, so order is kept.
        with self._queue_lock:
            batch, self._queue = self._queue, []
            self._drain_scheduled = False
        self._dispatch(batch)

    def _dispatch(self, batch: list[tuple[_Sub, PVState]]) -> None:
        # `active` is checked again here: a state may have been queued before
        # an unsubscribe that ran first.
        if self._on_states is not None:
            states = [(sub.name, state) for sub, state in batch if sub.active]
            if states:
                try:
                    self._on_states(states)
                except Exception:
                    log.exception("on_states failed for %d states", len(states))
            return
        for sub, state in batch:
            if not sub.active:
                continue
            try:
                self._on_state(sub.name, state)
            except Exception:
                log.exception("on_state failed for %s", sub.name)

    # ---- never-connected sweep ---------------------------------------------

    def _arm_sweep_locked(self, when: float) -> None:
        """Have _sweep run at monotonic time `when` (caller holds _lock)."""
        self._sweep_armed = True
        if self._loop is None:
            assert self._deadlines is not None
            self._deadlines.call_later(max(0.0, when - time.monotonic()), self._sweep)
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._start_sweep_timer(when)
        else:  # loop.call_later is not thread-safe
            try:
                self._loop.call_soon_threadsafe(self._start_sweep_timer, when)
            except RuntimeError:  # loop closed: no one to report to
                self._sweep_armed = False

    def _start_sweep_timer(self, when: float) -> None:
        self._loop.call_later(max(0.0, when - time.monotonic()), self._sweep)

    def _sweep(self) -> None:
        # The check and the hand-over (queueing, or in no-loop mode the
        # delivery) happen under _lock so a connection racing with the sweep
        # cannot be reported before it.
        with self._lock:
            self._sweep_armed = False
            now = time.monotonic()
            state = PVState(Connection.NEVER_CONNECTED, None, Severity.INVALID,
                            "NEVER_CONNECTED", None, self._now_ms())
            expired: list[tuple[_Sub, PVState]] = []
            waiting = self._waiting
            while waiting:
                sub, deadline = next(iter(waiting.items()))
                if deadline > now:
                    break
                waiting.popitem(last=False)
                if sub.active and not sub.ever_connected and not sub.never_sent:
                    sub.never_sent = True
                    expired.append((sub, state))
            if waiting:
                when = next(iter(waiting.values()))
                if expired:
                    when = max(when, now + SWEEP_INTERVAL_S)
                self._arm_sweep_locked(when)
            if not expired:
                return
            if self._loop is None:
                self._dispatch(expired)
                return
            for sub, state in expired:
                self._deliver(sub, state)

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def __repr__(self) -> str:
        return f"<CAMonitor {self.count()} PVs>"
