"""The engine's alarm-keyed record handling, free of Faust: tables are plain mappings.

`AlarmProcessor` (partitioned by alarm) keeps each alarm's definition, shelving
and activation. Rule and external alarms are evaluated here: stepped with every
control record, PV input (`alarm-inputs`, from the PVs' homes) and timer tick,
publishing `active-alarms` when what is shown changes, and telling the PVs'
homes which alarms read them (`alarm-deps`, keyed by PV). A per-PV alarm is
evaluated at its PV's home (pv_home.py), in one hop from pv-state; this side
forwards its control records there, and hands it over when it moves
(see `AlarmProcessor.handle`).

Processors return the records to send instead of sending them, so they are
tested with dicts; the worker package only moves bytes. Time is each record's
timestamp, so replaying the same records gives the same results.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from typing import MutableMapping, NamedTuple

from alarm_engine import internal_records, records
from alarm_engine.codec import BadRecord, Codec
from alarm_engine.config import Settings
from alarm_engine.core import (
    Activation,
    ActivationSet,
    AlarmDef,
    AlarmState,
    DefinitionSet,
    PVUpdate,
    Severity,
    Shelving,
    ShelvingSet,
    Shown,
    Tick,
    apply_control,
    next_deadline,
    step,
    with_input,
)

log = logging.getLogger(__name__)


class Out(NamedTuple):
    """A record to send: logical topic, key, encoded value (None: tombstone).

    `handover`: the record hands the writing of an alarm's active-alarms record to
    another place. Kafka keeps order within a partition only, so it is sent after
    everything sent before it has been acknowledged (the shell sends a batch's
    handovers last, in a second round): the old writer's last record is never
    overtaken by the new writer's first."""

    topic: str
    key: bytes
    value: bytes | None
    handover: bool = False


def in_send_order(outs: list[Out]) -> list[list[Out]]:
    """The rounds to send `outs` in, each acknowledged before the next starts: a new
    round before each handover. The order of `outs` is kept (within a round the
    producer keeps it per partition)."""
    rounds: list[list[Out]] = [[]]
    for o in outs:
        if o.handover and rounds[-1]:
            rounds.append([])
        rounds[-1].append(o)
    return [r for r in rounds if r]


def _json(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


# --- the alarm state in a table, as JSON ------------------------------------

def _def_to_json(d: AlarmDef | None):
    if d is None:
        return None
    return [d.name, d.kind, d.pv, d.expression, d.priority, int(d.rule_severity), d.location,
            d.category, d.doc_url, d.edm_path, d.description]


@lru_cache(maxsize=65536)
def _def_from_tuple(t: tuple) -> AlarmDef:
    # Cached: parsing a rule for every event would dominate the hot path.
    name, kind, pv, expression, priority, sev, *meta = t
    return AlarmDef(name, kind, pv, expression, priority, Severity(sev), *meta)


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def asdict(obj) -> dict:
    """A flat dataclass (Shelving, Activation, Shown) as a dict: `dataclasses.asdict`
    without its recursive deep copy, which dominated the encoding of a state."""
    names = _FIELD_NAMES.get(type(obj))
    if names is None:
        names = _FIELD_NAMES[type(obj)] = tuple(f.name for f in fields(obj))
    return {n: getattr(obj, n) for n in names}


def state_to_json(s: AlarmState, inputs: bool = True) -> dict:
    """`inputs=False`: without the PV inputs (kept elsewhere by the caller)."""
    return {
        "def": _def_to_json(s.definition),
        "inputs": {pv: records.pv_state_datum(st) for pv, st in s.inputs.items()} if inputs else None,
        "shelving": asdict(s.shelving) if s.shelving else None,
        "consumed": s.shelving_consumed,
        "activation": asdict(s.activation) if s.activation else None,
        "first_seen": s.first_seen_ms,
        "since": s.active_since_ms,
        "shown": {**asdict(s.shown), "severity": int(s.shown.severity)} if s.shown else None,
        # Kept beside the state so that timers are rebuilt without decoding every alarm.
        "deadline": next_deadline(s),
    }


def state_from_json(j: dict | None) -> AlarmState:
    if j is None:
        return AlarmState()
    shown = j["shown"]
    return AlarmState(
        definition=_def_from_tuple(tuple(j["def"])) if j["def"] else None,
        inputs={pv: records.pv_state(d) for pv, d in j["inputs"].items()},
        shelving=Shelving(**j["shelving"]) if j["shelving"] else None,
        shelving_consumed=j["consumed"],
        activation=Activation(**j["activation"]) if j["activation"] else None,
        first_seen_ms=j["first_seen"],
        active_since_ms=j["since"],
        shown=Shown(**{**shown, "severity": Severity(shown["severity"])}) if shown else None,
    )


def is_empty(s: AlarmState) -> bool:
    return s == AlarmState()


def at_pv_home(d: AlarmDef | None) -> bool:
    """A per-PV alarm is evaluated at its PV's home (pv_home.py), in one hop."""
    return d is not None and d.kind == "pv"


def control_fields(s: AlarmState) -> dict:
    return {"def": _def_to_json(s.definition),
            "shelving": asdict(s.shelving) if s.shelving else None,
            "activation": asdict(s.activation) if s.activation else None}


def control_changed(old: AlarmState, new: AlarmState) -> bool:
    return (old.definition, old.shelving, old.activation) != (new.definition, new.shelving, new.activation)


# --- the processors ---------------------------------------------------------

@dataclass(frozen=True)
class Released:
    """A PV's home has stopped evaluating the alarm (it moved away, or was deleted):
    its answer to the release numbered `move`."""

    pv: str
    move: int


def _control_out(alarm: str, st: AlarmState, ts_ms: int) -> Out:
    """A per-PV alarm's operator records, for its PV's home, as of `ts_ms`."""
    return Out("alarm-deps", st.definition.pv.encode(),
               _json({"alarm": alarm, "control": control_fields(st), "ts": ts_ms}))


class AlarmProcessor:
    """Handles the records keyed by alarm name."""

    def __init__(self, settings: Settings, codec: Codec, table: MutableMapping[str, dict]):
        self.settings = settings
        self.codec = codec
        self.table = table
        self.deadlines: dict[str, int] = {}  # alarm -> when to tick (this worker's alarms)

    def event_for(self, topic: str, key: str, value: bytes | None, ts_ms: int):
        """Decode and validate one input record into a core event."""
        if topic == "alarm-inputs":
            msg = internal_records.alarm_input(value)
            if "tick" in msg:
                return Tick()
            if "released" in msg:
                return Released(msg["released"], msg["move"])
            state = records.pv_state(msg["state"]) if msg["state"] is not None else None
            return PVUpdate(msg["pv"], state)
        datum = self.codec.decode(topic, value)
        if topic == "alarms":
            return DefinitionSet(None if datum is None else records.alarm_def(key, datum, self.settings))
        if topic == "shelved-alarms":
            return ShelvingSet(None if datum is None else records.shelving(key, datum, ts_ms))
        if topic == "alarm-activations":
            return ActivationSet(None if datum is None else records.activation(datum))
        raise BadRecord(f"{topic} is not an alarm input")

    def handle(self, topic: str, key: str, value: bytes | None, ts_ms: int) -> list[Out]:
        """Where an alarm is evaluated: here (rule and external alarms), at its PV's home
        (per-PV alarms: this side keeps and forwards their operator records), or nowhere
        while it moves away from a PV's home (`releasing`): a new place publishes only once
        the old home has confirmed that it has stopped, so that two writers never race on
        the alarm's active-alarms record."""
        event = self.event_for(topic, key, value, ts_ms)
        raw = self.table.get(key)
        old = state_from_json(raw)
        releasing = raw.get("releasing") if raw else None
        move = raw.get("move", 0) if raw else 0
        out: list[Out] = []
        if isinstance(event, Released):
            if event.pv != releasing or event.move != move:
                return []  # a copy sent again on a replay: the move it answers is over
            new, releasing = self._arrive(key, old, ts_ms, out), None
        elif releasing is not None or at_pv_home(old.definition):
            if isinstance(event, PVUpdate) and releasing is not None and not at_pv_home(old.definition):
                # Evaluated here once released: the state of a PV it now reads (the
                # answer to its `uses`, which may overtake the release) is kept for then.
                new = with_input(old, event)
            elif isinstance(event, (PVUpdate, Tick)):
                return []  # meant for the alarm before it moved to its PV's home: not evaluated here
            else:
                new = apply_control(old, event, ts_ms)
            if releasing is None:  # at its PV's home until now
                pv = old.definition.pv
                if at_pv_home(new.definition) and new.definition.pv == pv:
                    if control_changed(old, new):
                        out.append(_control_out(key, new, ts_ms))
                else:
                    # Numbered, so that a stale answer to an earlier release (sent again
                    # by a replay at the home) is not taken for the answer to this one.
                    move = max(ts_ms, move + 1)
                    out.append(Out("alarm-deps", pv.encode(),
                                   _json({"alarm": key, "control": None, "ts": ts_ms, "move": move})))
                    releasing = pv
        elif isinstance(event, DefinitionSet) and at_pv_home(event.definition):
            new = self._arrive(key, apply_control(old, event, ts_ms), ts_ms, out)
        else:
            new = step(old, event, ts_ms)
            if new.shown != old.shown:
                out.append(self._shown_out(key, new))
        if isinstance(event, DefinitionSet):
            out[:0] = self._dependency_changes(key, old.definition, new.definition)
        if new != old or releasing != (raw or {}).get("releasing") or move != (raw or {}).get("move", 0):
            if is_empty(new) and releasing is None:
                if raw is not None:
                    del self.table[key]
            else:
                self.table[key] = {**state_to_json(new), "releasing": releasing, "move": move}
        deadline = next_deadline(new)
        if deadline is None:
            self.deadlines.pop(key, None)
        else:
            self.deadlines[key] = deadline
        return out

    def _shown_out(self, key: str, st: AlarmState) -> Out:
        return Out("active-alarms", key.encode(), self.codec.encode("active-alarms", records.shown_datum(st.shown)))

    def _arrive(self, key: str, st: AlarmState, ts_ms: int, out: list[Out]) -> AlarmState:
        """From now on the alarm is evaluated where its definition says; that place
        publishes what it shows at once, even nothing, over whatever was shown before."""
        if at_pv_home(st.definition):
            out.append(_control_out(key, st, ts_ms)._replace(handover=True))
            # Evaluated at the home: nothing of its own shown state is kept here.
            return replace(st, inputs={}, shown=None, active_since_ms=None, shelving_consumed=False)
        st = step(st, Tick(), ts_ms)
        out.append(self._shown_out(key, st))
        return st

    @staticmethod
    def _dependency_changes(alarm: str, old: AlarmDef | None, new: AlarmDef | None) -> list[Out]:
        # Rule alarms only: a per-PV alarm's home learns of it from its control record.
        before = old.pvs() if old and not at_pv_home(old) else frozenset()
        after = new.pvs() if new and not at_pv_home(new) else frozenset()
        out = [Out("alarm-deps", pv.encode(), _json({"alarm": alarm, "uses": True})) for pv in sorted(after - before)]
        out += [Out("alarm-deps", pv.encode(), _json({"alarm": alarm, "uses": False})) for pv in sorted(before - after)]
        return out

    def due(self, now_ms: int) -> list[Out]:
        """Ticks for the alarms whose shown state changes by itself by now."""
        due = [k for k, t in self.deadlines.items() if t <= now_ms]
        for k in due:
            del self.deadlines[k]
        return [Out("alarm-inputs", k.encode(), _json({"tick": now_ms})) for k in due]

    def rebuild_deadlines(self, items) -> None:
        self.deadlines = {k: v["deadline"] for k, v in items if v.get("deadline") is not None}


# A dead letter carries the rejected record; a record near the broker's size limit
# plus the reason would exceed it, the send would fail every time and the worker
# would stop on that record. Beyond these sizes the dead letter keeps the start,
# and its reason says where the whole record is.
DEAD_LETTER_MAX_VALUE = 256 * 1024
DEAD_LETTER_MAX_KEY = 1024


def dead_letter(codec: Codec, topic: str, partition: int, offset: int, key: bytes | None,
                value: bytes | None, reason: str, now_ms: int) -> Out:
    reason = reason if len(reason) <= 2048 else reason[:2048] + "..."
    cut = []
    if key is not None and len(key) > DEAD_LETTER_MAX_KEY:
        cut.append(f"key cut to {DEAD_LETTER_MAX_KEY} of {len(key)} bytes")
        key = key[:DEAD_LETTER_MAX_KEY]
    if value is not None and len(value) > DEAD_LETTER_MAX_VALUE:
        cut.append(f"value cut to {DEAD_LETTER_MAX_VALUE} of {len(value)} bytes")
        value = value[:DEAD_LETTER_MAX_VALUE]
    if cut:
        reason = f"{reason} ({', '.join(cut)}; the whole record is {topic}[{partition}]@{offset})"
    datum = {"sourceTopic": topic, "partition": partition, "offset": offset, "key": key,
             "value": value, "reason": reason, "timestamp": now_ms}
    return Out("dead-letters", key or b"", codec.encode("dead-letters", datum))
