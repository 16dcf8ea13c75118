"""The alarm-keyed processor's agent: definitions, shelvings, activations and the PV
inputs of rule alarms (alarm-inputs) -> engine.AlarmProcessor -> active-alarms,
with the timers of timed shelvings."""

from __future__ import annotations

from alarm_engine.engine import AlarmProcessor, Out
from alarm_engine.worker.app import alarm_keyed_in, alarm_state, app, codec, now_ms, settings
from alarm_engine.worker.batches import TableView, handle_batches, is_fence, send_all

_processor: AlarmProcessor | None = None
alarm_state_view = TableView(alarm_state)


def processor() -> AlarmProcessor:
    global _processor
    if _processor is None:
        _processor = AlarmProcessor(settings, codec(), alarm_state_view)
    return _processor



def _alarm_outputs(topic: str, key: str, value: bytes | None, msg) -> list[Out]:
    # Record time, not wall-clock time: a replay decides as the first pass did. The time of
    # handling only numbers a release (engine.AlarmProcessor.handle).
    ts = int(msg.timestamp * 1000) if msg.timestamp else now_ms()
    return processor().handle(topic, key, value, ts, now_ms())


@app.agent(alarm_keyed_in, concurrency=1)
async def alarm_agent(stream):
    """Definitions, shelving, activations and PV inputs -> active-alarms."""
    await handle_batches(stream, _alarm_outputs, (alarm_state_view,))


@alarm_state.on_recover
async def _rebuild_timers() -> None:
    processor().rebuild_deadlines((k.decode(), v) for k, v in alarm_state.items() if v and not is_fence(k))


@app.timer(interval=0.25)
async def _expire_shelving() -> None:
    """Ticks through alarm-inputs, so expiry is ordered with the alarm's other events."""
    if _processor is not None and _processor.deadlines:
        await send_all(_processor.due(now_ms()))


@app.on_partitions_revoked.connect
async def _drop_timers(sender, revoked, **kwargs) -> None:
    if _processor is not None and any(tp.topic == settings.topic("alarms") for tp in revoked):
        # Rebuilt from the table for the partitions kept, on recovery.
        _processor.deadlines.clear()
        _processor.forget()

