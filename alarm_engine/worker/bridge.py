"""The CA bridge: the CA subscriptions follow the monitored PVs of the partitions this
worker owns (monitored-pvs is read by a Faust agent into the `monitored` table), and
every monitor event becomes a pv-state record, sent in batches from one task."""

from __future__ import annotations

import asyncio
import logging

from alarm_engine import records
from alarm_engine.engine import Out
from alarm_engine.worker.app import app, codec, monitored, monitored_in, settings
from alarm_engine.worker.batches import TableView, handle_batches, is_fence
from alarm_engine.worker.exits import EXIT_CRASHED, fatal
from alarm_engine.worker.hotpath import hot

log = logging.getLogger("alarm_engine")

monitored_view = TableView(monitored)


#: How long a revoked partition's CA channels are kept when no assignment follows:
#: a rebalance revokes everything and usually gives most of it back seconds later.
PARK_GRACE_S = 120.0


class Bridge:
    """Keeps the CA subscriptions equal to the monitored PVs of the partitions
    this worker owns.

    On a revoke the partition's channels are parked, not cleared: its PVs stop
    reporting (their states are not this worker's to send) but stay subscribed.
    The assignment that follows (sync) keeps the parked PVs it gives back,
    reporting each one's latest state as a new subscription's first event would,
    and clears the rest; PARK_GRACE_S after a revoke with no assignment, the
    parked channels are cleared anyway. So a rebalance that moves nothing costs
    no CA work, and one that moves a partition costs only that partition's."""

    def __init__(self):
        self.monitor = None
        self.partition_of: dict[str, int] = {}  # owned PV -> partition
        self.pending: dict[str, list] = {}  # PV -> states not sent yet, in order
        self.sending: set[int] = set()  # partitions of the batch being sent
        # PV -> partition, subscribed and no state reported yet: its value is not known here.
        self.awaiting: dict[str, int] = {}
        self.synced: set[int] = set()  # partitions whose subscriptions follow the table
        # PV -> (partition, revoke number): revoked, still subscribed.
        self.parked: dict[str, tuple[int, int]] = {}
        self._revokes = 0
        self.wake = asyncio.Event()

    def _mon(self):
        if self.monitor is None:
            from alarm_engine.ca_monitor import CAMonitor

            self.monitor = CAMonitor(self.on_state, asyncio.get_running_loop(),
                                     connect_grace_s=settings.connect_grace_s,
                                     on_failure=lambda exc: fatal(
                                         "the CA bridge's channel thread failed (%s): exiting so that the "
                                         "worker restarts", exc, code=EXIT_CRASHED))
        return self.monitor

    def on_state(self, pv: str, state) -> None:
        if pv not in self.partition_of:
            return  # late event of a PV just dropped, or parked
        self.awaiting.pop(pv, None)
        queued = self.pending.setdefault(pv, [])
        # Only an exact repeat (timestamps aside) is merged: a rule can read any value.
        if queued and _same(queued[-1], state):
            queued[-1] = state
        else:
            queued.append(state)
        self.wake.set()

    async def send_loop(self) -> None:
        """All pv-state records from one task, a batch per wait: in a burst (20,000
        first values) one task per event would wake thousands of them on every drain."""
        while True:
            await self.wake.wait()
            self.wake.clear()
            if hot.producer is None:
                await asyncio.sleep(0.05)
                self.wake.set()
                continue
            batch, self.pending = self.pending, {}
            enc = codec().encode
            owned = self.partition_of
            outs = [Out("pv-state", pv.encode(), enc("pv-state", records.pv_state_datum(st)))
                    for pv, states in batch.items() if pv in owned for st in states]
            self.sending = {owned[pv] for pv in batch if pv in owned}
            try:
                await hot.send(outs)
            finally:
                self.sending = set()

    def held(self, partitions: set[int]) -> set[int]:
        """Of these partitions, those whose PVs' news may still be on its way: states held
        here or being sent, a PV subscribed whose first state has not come (bounded by
        the connect grace), subscriptions not yet made after an assignment (a change
        during a rebalance is only seen once resubscribed). Their alarms' timers wait
        (deadlines.py)."""
        held = self.sending | set(self.awaiting.values()) | (set(partitions) - self.synced)
        return held | {self.partition_of[pv] for pv in self.pending if pv in self.partition_of}

    def _own(self, pv: str, partition: int, fresh: bool) -> None:
        """pv is this worker's now; `fresh`: a new subscription, whose first state will come."""
        adopted = pv not in self.partition_of
        self.parked.pop(pv, None)
        self.partition_of[pv] = partition
        if fresh:
            self.awaiting[pv] = partition
        elif adopted:
            # Subscribed all along (parked): report what it shows now.
            last = self.monitor.last_state(pv)
            if last is None:
                self.awaiting[pv] = partition
            else:
                self.on_state(pv, last)

    def add(self, pv: str, mask, partition: int) -> None:
        fresh = self._mon().subscribe(pv, frozenset(mask))
        self._own(pv, partition, fresh)

    def remove(self, pv: str) -> None:
        self.remove_many((pv,))

    def remove_many(self, pvs) -> None:
        pvs = list(pvs)
        for pv in pvs:
            self.partition_of.pop(pv, None)
            self.awaiting.pop(pv, None)
            self.parked.pop(pv, None)
            self.pending.pop(pv, None)
        if self.monitor is not None:
            self.monitor.unsubscribe_many(pvs)

    def sync(self, wanted: dict[str, tuple[list, int]], partitions: set[int]) -> None:
        """The subscriptions become exactly `wanted` (PV -> (mask, partition)), the
        monitored PVs of the assigned `partitions`; parked PVs not wanted are cleared."""
        self.synced = set(partitions)
        self.remove_many([pv for pv in (*self.partition_of, *self.parked) if pv not in wanted])
        fresh = set(self._mon().subscribe_many((pv, frozenset(mask)) for pv, (mask, _) in wanted.items()))
        for pv, (_, partition) in wanted.items():
            self._own(pv, partition, pv in fresh)

    def revoke(self, partitions: set[int]) -> None:
        self.synced -= partitions
        self._revokes += 1
        for pv, p in list(self.partition_of.items()):
            if p in partitions:
                del self.partition_of[pv]
                self.awaiting.pop(pv, None)
                self.pending.pop(pv, None)  # not this worker's to send any more
                self.parked[pv] = (p, self._revokes)
        if self.parked:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (unit tests): expire_parked is called by hand
                return
            loop.call_later(PARK_GRACE_S, self.expire_parked, self._revokes)

    def expire_parked(self, revoke: int) -> None:
        """Clear the channels parked by revoke number `revoke` and not wanted since."""
        self.remove_many([pv for pv, (_, n) in self.parked.items() if n <= revoke])


def _same(a, b) -> bool:
    return (a.connection, a.value, a.severity, a.status) == (b.connection, b.value, b.severity, b.status)


bridge = Bridge()
hot.held = bridge.held


@app.task
async def _bridge_sender() -> None:
    try:
        await bridge.send_loop()
    except asyncio.CancelledError:
        raise
    except BaseException:
        fatal("the CA bridge's sender failed: exiting so that the worker restarts", code=EXIT_CRASHED, exc_info=True)


def _monitored_outputs(topic: str, pv: str, value: bytes | None, msg) -> list[Out]:
    datum = codec().decode("monitored-pvs", value)
    if datum is None:
        del monitored_view[pv]
        bridge.remove(pv)
        return [Out("pv-state", msg.key, None)]
    mask = sorted(records.monitor_mask(datum))
    monitored_view[pv] = {"mask": mask, "partition": msg.partition}
    bridge.add(pv, mask, msg.partition)
    return []


@app.agent(monitored_in, concurrency=1)
async def monitored_agent(stream):
    """monitored-pvs -> CA subscriptions; removal also clears the PV's state."""
    await handle_batches(stream, _monitored_outputs, (monitored_view,))


@monitored.on_recover
async def _resubscribe() -> None:
    actives = {tp.partition for tp in app.assignor.assigned_actives()
               if tp.topic == settings.topic("monitored-pvs")}
    wanted = {k.decode(): (v["mask"], v["partition"]) for k, v in monitored.items()
              if v and not is_fence(k) and v["partition"] in actives}
    bridge.sync(wanted, actives)
    log.info("CA bridge: %d PV(s) subscribed for partitions %s", len(wanted), sorted(actives))


@app.on_partitions_revoked.connect
async def _on_revoked(sender, revoked, **kwargs) -> None:
    gone = {tp.partition for tp in revoked if tp.topic == settings.topic("monitored-pvs")}
    if gone:
        bridge.revoke(gone)
