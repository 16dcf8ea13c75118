"""Between wire datums (dicts from the codec) and the core's plain values.

Every record that enters is checked here, once, by the same code whether it
comes from the CLI (before producing) or from a topic (in a worker): a
record the engine would reject is refused at the console too.
"""

from __future__ import annotations

import time

from alarm_engine.codec import BadRecord
from alarm_engine.config import Settings
from alarm_engine.core.model import Ack, AlarmDef, Activation, Connection, Disable, PVState, Severity, Shelving

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
# Operator actions and guidance: a user name, a host, a short reason or title.
MAX_SHORT = 256
MAX_COMMENT = 4096
MAX_DELAY_S = 86_400  # on- and off-delays longer than a day are mistakes
MAX_COUNT = 1000
MAX_DISPLAYS = 50
MAX_URL = 2048


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
    meta.update(_management(name, datum, settings))
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


def _seconds_ms(what: str, seconds: float, limit: float) -> int:
    if seconds != seconds or not 0 <= seconds <= limit:  # NaN compares false
        raise BadRecord(f"{what} is {seconds} seconds (0 to {limit:g})")
    return round(seconds * 1000)


def display_url(what: str, url: str) -> str:
    """An operator link: http(s):// or a relative path, never a command or another scheme."""
    _text(what, url, MAX_URL)
    u = url.strip()
    if not u:
        raise BadRecord(f"{what} is empty")
    lower = u.lower()
    if lower.startswith(("http://", "https://")):
        return url
    if ":" in u.split("/", 1)[0] or u.startswith(("/", "\\")) or any(c in u for c in "|;`$<>\n\r"):
        raise BadRecord(f"{what} {u[:80]!r} is neither an http(s):// URL nor a relative path")
    return url


def _management(name: str, datum: dict, settings: Settings) -> dict:
    """The alarm-management fields of an alarm record (all optional on the wire)."""
    what = f"alarm {name!r}"
    latching = datum.get("latching")
    out = dict(latching=settings.latching_default if latching is None else bool(latching))
    out["delay_ms"] = _seconds_ms(f"{what}: delaySeconds", datum.get("delaySeconds", 0), MAX_DELAY_S)
    out["off_delay_ms"] = _seconds_ms(f"{what}: offDelaySeconds", datum.get("offDelaySeconds", 0), MAX_DELAY_S)
    count = datum.get("count", 0)
    if not 0 <= count <= MAX_COUNT:
        raise BadRecord(f"{what}: count is {count} (0 to {MAX_COUNT})")
    out["count"] = count
    flt = datum.get("filter")
    if flt is not None:
        if len(flt) > MAX_EXPRESSION:
            raise BadRecord(f"{what}: filter: longer than {MAX_EXPRESSION} characters")
        from alarm_engine.core.rules import parse

        try:
            rule = parse(flt)
        except Exception as e:  # RuleError carries the column of the syntax error
            raise BadRecord(f"{what}: filter: {e}") from e
        for pv in rule.pvs:
            if len(pv) > MAX_NAME:
                raise BadRecord(f"{what}: filter: PV name of {len(pv)} characters (at most {MAX_NAME})")
    out["filter"] = flt
    parent = datum.get("maskedBy")
    if parent is not None:
        _text(f"{what}: maskedBy", parent, MAX_NAME)
        if not parent.strip():
            raise BadRecord(f"{what}: maskedBy is empty (null: no parent)")
        if parent == name:
            raise BadRecord(f"{what}: maskedBy names the alarm itself")
    out["masked_by"] = parent
    g = datum.get("guidance") or {}
    for field, key in (("rationale", "rationale"), ("consequence", "consequence"),
                       ("corrective_action", "correctiveAction")):
        out[field] = _text(f"{what}: guidance: {key}", g.get(key, ""), MAX_COMMENT)
    rt = g.get("responseTimeSeconds", 0)
    if not 0 <= rt <= 7 * MAX_DELAY_S:
        raise BadRecord(f"{what}: guidance: responseTimeSeconds is {rt} (0 to {7 * MAX_DELAY_S})")
    out["response_time_s"] = rt
    displays = datum.get("displays", [])
    if len(displays) > MAX_DISPLAYS:
        raise BadRecord(f"{what}: displays: {len(displays)} of them (at most {MAX_DISPLAYS})")
    out["displays"] = tuple(
        (_text(f"{what}: displays: title", d["title"], MAX_SHORT), display_url(f"{what}: displays: url", d["url"]))
        for d in displays)
    return out


UNKNOWN_USER = "unknown"


def _user(what: str, user: str) -> str:
    """Who wrote an operator record; absent or empty (a JSON producer that did not say) is
    kept, and shown, as "unknown"."""
    if not user.strip():
        return UNKNOWN_USER
    return _text(f"{what}: user", user, MAX_SHORT)


def _expiry(what: str, t: int | None) -> int | None:
    if t is not None and not MIN_TIME_MS <= t <= MAX_TIME_MS:
        raise BadRecord(f"{what} {t} is not a time in milliseconds since the epoch between 2000 and 3000")
    return t


def shelve_reason(reason: str, settings: Settings) -> str:
    """The listed reason matching `reason` case-insensitively; empty reads as Other."""
    if not reason.strip():
        return "Other"
    for r in settings.shelve_reasons:
        if r.lower() == reason.strip().lower():
            return r
    raise BadRecord(f"reason {reason[:80]!r} is not one of {', '.join(settings.shelve_reasons)}")


def shelving(name: str, datum: dict, set_ms: int, settings: Settings | None = None) -> Shelving:
    settings = settings or Settings()
    what = f"shelving {name!r}"
    expiration, reason, comment = datum["expiration"], datum["reason"], datum["comment"]
    legacy = datum.get("duration")
    if isinstance(legacy, dict):  # the original scripts' form
        if "expiration" in legacy and expiration is None:
            expiration = legacy["expiration"]
        elif "reason" in legacy and not reason:
            # Its reason was free text: kept as the comment, under the reason Other.
            reason = "Other"
            comment = legacy["reason"] + (f"; {comment}" if comment else "")
    _expiry(f"{what}: expiration", expiration)
    user = _user(what, datum["user"])
    host = _text(f"{what}: host", datum.get("host", ""), MAX_SHORT)
    _text(f"{what}: comment", comment)
    _text(f"{what}: reason", reason, MAX_SHORT)
    try:
        reason = shelve_reason(reason, settings)
    except BadRecord as e:
        raise BadRecord(f"{what}: {e}") from None
    limit = settings.max_shelve_s
    if limit > 0:
        if expiration is None:
            raise BadRecord(f"{what}: no expiration, but shelvings are limited to {limit} s "
                            f"(ALARM_ENGINE_MAX_SHELVE_S); give a duration")
        if expiration - set_ms > limit * 1000:
            raise BadRecord(f"{what}: expiration {(expiration - set_ms) / 1000:.0f} s after the record's "
                            f"time, more than the limit of {limit} s (ALARM_ENGINE_MAX_SHELVE_S)")
    return Shelving(user=user, reason=reason, comment=comment, expiration_ms=expiration,
                    oneshot=datum["oneshot"], set_ms=set_ms, host=host)


def ack(name: str, datum: dict) -> Ack:
    what = f"ack {name!r}"
    user = _user(what, datum["user"])
    _expiry(f"{what}: time", datum["time"])
    return Ack(user=user, host=_text(f"{what}: host", datum.get("host", ""), MAX_SHORT),
               comment=_text(f"{what}: comment", datum.get("comment", ""), MAX_COMMENT),
               ack_ms=datum["time"], unack=bool(datum.get("unack", False)))


def disable(name: str, datum: dict, set_ms: int) -> Disable:
    """set_ms: the record's time; an `until` at or before it was in the past when written."""
    what = f"disabling {name!r}"
    user = _user(what, datum["user"])
    until = _expiry(f"{what}: until", datum.get("until"))
    if until is not None and set_ms and until <= set_ms:
        raise BadRecord(f"{what}: until {until} is not after the record's time {set_ms} "
                        f"(a disabling that ended before it began)")
    return Disable(user=user, host=_text(f"{what}: host", datum.get("host", ""), MAX_SHORT),
                   reason=_text(f"{what}: reason", datum.get("reason", ""), MAX_SHORT),
                   comment=_text(f"{what}: comment", datum.get("comment", ""), MAX_COMMENT),
                   until_ms=until, set_ms=set_ms)


def location(name: str, datum: dict) -> tuple[str | None, str]:
    what = f"location {name!r}"
    parent = datum.get("parent")
    if parent is not None:
        _text(f"{what}: parent", parent, MAX_NAME)
        if not parent.strip():
            raise BadRecord(f"{what}: parent is empty (null: top level)")
        if parent == name:
            raise BadRecord(f"{what}: parent names the location itself")
    return parent, _text(f"{what}: description", datum.get("description", ""))


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
    # getattr: the acknowledgement and disabling attributes are newer than Shown itself.
    a, d = getattr(shown, "ack", None), getattr(shown, "disable", None)
    return {
        "priority": shown.priority,
        "state": shown.state,
        "severity": Severity(shown.severity).name,
        "cause": shown.cause,
        "message": shown.message,
        "since": shown.since_ms,
        "shelving": shelf,
        "ackState": getattr(shown, "ack_state", None),
        "ack": None if a is None else {"user": a.user, "host": a.host, "time": a.ack_ms, "comment": a.comment},
        "disabled": None if d is None else {"user": d.user, "host": d.host, "reason": d.reason,
                                            "comment": d.comment, "until": d.until_ms},
    }


def validate(topic: str, key: str, datum: dict, settings: Settings, now_ms: int | None = None):
    """The core value of an input record; raises BadRecord with the reason. now_ms: the
    record's time (a worker passes the record's timestamp); None: now, for a record about
    to be written."""
    if now_ms is None:
        now_ms = int(time.time() * 1000)
    if topic == "monitored-pvs":
        return monitor_mask(datum)
    if topic == "alarms":
        return alarm_def(key, datum, settings)
    if topic == "shelved-alarms":
        return shelving(key, datum, now_ms, settings)
    if topic == "alarm-acks":
        return ack(key, datum)
    if topic == "disabled-alarms":
        return disable(key, datum, now_ms)
    if topic == "alarm-locations":
        return location(key, datum)
    if topic == "alarm-activations":
        return activation(datum)
    if topic == "pv-state":
        return pv_state(datum)
    raise BadRecord(f"{topic} is not an input topic")
