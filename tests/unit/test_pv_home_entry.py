"""pv-home entries through orjson, and through the json module where orjson would lose a value."""

from __future__ import annotations

import json
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from alarm_engine import records
from alarm_engine.core import AlarmDef, AlarmState, DefinitionSet, PVUpdate, step
from alarm_engine.pv_home import PVEntry, decode_entry, encode_entry

values = st.one_of(
    st.none(), st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**31, 2**31 - 1),
    st.text(max_size=20),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=5).map(tuple),
    st.lists(st.text(max_size=5), max_size=3).map(tuple))


def _datum(value, major: bool, t: int) -> dict:
    return {"connection": "CONNECTED", "value": value, "severity": "MAJOR" if major else "NO_ALARM",
            "status": "HIHI" if major else "NO_ALARM", "iocTimestamp": t, "receivedAt": t}


def _entry(value, major: bool) -> PVEntry:
    d = AlarmDef.for_pv("A", "P", "P1_LIFE")
    s = step(AlarmState(), DefinitionSet(d), 1000)
    latest = _datum(value, major, 2000)
    s = step(s, PVUpdate("P", records.pv_state(latest)), 2000)
    return PVEntry(offsets={"pv-state": 7, "alarm-deps": 3}, latest=latest, rules=["R1"], alarms={"A": s},
                   released={"B": 2})


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b and type(a) is type(b)


@settings(max_examples=300, deadline=None)
@given(values, st.booleans())
def test_an_entry_reads_back_as_the_json_module_reads_it(value, major):
    e = _entry(value, major)
    raw = encode_entry(e)
    back = decode_entry("P", raw)
    # The value as written, NaN and the infinities included (orjson would write null).
    assert _same(back.latest["value"], json.loads(json.dumps(e.latest))["value"])
    assert back.offsets == e.offsets and back.rules == e.rules and back.released == e.released
    assert back.alarms["A"].shown == e.alarms["A"].shown
    assert back.alarms["A"].definition == e.alarms["A"].definition
    # Any JSON reader takes it when the value is finite.
    finite = not any(isinstance(v, float) and not math.isfinite(v)
                     for v in (value if isinstance(value, tuple) else (value,)))
    if finite:
        json.loads(raw, parse_constant=lambda c: (_ for _ in ()).throw(AssertionError(c)))


def test_a_nan_value_is_kept_and_an_old_json_entry_still_reads():
    e = _entry(float("nan"), True)
    assert math.isnan(decode_entry("P", encode_entry(e)).latest["value"])
    old = json.dumps({"o": {"pv-state": 1}, "latest": _datum(float("inf"), False, 5), "rules": [],
                      "alarms": {}, "released": {}}, separators=(",", ":")).encode()
    assert decode_entry("P", old).latest["value"] == math.inf
