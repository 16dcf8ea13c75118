"""Between wire datums (dicts from the codec) and the core's plain values.

Every record that enters is checked here, once, by the same code whether it
comes from the CLI (before producing) or from a topic (in a worker): a
record the engine would reject is refused at the console too.
"""

from __future__ import annotations

from alarm_engine.codec import BadRecord
from alarm_engine.config import Settings
from alarm_engine.core.model import AlarmDef, Activation, Connection, PVState, Severity, Shelving

MASK_SYMBOLS = ("VALUE", "ALARM", "ATTRIBUTE", "LOG")
# Expirations outside these bounds are mistakes (seconds for milliseconds, typos).
MIN_TIME_MS = 946_684_800_000  # 2000-01-01
MAX_TIME_MS = 32_503_680_000_000  # 3000-01-01
MAX_EXPRESSION = 4096
# A PV name becomes a record key (pv-state, alarm-deps): the limits of codec.decode_key.
MAX_NAME = 512
# Free text (descriptions, notes, reasons, ...). Alarm records are small; the bound keeps an
# alarm's state (definition, inputs, shown message) well under Kafka's 1 MiB record limit,
# since the state table's changelog and active-alarms carry copies of these fields.
MAX_TEXT = 65_536
# PV states: waveforms as the CA bridge truncates them (ca_monitor.MAX_ARRAY_ELEMENTS), and
# string values and statuses, bounded for the same reason (an alarm's state holds one
# state per PV it depends on).
MAX_WAVEFORM = 1000
MAX_PV_TEXT = 16_384


def _text(what: str, s: str, limit: int = MAX_TEXT) -> str:
    """A string that can be written back out: UTF-8 encodable (JSON input may carry lone
    surrogates such as "\\ud800"), and not absurdly long."""
    if len(s) > limit:
        raise BadRecord(f"{what} is {len(s)} characters long (at most {limit})")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRecord(f"{what} is not valid Unicode text (lone surrogate U+{ord(s[e.start]):04X} "
                        f"at character {e.start + 1})") from None
    return s


def pv_name(what: str, pv: str) -> str:
    """A PV name usable as a key and in a rule: printable, no blanks, at most MAX_NAME."""
    if not pv.strip():
        raise BadRecord(f"{what}: empty PV name")
    if len(pv) > MAX_NAME:
        raise BadRecord(f"{what}: PV name of {len(pv)} characters (at most {MAX_NAME})")
    for i, ch in enumerate(pv):
        if ch.isspace() or not ch.isprintable():
            raise BadRecord(f"{what}: PV name {pv[:80]!r} has a blank or unprintable character "
                            f"U+{ord(ch):04X} at position {i + 1}")
    return pv


def monitor_mask(datum: dict) -> frozenset[str]:
    mask = frozenset(datum["mask"]) or frozenset(("VALUE", "ALARM"))
    unknown = mask - set(MASK_SYMBOLS)
    if unknown:  # only reachable from the CLI; the schema rejects them on the wire
        raise BadRecord(f"unknown monitor mask {', '.join(sorted(unknown))}: use {', '.join(MASK_SYMBOLS)}")
    return mask


def alarm_def(name: str, datum: dict, settings: Settings) -> AlarmDef:
    p = datum["producer"]
    for field in ("location", "category", "docUrl", "edmPath", "description"):
        _text(f"alarm {name!r}: {field}", datum[field])
    for field, allowed in (("location", settings.locations), ("category", settings.categories)):
        if allowed and datum[field] not in allowed:
            raise BadRecord(f"alarm {name!r}: {field} {datum[field]!r} is not one of {', '.join(allowed)}")
    meta = dict(location=datum["location"], category=datum["category"], doc_url=datum["docUrl"],
                edm_path=datum["edmPath"], description=datum["description"])
    try:
        if "pv" in p:
            pv_name(f"alarm {name!r}", p["pv"])
            return AlarmDef.for_pv(name, p["pv"], datum["priority"], **meta)
        if "expression" in p:
            if len(p["expression"]) > MAX_EXPRESSION:
                raise BadRecord(f"alarm {name!r}: rule longer than {MAX_EXPRESSION} characters")
            defn = AlarmDef.for_rule(name, p["expression"], datum["priority"],
                                     Severity[p["severity"]], **meta)
            # The parser already refuses blank and unprintable characters in PV names.
            for pv in defn.pvs():
                if len(pv) > MAX_NAME:
                    raise BadRecord(f"alarm {name!r}: PV name of {len(pv)} characters in the rule "
                                    f"(at most {MAX_NAME})")
            return defn
        if "jar" in p:
            raise BadRecord(f"alarm {name!r}: StreamRuleAlarm (Java jar rules) is not supported; "
                            f"define the rule as a RuleAlarm expression")
        _text(f"alarm {name!r}: source", p.get("source", ""))
        return AlarmDef.external(name, datum["priority"], **meta)
    except BadRecord:
        raise
    except Exception as e:  # RuleError carries the column of the syntax error
        raise BadRecord(f"alarm {name!r}: {e}") from e


def shelving(name: str, datum: dict, set_ms: int) -> Shelving:
    expiration, reason = datum["expiration"], datum["reason"]
    legacy = datum.get("duration")
    if isinstance(legacy, dict):  # the original scripts' form
        if "expiration" in legacy and expiration is None:
            expiration = legacy["expiration"]
        elif "reason" in legacy and not reason:
            reason = legacy["reason"]
    if expiration is not None and not MIN_TIME_MS <= expiration <= MAX_TIME_MS:
        raise BadRecord(f"shelving {name!r}: expiration {expiration} is not a time in milliseconds "
                        f"since the epoch between 2000 and 3000")
    if not datum["user"].strip():
        raise BadRecord(f"shelving {name!r}: user must not be empty")
    for field, text in (("user", datum["user"]), ("reason", reason), ("comment", datum["comment"])):
        _text(f"shelving {name!r}: {field}", text)
    return Shelving(user=datum["user"], reason=reason, comment=datum["comment"],
                    expiration_ms=expiration, oneshot=datum["oneshot"], set_ms=set_ms)


def activation(datum: dict) -> Activation:
    _text("activation note", datum["note"])
    return Activation(priority=datum["priority"], note=datum["note"])


def pv_state(datum: dict) -> PVState:
    value = datum["value"]
    # Also called for every stored input when an alarm's state is loaded: keep it cheap.
    if isinstance(value, list):
        if len(value) > MAX_WAVEFORM:
            raise BadRecord(f"pv-state: waveform of {len(value)} elements (at most {MAX_WAVEFORM}; "
                            f"the CA bridge truncates)")
    elif isinstance(value, str):
        _text("pv-state: string value", value, MAX_PV_TEXT)
    _text("pv-state: status", datum["status"], MAX_PV_TEXT)
    return PVState(
        connection=Connection[datum["connection"]],
        value=tuple(value) if isinstance(value, list) else value,
        severity=Severity[datum["severity"]],
        status=datum["status"],
        ioc_time_ms=datum["iocTimestamp"],
        received_ms=datum["receivedAt"],
    )


def pv_state_datum(state: PVState) -> dict:
    value = state.value
    if isinstance(value, tuple):
        value = [float(v) for v in value]
    elif isinstance(value, bool):
        value = int(value)
    return {
        "connection": state.connection.value,
        "value": value,
        "severity": Severity(state.severity).name,
        "status": state.status,
        "iocTimestamp": state.ioc_time_ms,
        "receivedAt": state.received_ms,
    }


def shown_datum(shown) -> dict | None:
    """The active-alarms value for what the core shows (None: tombstone)."""
    if shown is None:
        return None
    shelf = None
    if shown.state == "SHELVED":
        shelf = {"kind": shown.shelving_kind, "user": shown.shelved_by or "",
                 "reason": getattr(shown, "shelf_reason", "") or "",
                 "expiration": shown.shelf_expiration_ms}
    return {
        "priority": shown.priority,
        "state": shown.state,
        "severity": Severity(shown.severity).name,
        "cause": shown.cause,
        "message": shown.message,
        "since": shown.since_ms,
        "shelving": shelf,
    }


def validate(topic: str, key: str, datum: dict, settings: Settings, now_ms: int = 0):
    """The core value of an input record; raises BadRecord with the reason."""
    if topic == "monitored-pvs":
        return monitor_mask(datum)
    if topic == "alarms":
        return alarm_def(key, datum, settings)
    if topic == "shelved-alarms":
        return shelving(key, datum, now_ms)
    if topic == "alarm-activations":
        return activation(datum)
    if topic == "pv-state":
        return pv_state(datum)
    raise BadRecord(f"{topic} is not an input topic")
