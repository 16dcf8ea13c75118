"""Pre-encoded record values (Avro, Confluent framing, via the engine's codec)."""

from __future__ import annotations

import time

from alarm_engine.codec import JsonReader, load_schema

_ALARM_READER = JsonReader(load_schema("alarms-value"))


def alarm_datum(pv: str | None = None, external: bool = False, expression: str | None = None) -> dict:
    producer = {"source": "bench"} if external else {"expression": expression} if expression else {"pv": pv}
    return _ALARM_READER.read({"producer": producer, "location": "Bench", "category": "Bench",
                               "priority": "P3_PRODUCTIVITY"})


def pv_state_datum(value: float, major: bool, now_ms: int | None = None) -> dict:
    now_ms = now_ms or int(time.time() * 1000)
    return {"connection": "CONNECTED", "value": float(value),
            "severity": "MAJOR" if major else "NO_ALARM", "status": "HIHI" if major else "NO_ALARM",
            "iocTimestamp": now_ms, "receivedAt": now_ms}


def alarm_records(codec, names_pvs) -> list[tuple[bytes, bytes]]:
    return [(name.encode(), codec.encode("alarms", alarm_datum(pv))) for name, pv in names_pvs]


def rule_alarm_records(codec, names_pvs_aux) -> list[tuple[bytes, bytes]]:
    """Rule alarms over two PVs each: true while the flood PV is high and its partner low
    (the partner is set once, low, so every flood record flips the rule)."""
    return [(name.encode(), codec.encode("alarms", alarm_datum(expression=f"`{pv}` > 50 and `{aux}` < 50")))
            for name, pv, aux in names_pvs_aux]


def monitored_records(codec, pvs) -> list[tuple[bytes, bytes]]:
    value = codec.encode("monitored-pvs", {"mask": ["VALUE", "ALARM"], "topic": None})
    return [(pv.encode(), value) for pv in pvs]


def flood_records(codec, pvs: list[str], total: int) -> list[tuple[bytes, bytes]]:
    """`total` pv-state records, round-robin over the PVs; each PV alternates
    MAJOR / NO_ALARM, so every record changes what its alarm shows."""
    now = int(time.time() * 1000)
    keys = [pv.encode() for pv in pvs]
    out = []
    for n in range(total):
        r, i = divmod(n, len(pvs))
        major = r % 2 == 0
        out.append((keys[i], codec.encode("pv-state", pv_state_datum(95.0 if major else 10.0 + r, major, now + n))))
    return out
