"""The engine's PV-keyed record handling, free of Faust and Kafka: one hop for per-PV alarms.

A PV's partition is the home of the PV's state and of every per-PV alarm on it
(an alarm of kind 'pv' watches one PV): a pv-state record is read, its alarms
stepped and their active-alarms records produced in one place, with no
repartition. Rule alarms (several PVs, on any partitions) stay where their name
is: the home forwards the PV's state to them on `alarm-inputs`.

What reaches the home besides pv-state comes on `alarm-deps`, keyed by PV, from
the alarm-keyed processor (engine.AlarmProcessor), which owns every alarm's
definition, shelving and activation records:

  {"alarm": A, "uses": true|false}        rule alarm A starts / stops reading the PV
  {"alarm": A, "control": {...}, "ts": T}   per-PV alarm A's definition, shelving, activation,
                                           ack, disable and maskedBy children, as of the time T
                                           of the record that set them
  {"alarm": A, "control": null, "ts": T, "move": N}
                                          A is evaluated here no more (moved, or deleted): the
                                           home drops it and answers {"released": PV, "move": N}
                                           on alarm-inputs, after which the alarm's new place
                                           publishes
  {"alarm": A, "tick": T}                 re-evaluate A (a timed shelving ends)

One entry per PV holds everything the home needs (`PVEntry`), so a pv-state
record costs one read and one write. Each entry also keeps, per input topic, the
offset of the last record applied to it: a record at or below it has been
applied already (a replay after a crash), and is not applied again; instead the
entry's current outputs are sent again, since those of the first pass may not
have reached Kafka (see docs/design.md).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import orjson

from alarm_engine import internal_records, records
from alarm_engine.codec import BadRecord, Codec
from alarm_engine.core import (
    Ack,
    AckSet,
    Activation,
    ActivationSet,
    AlarmState,
    DefinitionSet,
    Disable,
    DisableSet,
    PVUpdate,
    Shelving,
    ShelvingSet,
    Tick,
    masks_children,
    next_deadline,
    step,
)
from alarm_engine.engine import Out, _def_from_tuple, _json, masking_outs, state_from_json, state_to_json


@dataclass
class PVEntry:
    """Everything the home keeps for one PV."""

    offsets: dict[str, int] = field(default_factory=dict)  # input topic -> last offset applied
    latest: dict | None = None  # the last pv-state datum
    rules: list[str] = field(default_factory=list)  # rule alarms reading this PV
    alarms: dict[str, AlarmState] = field(default_factory=dict)  # per-PV alarms on this PV
    released: dict[str, int] = field(default_factory=dict)  # alarm let go -> its move, answered again on a replay
    children: dict[str, list[str]] = field(default_factory=dict)  # per-PV alarm -> alarms it masks (maskedBy)

    def is_empty(self) -> bool:
        return self.latest is None and not self.rules and not self.alarms and not self.released

    def deadlines(self) -> dict[str, int]:
        out = {}
        for name, st in self.alarms.items():
            d = next_deadline(st)
            if d is not None:
                out[name] = d
        return out


# Built once: json.dumps with separators builds an encoder per call.
_COMPACT = json.JSONEncoder(separators=(",", ":"))


def _finite(value) -> bool:
    """Whether a PV value can go through orjson unchanged: it writes NaN and the
    infinities as null (a NaN value is common in EPICS); the json module keeps them."""
    if type(value) is float:
        return math.isfinite(value)
    if isinstance(value, (tuple, list)):
        return all(math.isfinite(v) for v in value if type(v) is float)
    return True


def encode_entry(e: PVEntry) -> bytes:
    """The entry as JSON; written once per PV change, so through orjson, except when the
    PV's value is not finite (then the json module, whose NaN/Infinity decode_entry reads)."""
    alarms = {}
    for name, st in e.alarms.items():
        j = state_to_json(st, inputs=False)  # the PV's own state is `latest`, not a second copy
        del j["inputs"]
        alarms[name] = j
    j = {"o": e.offsets, "latest": e.latest, "rules": e.rules, "alarms": alarms, "released": e.released}
    if e.children:
        j["children"] = e.children
    if e.latest is None or _finite(e.latest.get("value")):
        try:
            return orjson.dumps(j)
        except TypeError:  # an integer beyond 64 bits: the json module writes it
            pass
    return _COMPACT.encode(j).encode()


def decode_entry(pv: str, raw: bytes | None) -> PVEntry:
    if raw is None:
        return PVEntry()
    try:
        j = orjson.loads(raw)
    except orjson.JSONDecodeError:  # NaN or Infinity, written by the json module
        j = json.loads(raw)
    latest = j["latest"]
    alarms = {}
    for name, a in j["alarms"].items():
        alarms[name] = state_from_json({**a, "inputs": {pv: latest} if latest is not None else {}})
    return PVEntry(offsets=j["o"], latest=latest, rules=list(j["rules"]), alarms=alarms,
                   released=dict(j.get("released", {})), children=dict(j.get("children", {})))


def _shown_out(codec: Codec, name: str, st: AlarmState) -> Out:
    return Out("active-alarms", name.encode(), codec.encode("active-alarms", records.shown_datum(st.shown)))


class PVHome:
    """Handles the records keyed by PV: PV states and what the alarms tell the PV."""

    def __init__(self, codec: Codec):
        self.codec = codec

    def handle(self, topic: str, pv: str, value: bytes | None, ts_ms: int, e: PVEntry) -> list[Out]:
        """Apply one record to `e` (in place) and return its outputs. Raises BadRecord
        before changing anything when the record is bad."""
        if topic == "pv-state":
            return self._pv_state(pv, value, ts_ms, e)
        if topic == "alarm-deps":
            return self._dep(pv, value, ts_ms, e)
        raise BadRecord(f"{topic} is not a PV-keyed topic")

    def current_outputs(self, pv: str, e: PVEntry) -> list[Out]:
        """What the entry implies downstream now: sent again for a replayed record."""
        out = [_shown_out(self.codec, name, st) for name, st in sorted(e.alarms.items())]
        for name, children in sorted(e.children.items()):
            if name in e.alarms:
                out += masking_outs(name, children, masks_children(e.alarms[name].shown))
        msg = _json({"pv": pv, "state": e.latest})
        out += [Out("alarm-inputs", a.encode(), msg) for a in e.rules]
        out += [_released_out(pv, a, m) for a, m in sorted(e.released.items())]
        return out

    def _pv_state(self, pv: str, value: bytes | None, ts_ms: int, e: PVEntry) -> list[Out]:
        datum = self.codec.decode("pv-state", value)
        state = records.pv_state(datum) if datum is not None else None  # validate before it spreads
        e.latest = datum
        out = []
        for name in sorted(e.alarms):
            old = e.alarms[name]
            new = e.alarms[name] = step(old, PVUpdate(pv, state), ts_ms)
            if new.shown != old.shown:
                out.append(_shown_out(self.codec, name, new))
                out += _masking_changes(name, old, new, e)
        if e.rules:
            msg = _json({"pv": pv, "state": datum})
            out += [Out("alarm-inputs", a.encode(), msg) for a in e.rules]
        return out

    def _dep(self, pv: str, value: bytes | None, ts_ms: int, e: PVEntry) -> list[Out]:
        dep = internal_records.alarm_deps(value)
        alarm = dep["alarm"]
        if "uses" in dep:
            return self._uses(pv, alarm, dep["uses"], e)
        if "tick" in dep:
            old = e.alarms.get(alarm)
            if old is None:
                return []
            new = e.alarms[alarm] = step(old, Tick(), ts_ms)
            if new.shown == old.shown:
                return []
            return [_shown_out(self.codec, alarm, new)] + _masking_changes(alarm, old, new, e)
        ts = ts_ms if dep["ts"] is None else dep["ts"]
        return self._control(pv, alarm, dep["control"], ts, dep["move"] or 0, e)

    def _uses(self, pv: str, alarm: str, uses: bool, e: PVEntry) -> list[Out]:
        if uses and alarm not in e.rules:
            e.rules = sorted(e.rules + [alarm])
            # A new dependent learns the PV's current state at once.
            if e.latest is not None:
                return [Out("alarm-inputs", alarm.encode(), _json({"pv": pv, "state": e.latest}))]
        elif not uses and alarm in e.rules:
            e.rules = [a for a in e.rules if a != alarm]
        return []

    def _control(self, pv: str, alarm: str, control, ts_ms: int, move: int, e: PVEntry) -> list[Out]:
        old = e.alarms.get(alarm)
        if control is None:
            # Not evaluated here any more: say so; the alarm's new place publishes after that
            # (and tells its children; here they hear that it masks them no more, first).
            e.alarms.pop(alarm, None)
            children = e.children.pop(alarm, [])
            e.released[alarm] = move
            out = masking_outs(alarm, children, False) if old is not None and masks_children(old.shown) else []
            return out + [_released_out(pv, alarm, move)]
        try:
            defn = _def_from_tuple(tuple(control["def"]))
            shelving = Shelving(**control["shelving"]) if control["shelving"] else None
            activation = Activation(**control["activation"]) if control["activation"] else None
            ack = Ack(**control["ack"]) if control.get("ack") else None
            disable = Disable(**control["disable"]) if control.get("disable") else None
            children = [str(c) for c in control.get("children") or ()]
            arrive = control.get("arrive", False) is True
        except (TypeError, ValueError, KeyError) as err:
            raise BadRecord(f"alarm-deps control of {alarm}: {err}") from None
        if defn.kind != "pv" or defn.pv != pv or defn.name != alarm:
            raise BadRecord(f"alarm-deps control of {alarm} is not a per-PV alarm of {pv}")
        st = old if old is not None else AlarmState()
        if old is None and e.latest is not None:
            st = step(st, PVUpdate(pv, records.pv_state(e.latest)), ts_ms)
        # An ack older than the alarm's current condition (here: one given before the alarm
        # moved in) acknowledges nothing; the core keeps it as applied.
        for event in (DefinitionSet(defn), ShelvingSet(shelving), ActivationSet(activation),
                      DisableSet(disable), AckSet(ack)):
            st = step(st, event, ts_ms)
        e.alarms[alarm] = st
        e.released.pop(alarm, None)
        before = e.children.get(alarm, [])
        if children:
            e.children[alarm] = children
        else:
            e.children.pop(alarm, None)
        out = []
        if old is None or arrive or st.shown != old.shown:
            # New here (defined, or moved in): whatever was shown before is overwritten. Also
            # when the alarm was here already: its partition, replaying the records before
            # this move after a crash, may have published over what this home shows.
            out.append(_shown_out(self.codec, alarm, st))
        if old is None or arrive or children != before:
            out += masking_outs(alarm, children, masks_children(st.shown))
        elif st.shown != old.shown:
            out += _masking_changes(alarm, old, st, e)
        return out


def _masking_changes(alarm: str, old: AlarmState, new: AlarmState, e: PVEntry) -> list[Out]:
    children = e.children.get(alarm)
    if children and masks_children(old.shown) != masks_children(new.shown):
        return masking_outs(alarm, children, masks_children(new.shown))
    return []


def _released_out(pv: str, alarm: str, move: int) -> Out:
    return Out("alarm-inputs", alarm.encode(), _json({"released": pv, "move": move}), handover=True)
