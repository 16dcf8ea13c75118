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
from dataclasses import dataclass, fields, is_dataclass, replace
from enum import IntEnum
from functools import lru_cache
from typing import MutableMapping, NamedTuple

from alarm_engine import internal_records, records
from alarm_engine.codec import BadRecord, Codec
from alarm_engine.config import Settings
from alarm_engine.core import (
    Ack,
    AckSet,
    Activation,
    ActivationSet,
    AlarmDef,
    AlarmState,
    DefinitionSet,
    Disable,
    DisableSet,
    ParentSet,
    PVUpdate,
    Severity,
    Shelving,
    ShelvingSet,
    Shown,
    Tick,
    apply_control,
    masks_children,
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
    out = [d.name, d.kind, d.pv, d.expression, d.priority, int(d.rule_severity), d.location,
           d.category, d.doc_url, d.edm_path, d.description]
    management = [d.latching, d.delay_ms, d.count, d.off_delay_ms, d.filter, d.masked_by, d.rationale,
                  d.consequence, d.corrective_action, d.response_time_s,
                  [list(x) for x in d.displays]]
    if management != _NO_MANAGEMENT:  # most alarms: the short form, as before
        out += management
    return out


_NO_MANAGEMENT = [False, 0, 0, 0, None, None, "", "", "", 0, []]


def _def_from_tuple(t: tuple) -> AlarmDef:
    if len(t) > 11:  # displays: a list of [title, url] pairs, hashable for the cache as a tuple
        t = t[:-1] + (tuple(tuple(x) for x in t[-1]),)
    return _def_cached(t)


@lru_cache(maxsize=65536)
def _def_cached(t: tuple) -> AlarmDef:
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


def _enc(v):
    """A core value as JSON, tagged where JSON alone would lose its type."""
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, IntEnum):
        return {"$e": type(v).__name__, "v": int(v)}
    if isinstance(v, (int, float)):
        return v
    if isinstance(v, tuple):
        return {"$t": [_enc(x) for x in v]}
    if is_dataclass(v):
        return {"$d": type(v).__name__, **{k: _enc(x) for k, x in asdict(v).items()}}
    raise TypeError(f"cannot store {type(v).__name__} in an alarm state")


def _dec(v):
    if isinstance(v, dict):
        if "$e" in v:
            return _ENUMS[v["$e"]](v["v"])
        if "$t" in v:
            return tuple(_dec(x) for x in v["$t"])
        if "$d" in v:
            return _VALUES[v["$d"]](**{k: _dec(x) for k, x in v.items() if k != "$d"})
    return v


_ENUMS = {"Severity": Severity}
_VALUES = {c.__name__: c for c in (Ack, Disable, Shelving, Activation)}

# The alarm-management fields of a state (acks, delays, disabling, masking): stored under
# "m", only those that differ from a fresh state's, so a plain alarm's entry stays as short
# as before and entries stored before these fields existed read as fresh.
_BASE_FIELDS = {"definition", "inputs", "shelving", "shelving_consumed", "activation", "first_seen_ms",
                "active_since_ms", "shown"}
_FRESH = AlarmState()
_MANAGEMENT_FIELDS = tuple(f.name for f in fields(AlarmState) if f.name not in _BASE_FIELDS)


def _shown_to_json(shown: Shown | None):
    if shown is None:
        return None
    j = asdict(shown)
    j["severity"] = int(shown.severity)
    for k in ("ack", "disable"):
        if j.get(k) is not None:
            j[k] = _enc(j[k])
    return j


def _shown_from_json(j):
    if j is None:
        return None
    j = {**j, "severity": Severity(j["severity"])}
    for k in ("ack", "disable"):
        if j.get(k) is not None:
            j[k] = _dec(j[k])
    return Shown(**j)


def state_to_json(s: AlarmState, inputs: bool = True) -> dict:
    """`inputs=False`: without the PV inputs (kept elsewhere by the caller)."""
    j = {
        "def": _def_to_json(s.definition),
        "inputs": {pv: records.pv_state_datum(st) for pv, st in s.inputs.items()} if inputs else None,
        "shelving": asdict(s.shelving) if s.shelving else None,
        "consumed": s.shelving_consumed,
        "activation": asdict(s.activation) if s.activation else None,
        "first_seen": s.first_seen_ms,
        "since": s.active_since_ms,
        "shown": _shown_to_json(s.shown),
        # Kept beside the state so that timers are rebuilt without decoding every alarm.
        "deadline": next_deadline(s),
    }
    m = {}
    for name in _MANAGEMENT_FIELDS:
        v = getattr(s, name)
        if v != getattr(_FRESH, name):
            m[name] = _enc(v)
    if m:
        j["m"] = m
    return j


def state_from_json(j: dict | None) -> AlarmState:
    if j is None:
        return AlarmState()
    st = AlarmState(
        definition=_def_from_tuple(tuple(j["def"])) if j["def"] else None,
        inputs={pv: records.pv_state(d) for pv, d in j["inputs"].items()},
        shelving=Shelving(**j["shelving"]) if j["shelving"] else None,
        shelving_consumed=j["consumed"],
        activation=Activation(**j["activation"]) if j["activation"] else None,
        first_seen_ms=j["first_seen"],
        active_since_ms=j["since"],
        shown=_shown_from_json(j["shown"]),
    )
    m = j.get("m")
    if m:
        st = replace(st, **{k: _dec(v) for k, v in m.items()})
    return st


def is_empty(s: AlarmState) -> bool:
    return s == AlarmState()


def at_pv_home(d: AlarmDef | None) -> bool:
    """A per-PV alarm is evaluated at its PV's home (pv_home.py), in one hop; one with an
    enabling filter (other PVs) or a maskedBy parent (another alarm) is evaluated here,
    where those inputs arrive, like a rule alarm."""
    return d is not None and d.kind == "pv" and d.filter is None and d.masked_by is None


def control_fields(s: AlarmState, children: list[str] = ()) -> dict:
    """A per-PV alarm's operator records, for its PV's home: the latest of each, which the
    home applies when it differs from what it has (the core drops a repeated ack)."""
    return {"def": _def_to_json(s.definition),
            "shelving": asdict(s.shelving) if s.shelving else None,
            "activation": asdict(s.activation) if s.activation else None,
            "ack": asdict(s.ack) if s.ack else None,
            "disable": asdict(s.disable) if s.disable else None,
            "children": list(children)}


def evaluation_reset(st: AlarmState) -> AlarmState:
    """`st` with only its records kept (definition, shelving, activation, ack, disable):
    what stays on the side that no longer evaluates the alarm."""
    return AlarmState(definition=st.definition, shelving=st.shelving, activation=st.activation,
                      first_seen_ms=st.first_seen_ms, ack=st.ack, disable=st.disable)


def control_changed(old: AlarmState, new: AlarmState) -> bool:
    return ((old.definition, old.shelving, old.activation, old.ack, old.disable)
            != (new.definition, new.shelving, new.activation, new.ack, new.disable))


# --- the processors ---------------------------------------------------------

@dataclass(frozen=True)
class Released:
    """A PV's home has stopped evaluating the alarm (it moved away, or was deleted):
    its answer to the release numbered `move`."""

    pv: str
    move: int


def _control_out(alarm: str, st: AlarmState, ts_ms: int, children: list[str] = (),
                 arrive: bool = False) -> Out:
    """A per-PV alarm's operator records, for its PV's home, as of `ts_ms`. `arrive`: the
    alarm moves to the home with this record, which then publishes what it shows even if
    it had the alarm already (a replay here may have published over it meanwhile)."""
    control = control_fields(st, children)
    if arrive:
        control["arrive"] = True
    return Out("alarm-deps", st.definition.pv.encode(),
               _json({"alarm": alarm, "control": control, "ts": ts_ms}))


def _parent(d: AlarmDef | None) -> str | None:
    return d.masked_by if d is not None else None


def masking_outs(parent: str, children, masking: bool) -> list[Out]:
    """Tell the alarms masked by `parent` whether it masks them now (maskedBy)."""
    msg = _json({"parent": parent, "masking": masking})
    return [Out("alarm-inputs", c.encode(), msg) for c in children]


@dataclass(frozen=True)
class Watch:
    """Alarm `child` names this alarm as its maskedBy parent (watch) or no longer does."""

    child: str
    watch: bool


class AlarmProcessor:
    """Handles the records keyed by alarm name."""

    def __init__(self, settings: Settings, codec: Codec, table: MutableMapping[str, dict]):
        self.settings = settings
        self.codec = codec
        self.table = table
        self.deadlines: dict[str, int] = {}  # alarm -> when to tick (this worker's alarms)
        # Alarms handled since this processor started (or since the last rebalance). The
        # first record of an alarm after that publishes what it shows here even if the
        # restored state says that is unchanged: before a crash, records read again now
        # may have been handled in another order across topics, and what was published
        # then is not in the restored state.
        self.confirmed: set[str] = set()

    def forget(self) -> None:
        """After a rebalance: the partitions' records may have been handled elsewhere."""
        self.confirmed.clear()

    def event_for(self, topic: str, key: str, value: bytes | None, ts_ms: int):
        """Decode and validate one input record into a core event."""
        if topic == "alarm-inputs":
            msg = internal_records.alarm_input(value)
            if "tick" in msg:
                return Tick()
            if "released" in msg:
                return Released(msg["released"], msg["move"])
            if "parent" in msg:
                return ParentSet(msg["masking"])
            if "child" in msg:
                return Watch(msg["child"], msg["watch"])
            state = records.pv_state(msg["state"]) if msg["state"] is not None else None
            return PVUpdate(msg["pv"], state)
        datum = self.codec.decode(topic, value)
        if topic == "alarms":
            return DefinitionSet(None if datum is None else records.alarm_def(key, datum, self.settings))
        if topic == "shelved-alarms":
            return ShelvingSet(None if datum is None else records.shelving(key, datum, ts_ms, self.settings))
        if topic == "alarm-activations":
            return ActivationSet(None if datum is None else records.activation(datum))
        if topic == "alarm-acks":
            return AckSet(None if datum is None else records.ack(key, datum))
        if topic == "disabled-alarms":
            return DisableSet(None if datum is None else records.disable(key, datum, ts_ms))
        raise BadRecord(f"{topic} is not an alarm input")

    def handle(self, topic: str, key: str, value: bytes | None, ts_ms: int,
               now_ms: int | None = None) -> list[Out]:
        """Where an alarm is evaluated: here (rule and external alarms, and per-PV alarms
        with a filter or a maskedBy parent), at its PV's home (other per-PV alarms: this side
        keeps and forwards their operator records), or nowhere while it moves away from a
        PV's home (`releasing`): a new place publishes only once the old home has confirmed
        that it has stopped, so that two writers never race on the alarm's active-alarms
        record. Whichever place evaluates an alarm tells its maskedBy children (`children`,
        kept here) whether it masks them."""
        event = self.event_for(topic, key, value, ts_ms)
        raw = self.table.get(key)
        old = state_from_json(raw)
        if isinstance(event, AckSet) and event.ack is not None and old.definition is None:
            # An operator acknowledged something the engine does not know (a typo, a removed
            # alarm): said in dead-letters, not kept silently for a later alarm of that name.
            raise BadRecord(f"ack {key!r}: no alarm of that name is defined")
        releasing = raw.get("releasing") if raw else None
        move = raw.get("move", 0) if raw else 0
        old_children = list(raw.get("children", ())) if raw else []
        children = old_children
        out: list[Out] = []
        if isinstance(event, Watch):
            new = old
            children = sorted(set(children) | {event.child}) if event.watch else [c for c in children if c != event.child]
            if children != old_children and releasing is None:
                if at_pv_home(old.definition):
                    out.append(_control_out(key, old, ts_ms, children))  # the home answers the child
                elif event.watch:
                    out += masking_outs(key, [event.child], masks_children(old.shown))
        elif isinstance(event, Released):
            if event.pv != releasing or event.move != move:
                return []  # a copy sent again on a replay: the move it answers is over
            new, releasing = self._arrive(key, old, ts_ms, out, children), None
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
                        out.append(_control_out(key, new, ts_ms, children))
                else:
                    # Numbered, so that a stale answer to an earlier release (sent again
                    # by a replay at the home) is not taken for the answer to this one. By
                    # the time of handling (`now_ms`), not the record's: when this partition
                    # replays the release after a crash, the first pass's answer must not
                    # count either, since the home has yet to see what the replay sent
                    # before the release.
                    move = max(ts_ms if now_ms is None else now_ms, move + 1)
                    out.append(Out("alarm-deps", pv.encode(),
                                   _json({"alarm": key, "control": None, "ts": ts_ms, "move": move})))
                    releasing = pv
        elif isinstance(event, DefinitionSet) and at_pv_home(event.definition):
            new = self._arrive(key, apply_control(old, event, ts_ms), ts_ms, out, children)
            if masks_children(old.shown):
                out += masking_outs(key, children, False)  # the home says when it masks
        else:
            new = step(old, event, ts_ms)
            if isinstance(event, DefinitionSet) and _parent(old.definition) != _parent(new.definition):
                new = step(new, ParentSet(False), ts_ms)  # until the new parent answers
            if new.shown != old.shown:
                out.append(self._shown_out(key, new))
                if children and masks_children(new.shown) != masks_children(old.shown):
                    out += masking_outs(key, children, masks_children(new.shown))
        if isinstance(event, DefinitionSet):
            out[:0] = self._dependency_changes(key, old.definition, new.definition)
        if key not in self.confirmed:
            self.confirmed.add(key)
            here = releasing is None and not at_pv_home(new.definition)
            if here and not any(o.topic == "active-alarms" and o.key == key.encode() for o in out):
                out.insert(0, self._shown_out(key, new))  # before what this record makes follow
        if (new != old or releasing != (raw or {}).get("releasing") or move != (raw or {}).get("move", 0)
                or children != old_children):
            if is_empty(new) and releasing is None and not children:
                if raw is not None:
                    del self.table[key]
            else:
                j = {**state_to_json(new), "releasing": releasing, "move": move}
                if children:
                    j["children"] = children
                self.table[key] = j
        deadline = next_deadline(new)
        if deadline is None:
            self.deadlines.pop(key, None)
        else:
            self.deadlines[key] = deadline
        return out

    def _shown_out(self, key: str, st: AlarmState) -> Out:
        return Out("active-alarms", key.encode(), self.codec.encode("active-alarms", records.shown_datum(st.shown)))

    def _arrive(self, key: str, st: AlarmState, ts_ms: int, out: list[Out], children: list[str]) -> AlarmState:
        """From now on the alarm is evaluated where its definition says; that place
        publishes what it shows at once, even nothing, over whatever was shown before."""
        if at_pv_home(st.definition):
            out.append(_control_out(key, st, ts_ms, children, arrive=True)._replace(handover=True))
            # Evaluated at the home: nothing of its own evaluation is kept here.
            return evaluation_reset(st)
        st = step(st, Tick(), ts_ms)
        out.append(self._shown_out(key, st))
        if children:
            out += masking_outs(key, children, masks_children(st.shown))
        return st

    @staticmethod
    def _dependency_changes(alarm: str, old: AlarmDef | None, new: AlarmDef | None) -> list[Out]:
        # Alarms evaluated here only: a per-PV alarm's home learns of it from its control record.
        before = old.input_pvs() if old and not at_pv_home(old) else frozenset()
        after = new.input_pvs() if new and not at_pv_home(new) else frozenset()
        out = [Out("alarm-deps", pv.encode(), _json({"alarm": alarm, "uses": True})) for pv in sorted(after - before)]
        out += [Out("alarm-deps", pv.encode(), _json({"alarm": alarm, "uses": False})) for pv in sorted(before - after)]
        was, now = _parent(old), _parent(new)
        if was != now:
            if was is not None:
                out.append(Out("alarm-inputs", was.encode(), _json({"child": alarm, "watch": False})))
            if now is not None:
                out.append(Out("alarm-inputs", now.encode(), _json({"child": alarm, "watch": True})))
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
