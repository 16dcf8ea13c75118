"""Channel Access monitors for the CA bridge: libca channels -> PVState.

This is the I/O half of the bridge and knows nothing about Kafka.  A
`CAMonitor` owns one libca channel and one subscription per subscribed name
and turns every monitor event, connection loss and "never connected" timeout
into a `PVState` that is handed to `on_state(pv_name, state)`, or, with
`on_states` given, to `on_states([(pv_name, state), ...])` a batch at a time.

libca directly, not pyepics' PV objects: a PV object costs kilobytes and, per
event, a layer of Python bookkeeping (cast_args, _set_charval, callbacks by
keyword); creating one waits on ca_pend_event/ca_pend_io.  At 100,000 PVs that
was seconds of the event loop per (re)subscription wave and most of the
worker's memory.  pyepics (pinned in pyproject.toml) is still what loads libca
and creates the process's CA context; this module uses only its public `ca`
and `dbr` modules for that and for the DBR structure layouts, and calls libca
through its own ctypes handle, with its own argument types.

Threads:
- Channel work (ca_create_channel, ca_clear_channel) runs on one thread of
  this monitor, in the order subscribe()/unsubscribe() were called, with one
  ca_flush_io per batch; subscribe(), unsubscribe() and clear() only record
  what is wanted and return at once, from any thread.  A name subscribed and
  unsubscribed before the thread got to it costs nothing.  wait_idle() waits
  until the thread has caught up.
- libca calls back on its own threads (preemptive context): connection
  events create the subscription once the native type is known; monitor
  events are decoded from the DBR_TIME_* buffer there.  With an event loop
  given, states are queued and drained in that loop, in the order libca
  delivered them; only the first state queued after a drain wakes the loop
  (`call_soon_threadsafe`), so a burst of events costs one wake-up, and each
  drain hands its whole batch to `on_states` at once.  Without a loop, the
  callbacks run on the libca (or helper) thread, one state at a time, and
  must be quick and must not call subscribe/unsubscribe.
- A callback finds its subscription through an integer key (libca's user
  pointer), never through a Python object pointer: a late callback of a
  cleared channel finds nothing and is dropped.

"Never connected": every new channel gets a deadline `connect_grace_s`
after it is created.  One sweep timer (in the loop, or on a helper thread
without one) reports all PVs past their deadline and still unconnected in
one go, then waits for the next deadline, but at least SWEEP_INTERVAL_S
after a sweep that reported any; so a PV is reported once, between
connect_grace_s and connect_grace_s + SWEEP_INTERVAL_S after its channel was
created, and a timer per PV is never needed.

last_state(pv) is the latest state reported for a PV (kept, one per PV), so
the bridge can report a PV whose partition comes back to this worker without
a new subscription.

Environment: libca reads EPICS_CA_* once, when its context is created (at the
first channel), so set them before that, ideally before importing `epics`.
Loopback-only setups need EPICS_CA_ADDR_LIST=127.0.0.1[:port] and
EPICS_CA_AUTO_ADDR_LIST=NO.  pyepics ships its own libca (epics/clibs); no
EPICS base install is needed.  It cannot start caRepeater (there is none on
Linux in the wheel) and says so on stderr once; that only makes reconnection
after an IOC restart rely on libca's search back-off instead of beacons.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import functools
import heapq
import itertools
import logging
import struct
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


@functools.lru_cache(maxsize=256)
def _frozen_mask_bits(mask: frozenset[str]) -> int:
    return mask_bits(mask)


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



# ---- libca through ctypes ------------------------------------------------------

ECA_NORMAL = 1
OP_CONN_UP = 6
TIME_OFFSET = 14  # DBR_TIME_x = DBR_x + 14 for the native types 0..6
(T_STRING, T_SHORT, T_FLOAT, T_ENUM, T_CHAR, T_LONG, T_DOUBLE) = range(7)
_EPICS_EPOCH_OFFSET = 631152000  # EPICS epoch (1990) in POSIX seconds

# status, severity, stamp.secs, stamp.nsec: the head of every DBR_TIME_x.
_HEAD = struct.Struct("=hhII")
_ELEMENT = {T_STRING: ("40s", 40), T_SHORT: ("h", 2), T_FLOAT: ("f", 4), T_ENUM: ("H", 2),
            T_CHAR: ("B", 1), T_LONG: ("i", 4), T_DOUBLE: ("d", 8)}


class _EventArgs(ctypes.Structure):
    """struct event_handler_args (cadef.h); usr is the subscription's key."""
    _fields_ = [("usr", ctypes.c_void_p), ("chid", ctypes.c_void_p), ("type", ctypes.c_long),
                ("count", ctypes.c_long), ("dbr", ctypes.c_void_p), ("status", ctypes.c_int)]


class _ConnArgs(ctypes.Structure):
    """struct connection_handler_args (cadef.h)."""
    _fields_ = [("chid", ctypes.c_void_p), ("op", ctypes.c_long)]


_EVENT_CB = ctypes.CFUNCTYPE(None, _EventArgs)
_CONN_CB = ctypes.CFUNCTYPE(None, _ConnArgs)

_libca = None
_value_offsets: dict[int, int] = {}
_libca_lock = threading.Lock()
# Keys are unique in the process, so a callback can never find another monitor's PV.
_keys = itertools.count(1)
# Callback thunks libca may still call: kept for the life of the process.
_thunks: list = []


def _load_libca():
    """libca with this module's argument types, on pyepics' CA context.

    A handle of our own (same library, same context) so the types set here
    cannot change pyepics' calls and the other way round."""
    global _libca
    with _libca_lock:
        if _libca is not None:
            return _libca
        from epics import ca, dbr

        if ca.libca is None:
            ca.initialize_libca()  # loads libca and creates the process's CA context
        lib = ctypes.CDLL(ca.find_libca())
        lib.ca_create_channel.argtypes = [ctypes.c_char_p, _CONN_CB, ctypes.c_void_p,
                                          ctypes.c_uint, ctypes.POINTER(ctypes.c_void_p)]
        lib.ca_clear_channel.argtypes = [ctypes.c_void_p]
        lib.ca_create_subscription.argtypes = [ctypes.c_long, ctypes.c_ulong, ctypes.c_void_p,
                                               ctypes.c_long, _EVENT_CB, ctypes.c_void_p,
                                               ctypes.POINTER(ctypes.c_void_p)]
        lib.ca_clear_subscription.argtypes = [ctypes.c_void_p]
        lib.ca_puser.argtypes = [ctypes.c_void_p]
        lib.ca_puser.restype = ctypes.c_void_p
        lib.ca_field_type.argtypes = [ctypes.c_void_p]
        lib.ca_field_type.restype = ctypes.c_short
        lib.ca_element_count.argtypes = [ctypes.c_void_p]
        lib.ca_element_count.restype = ctypes.c_ulong
        lib.ca_flush_io.argtypes = []
        # Where the value starts in each DBR_TIME_x (pyepics' structures follow db_access.h).
        layouts = (dbr.time_string, dbr.time_short, dbr.time_float, dbr.time_enum,
                   dbr.time_char, dbr.time_long, dbr.time_double)
        for native, layout in enumerate(layouts):
            _value_offsets[native] = layout.value.offset
        _libca = lib
        return lib


def _attach_context() -> None:
    from epics import ca

    ca.use_initial_context()


def decode_time_dbr(ftype: int, count: int, raw: int, name: str, elements: int):
    """(value, severity, status, ioc_time_ms) of a DBR_TIME_x buffer at address `raw`.

    Values as convert_value() makes them: scalars int/float/str, arrays tuples of
    float (or str), capped at MAX_ARRAY_ELEMENTS; a char array named '...$' is a str."""
    native = ftype - TIME_OFFSET
    fmt, size = _ELEMENT[native]
    offset = _value_offsets[native]
    count = max(int(count), 1)
    long_string = native == T_CHAR and elements > 1 and name.endswith("$")
    n = count if long_string else min(count, MAX_ARRAY_ELEMENTS)
    buf = ctypes.string_at(raw, offset + n * size)
    status, severity, secs, nsec = _HEAD.unpack_from(buf)
    if native == T_STRING:
        texts = tuple(s.split(b"\0", 1)[0].decode("utf-8", "replace").rstrip()
                      for s in struct.unpack_from("=" + "40s" * n, buf, offset))
        value = texts[0] if elements <= 1 and n == 1 else texts
    elif long_string:
        value = buf[offset:].split(b"\0", 1)[0].decode("utf-8", "replace")
    elif count == 1 and not (native == T_CHAR and elements > 1):
        value = struct.unpack_from("=" + fmt, buf, offset)[0]
    else:
        value = tuple(float(v) for v in struct.unpack_from(f"={n}{fmt}", buf, offset))
    ioc_ms = None if secs == 0 and nsec == 0 else (secs + _EPICS_EPOCH_OFFSET) * 1000 + nsec // 1_000_000
    return value, severity, status, ioc_ms


class _Sub:
    """One subscription. `active` is the generation token: once it is False
    every callback that still arrives for it is dropped."""

    __slots__ = ("name", "mask", "bits", "key", "chid", "evid", "ftype", "elements",
                 "active", "connected", "ever_connected", "never_sent", "last")

    def __init__(self, name: str, mask: frozenset[str], bits: int) -> None:
        self.name = name
        self.mask = mask
        self.bits = bits
        self.key = next(_keys)
        self.chid: int | None = None  # libca channel, while it exists
        self.evid: ctypes.c_void_p | None = None  # libca subscription
        self.ftype = -1
        self.elements = 1
        self.active = True
        self.connected = False
        self.ever_connected = False
        self.never_sent = False
        self.last: PVState | None = None


_CREATE, _CLEAR = "create", "clear"


class CAMonitor:
    """Owns libca channels and subscriptions and reports PVState changes.

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
                 on_states: OnStates | None = None,
                 on_failure: Callable[[BaseException], None] | None = None) -> None:
        if on_state is None and on_states is None:
            raise TypeError("CAMonitor needs on_state or on_states")
        self._lib = _load_libca()
        # Called (on the channel thread) if that thread fails: no channel would be made
        # or cleared any more, and nothing would say so. The worker exits on it.
        self._on_failure = on_failure
        self._on_state = on_state
        self._on_states = on_states
        self._loop = loop
        self._grace = float(connect_grace_s)
        self._clock = clock
        self._subs: dict[str, _Sub] = {}  # wanted, by name
        self._by_key: dict[int, _Sub] = {}  # with a channel (or about to), by key
        # _lock guards _subs, _by_key and the per-_Sub flags; callbacks take only
        # this one, briefly, and no libca call is made while holding it:
        # ca_clear_channel waits for a callback in progress.
        self._lock = threading.RLock()
        # Channels created, not connected yet -> monotonic deadline.  One grace
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
        self._conn_cb = _CONN_CB(self._on_connection)
        self._event_cb = _EVENT_CB(self._on_event)
        _thunks.extend((self._conn_cb, self._event_cb))
        # Channel work for the thread, in order.
        self._ops: collections.deque[tuple[str, _Sub]] = collections.deque()
        self._ops_cond = threading.Condition()
        self._ops_busy = False
        self._ops_stop = False
        self._open_channels = 0
        self._thread = threading.Thread(target=self._run_ops, name="ca-channels", daemon=True)
        self._thread.start()

    # ---- public API -------------------------------------------------------

    def subscribe(self, pv: str, mask: frozenset[str] = frozenset()) -> bool:
        """Monitor `pv` with the mask symbols (VALUE, ALARM, LOG, ATTRIBUTE;
        empty = VALUE|ALARM).  Same mask again: no-op (False); other mask:
        resubscribe.  True when a new subscription (and so a first state) comes."""
        name = pv.strip()
        if not name:
            raise ValueError("empty PV name")
        bits = mask_bits(mask)
        with self._lock:
            if self._closed:
                raise RuntimeError("CAMonitor is closed")
            current = self._subs.get(name)
            if current is not None and current.bits == bits:
                return False
            ops = []
            if current is not None:
                self._detach_locked(current)
                ops.append((_CLEAR, current))
            sub = _Sub(name, frozenset(m.upper() for m in mask), bits)
            self._subs[name] = sub
            ops.append((_CREATE, sub))
        self._submit(ops)
        return True

    def subscribe_many(self, items: Iterable[tuple[str, frozenset[str]]]) -> list[str]:
        """subscribe() for many (pv, mask) at once; the names newly subscribed."""
        new = []
        ops = []
        with self._lock:
            if self._closed:
                raise RuntimeError("CAMonitor is closed")
            for pv, mask in items:
                name = pv.strip()
                if not name:
                    raise ValueError("empty PV name")
                # 100,000 PVs on a restart share a handful of masks.
                bits = _frozen_mask_bits(mask) if type(mask) is frozenset else mask_bits(mask)
                current = self._subs.get(name)
                if current is not None and current.bits == bits:
                    continue
                if current is not None:
                    self._detach_locked(current)
                    ops.append((_CLEAR, current))
                sub = _Sub(name, frozenset(m.upper() for m in mask), bits)
                self._subs[name] = sub
                ops.append((_CREATE, sub))
                new.append(name)
        self._submit(ops)
        return new

    def unsubscribe(self, pv: str) -> None:
        """Stop monitoring `pv` and release its channel; unknown names are ignored."""
        self.unsubscribe_many((pv,))

    def unsubscribe_many(self, pvs: Iterable[str]) -> None:
        ops = []
        with self._lock:
            for pv in pvs:
                sub = self._subs.get(pv.strip())
                if sub is not None:
                    self._detach_locked(sub)
                    ops.append((_CLEAR, sub))
        self._submit(ops)

    def clear(self) -> None:
        """Unsubscribe everything."""
        with self._lock:
            subs = list(self._subs.values())
            for sub in subs:
                self._detach_locked(sub)
        self._submit([(_CLEAR, sub) for sub in subs])

    def close(self, timeout: float = 60.0) -> None:
        """clear(), release every channel and stop the threads. Idempotent."""
        with self._lock:
            self._closed = True
        self.clear()
        with self._ops_cond:
            self._ops_stop = True
            self._ops_cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self._deadlines is not None:
            self._deadlines.stop()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Until every subscribe/unsubscribe so far reached libca (False on timeout)."""
        with self._ops_cond:
            return self._ops_cond.wait_for(lambda: not self._ops and not self._ops_busy, timeout)

    def subscribed(self) -> set[str]:
        with self._lock:
            return set(self._subs)

    def count(self) -> int:
        with self._lock:
            return len(self._subs)

    def channel_count(self) -> int:
        """libca channels this monitor holds now (subscriptions not yet made or
        already released by the channel thread differ from count())."""
        with self._lock:
            return self._open_channels

    def last_state(self, pv: str) -> PVState | None:
        """The latest state reported for `pv` (None: none yet, or not subscribed)."""
        with self._lock:
            sub = self._subs.get(pv.strip())
            return None if sub is None else sub.last

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

    # ---- the channel thread -------------------------------------------------

    def _detach_locked(self, sub: _Sub) -> None:
        sub.active = False
        if self._subs.get(sub.name) is sub:
            del self._subs[sub.name]
        self._waiting.pop(sub, None)

    def _submit(self, ops: list[tuple[str, _Sub]]) -> None:
        if not ops:
            return
        with self._ops_cond:
            self._ops.extend(ops)
            self._ops_cond.notify_all()

    def _run_ops(self) -> None:
        try:
            self._ops_loop()
        except BaseException as exc:
            log.critical("the CA channel thread failed: no CA channel is made or cleared any more",
                         exc_info=True)
            if self._on_failure is not None:
                self._on_failure(exc)

    def _ops_loop(self) -> None:
        _attach_context()
        lib = self._lib
        while True:
            with self._ops_cond:
                while not self._ops and not self._ops_stop:
                    self._ops_cond.wait()
                if not self._ops:
                    return
                batch = list(self._ops)
                self._ops.clear()
                self._ops_busy = True
            try:
                for op, sub in batch:
                    try:
                        if op is _CREATE:
                            self._create(sub)
                        else:
                            self._release(sub)
                    except Exception:
                        log.exception("CA channel %s of %s failed", op, sub.name)
                lib.ca_flush_io()
            finally:
                with self._ops_cond:
                    self._ops_busy = False
                    self._ops_cond.notify_all()

    def _create(self, sub: _Sub) -> None:
        with self._lock:
            if not sub.active:
                return  # unsubscribed before its channel was made
            self._by_key[sub.key] = sub
            self._waiting[sub] = time.monotonic() + self._grace
            if not self._sweep_armed:
                self._arm_sweep_locked(self._waiting[sub])
        chid = ctypes.c_void_p()
        # The connection callback may run before this returns: it finds the
        # subscription by its key (the user pointer), not by chid.
        status = self._lib.ca_create_channel(sub.name.encode(), self._conn_cb, sub.key, 0,
                                             ctypes.byref(chid))
        if status != ECA_NORMAL:
            # Left waiting: reported NEVER_CONNECTED after the grace, like any PV
            # no IOC serves.
            log.warning("CA cannot create a channel for %r (status %d)", sub.name, status)
            return
        with self._lock:
            sub.chid = chid.value
            self._open_channels += 1

    def _release(self, sub: _Sub) -> None:
        """Free the libca channel of a detached subscription (on the channel thread)."""
        with self._lock:
            self._by_key.pop(sub.key, None)
            chid, sub.chid = sub.chid, None
        if chid is None:
            return
        # Also clears its subscription; waits for a callback of it in progress.
        self._lib.ca_clear_channel(chid)
        sub.evid = None
        with self._lock:
            self._open_channels -= 1

    # ---- callbacks (libca threads) ------------------------------------------

    def _on_connection(self, args: _ConnArgs) -> None:
        try:
            chid = args.chid
            sub = self._by_key.get(self._lib.ca_puser(chid))
            if sub is None:
                return
            if args.op == OP_CONN_UP:
                self._connected(sub, chid)
                return
            with self._lock:
                if not sub.active:
                    return
                was_connected, sub.connected = sub.connected, False
            if was_connected:
                self._report(sub, PVState(Connection.DISCONNECTED, None, Severity.INVALID,
                                          "DISCONNECTED", None, self._now_ms()))
        except Exception:
            log.exception("CA connection callback failed")

    def _connected(self, sub: _Sub, chid: int) -> None:
        lib = self._lib
        ftype = lib.ca_field_type(chid)
        elements = lib.ca_element_count(chid)
        with self._lock:
            if not sub.active:
                return
            sub.connected = True
            sub.ever_connected = True
            self._waiting.pop(sub, None)
            sub.elements = elements
            if sub.evid is not None and sub.ftype == ftype:
                # libca keeps the subscription over a reconnection and sends the
                # value again as a monitor event.
                return
            old, sub.evid = sub.evid, None
        if old is not None:  # the IOC serves the name with another type now
            lib.ca_clear_subscription(old)
        if ftype not in _ELEMENT:
            self._no_subscription(sub, f"field type {ftype} has no DBR_TIME form")
            return
        evid = ctypes.c_void_p()
        # Count 0: the server's current element count on every event.
        status = lib.ca_create_subscription(ftype + TIME_OFFSET, 0, chid, sub.bits,
                                            self._event_cb, sub.key, ctypes.byref(evid))
        if status != ECA_NORMAL:
            self._no_subscription(sub, f"ca_create_subscription status {status}")
            return
        sub.ftype = ftype
        sub.evid = evid
        lib.ca_flush_io()

    def _no_subscription(self, sub: _Sub, why: str) -> None:
        """Connected, but no value will come: reported as DISCONNECTED (its alarm shows
        it) rather than left waiting for a first value, and logged with the reason."""
        log.warning("CA channel %s is connected but cannot be monitored (%s): reported as disconnected",
                    sub.name, why)
        with self._lock:
            sub.connected = False
        self._report(sub, PVState(Connection.DISCONNECTED, None, Severity.INVALID, "DISCONNECTED",
                                  None, self._now_ms()))

    def _on_event(self, args: _EventArgs) -> None:
        try:
            sub = self._by_key.get(args.usr)
            if sub is None or not sub.active or args.status != ECA_NORMAL:
                return
            received = self._now_ms()
            try:
                value, severity, status, ioc_ms = decode_time_dbr(
                    args.type, args.count, args.dbr, sub.name, sub.elements)
                state = PVState(Connection.CONNECTED, value, to_severity(severity),
                                status_name(status), ioc_ms, received)
            except Exception:
                log.exception("cannot decode a monitor event of %s", sub.name)
                return
            self._report(sub, state)
        except Exception:
            log.exception("CA event callback failed")

    def _report(self, sub: _Sub, state: PVState) -> None:
        sub.last = state
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
                for sub, state in expired:
                    sub.last = state
                self._dispatch(expired)
                return
            for sub, state in expired:
                sub.last = state
                self._deliver(sub, state)

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def __repr__(self) -> str:
        return f"<CAMonitor {self.count()} PVs>"
