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


class Bridge:
    """Keeps the CA subscriptions equal to the monitored PVs of the partitions
    this worker owns: subscribe on assign, clear on revoke."""

    def __init__(self):
        self.monitor = None
        self.partition_of: dict[str, int] = {}
        self.pending: dict[str, list] = {}  # PV -> states not sent yet, in order
        self.sending: set[int] = set()  # partitions of the batch being sent
        # PV -> partition, subscribed and no state reported yet: its value is not known here.
        self.awaiting: dict[str, int] = {}
        self.synced: set[int] = set()  # partitions whose subscriptions follow the table
        self.wake = asyncio.Event()

    def _mon(self):
        if self.monitor is None:
            from alarm_engine.ca_monitor import CAMonitor

            self.monitor = CAMonitor(self.on_state, asyncio.get_running_loop(),
                                     connect_grace_s=settings.connect_grace_s)
        return self.monitor

    def on_state(self, pv: str, state) -> None:
        if pv not in self.partition_of:
            return  # late event of a PV just dropped
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
            outs = [Out("pv-state", pv.encode(), enc("pv-state", records.pv_state_datum(st)))
                    for pv, states in batch.items() for st in states]
            self.sending = {self.partition_of[pv] for pv in batch if pv in self.partition_of}
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

    def add(self, pv: str, mask, partition: int) -> None:
        if pv not in self.partition_of:
            self.awaiting[pv] = partition
        self.partition_of[pv] = partition
        self._mon().subscribe(pv, frozenset(mask))

    def remove(self, pv: str) -> None:
        self.partition_of.pop(pv, None)
        self.awaiting.pop(pv, None)
        if self.monitor is not None:
            self.monitor.unsubscribe(pv)

    def sync(self, wanted: dict[str, tuple[list, int]], partitions: set[int]) -> None:
        self.synced = set(partitions)
        for pv in set(self.partition_of) - set(wanted):
            self.remove(pv)
        for pv, (mask, partition) in wanted.items():
            self.add(pv, mask, partition)

    def revoke(self, partitions: set[int]) -> None:
        self.synced -= partitions
        for pv, p in list(self.partition_of.items()):
            if p in partitions:
                self.remove(pv)


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
