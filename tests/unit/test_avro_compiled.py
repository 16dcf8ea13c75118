"""The compiled Avro codec against fastavro: same bytes, same datums, and fastavro for
everything it does not take."""

from __future__ import annotations

import io
import math
import string
import struct

import fastavro
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alarm_engine import avro_compiled
from alarm_engine.avro_compiled import Fallback, compile_reader, compile_writer
from alarm_engine.codec import SCHEMA_DIR, load_schema

PROJECT_SCHEMAS = sorted(p.name[:-len(".avsc")] for p in SCHEMA_DIR.glob("*.avsc"))
READ_ERRORS = (Fallback, IndexError, struct.error, UnicodeDecodeError)


def _named(schema):
    names = {}
    avro_compiled._named_types(schema, names)
    return names


def datum_of(schema, names=None):
    """A hypothesis strategy of the datums fastavro's strict writer takes for `schema`."""
    names = _named(schema) if names is None else names
    if isinstance(schema, str) and schema in names:
        schema = names[schema]
    if isinstance(schema, list):
        return st.one_of([datum_of(b, names) for b in schema])
    kind = schema if isinstance(schema, str) else schema["type"]
    if isinstance(kind, (dict, list)):
        return datum_of(kind, names)
    text = st.text(alphabet=string.printable + "°µ€\u2603", max_size=40)
    primitive = {
        "null": st.none(),
        "boolean": st.booleans(),
        "int": st.integers(-(2**31), 2**31 - 1),
        "long": st.integers(-(2**63), 2**63 - 1),
        "double": st.floats(allow_nan=False),
        "float": st.floats(width=32, allow_nan=False),
        "string": text,
        "bytes": st.binary(max_size=40),
    }
    if kind in primitive:
        return primitive[kind]
    if kind == "enum":
        return st.sampled_from(schema["symbols"])
    if kind == "array":
        return st.lists(datum_of(schema["items"], names), max_size=5)
    if kind == "map":
        return st.dictionaries(text, datum_of(schema["values"], names), max_size=4)
    assert kind == "record", kind
    return st.fixed_dictionaries({f["name"]: datum_of(f["type"], names) for f in schema["fields"]})


def fa_write(schema, datum) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), datum, strict=True)
    return buf.getvalue()


def fa_read(schema, body: bytes):
    buf = io.BytesIO(body)
    out = fastavro.schemaless_reader(buf, fastavro.parse_schema(schema), None)
    assert buf.tell() == len(body), "trailing bytes"
    return out


def test_the_hot_path_and_apply_schemas_compile():
    # pv-state in, active-alarms out: what a flood costs; alarms and monitored-pvs: what
    # an apply of a facility file writes (the alarms' producer: a union of records).
    for name in ("pv-state-value", "active-alarms-value", "alarm-history-value", "alarm-summaries-value",
                 "alarms-value", "monitored-pvs-value"):
        schema = load_schema(name)
        assert compile_writer(schema) is not None and compile_reader(schema) is not None, name


def test_a_union_of_records_is_chosen_by_field_names_as_fastavro_chooses():
    schema = load_schema("alarms-value")
    write = compile_writer(schema)
    from bench.data import alarm_datum

    for producer in ({"pv": "P:1"}, {"expression": "`P:1` > 2", "severity": "MINOR"}, {"source": "x"},
                     {"jar": "old.jar"}):
        datum = {**alarm_datum("P:1"), "producer": producer}
        assert write(b"", datum) == fa_write(schema, datum), producer
    # Not exactly one record's fields (a default left out, an extra field): fastavro decides.
    for producer in ({"expression": "`P:1` > 2"}, {"pv": "P:1", "jar": "x"}):
        with pytest.raises((Fallback, KeyError)):
            write(b"", {**alarm_datum("P:1"), "producer": producer})


@pytest.mark.parametrize("branches", [["string", "ENUM"], ["ENUM", "string"], ["null", "ENUM", "string"]])
@pytest.mark.parametrize("value", ["A", "B", "other", None])
def test_an_enum_and_a_string_in_one_union_are_chosen_as_fastavro_chooses(branches, value):
    enum = {"type": "enum", "name": "E", "symbols": ["A", "B"]}
    schema = {"type": "record", "name": "S", "fields": [
        {"name": "s", "type": [enum if b == "ENUM" else b for b in branches]}]}
    write = compile_writer(schema)
    try:
        body = fa_write(schema, {"s": value})
    except (ValueError, TypeError):
        with pytest.raises(Fallback):
            write(b"", {"s": value})
        return
    assert write(b"", {"s": value}) == body
    assert compile_reader(schema)(body, 0) == {"s": value}


@pytest.mark.parametrize("name", PROJECT_SCHEMAS)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_same_bytes_and_datums_as_fastavro(name, data):
    schema = load_schema(name)
    datum = data.draw(datum_of(schema))
    write, read = compile_writer(schema), compile_reader(schema)
    body = fa_write(schema, datum)
    if write is not None:
        assert write(b"\x00HEAD", datum) == b"\x00HEAD" + body
    if read is not None:
        assert _nan_free(read(b"\x00HEAD" + body, 5)) == _nan_free(fa_read(schema, body))


def _nan_free(v):
    """The datum with NaN made comparable (a flipped byte of a double may give one; NaN != NaN)."""
    if isinstance(v, float) and math.isnan(v):
        return "NaN"
    if isinstance(v, dict):
        return {k: _nan_free(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_nan_free(x) for x in v]
    return v


@pytest.mark.parametrize("name", ["pv-state-value", "active-alarms-value", "alarm-summaries-value"])
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_a_damaged_body_is_read_as_fastavro_reads_it_or_left_to_fastavro(name, data):
    schema = load_schema(name)
    body = bytearray(fa_write(schema, data.draw(datum_of(schema))))
    # Truncate, extend or flip a byte.
    how = data.draw(st.sampled_from(["cut", "extend", "flip"]))
    if how == "cut" and body:
        body = body[:data.draw(st.integers(0, len(body) - 1))]
    elif how == "extend":
        body += data.draw(st.binary(min_size=1, max_size=4))
    elif body:
        i = data.draw(st.integers(0, len(body) - 1))
        body[i] ^= data.draw(st.integers(1, 255))
    body = bytes(body)
    try:
        mine = compile_reader(schema)(body, 0)
    except READ_ERRORS:
        return  # the codec then asks fastavro, which decides
    assert _nan_free(mine) == _nan_free(fa_read(schema, body))


def test_the_writer_leaves_any_other_datum_to_fastavro():
    schema = load_schema("pv-state-value")
    write = compile_writer(schema)
    good = {"connection": "CONNECTED", "value": 1.5, "severity": "MAJOR", "status": "HIHI",
            "iocTimestamp": 5, "receivedAt": 6}
    assert write(b"", good) == fa_write(schema, good)
    for bad in ({**good, "extra": 1}, {k: v for k, v in good.items() if k != "status"},
                {**good, "severity": "BAD"}, {**good, "value": True}, {**good, "value": (1.0,)},
                {**good, "receivedAt": 1.0}, {**good, "receivedAt": 2**63}, {**good, "status": b"x"},
                {**good, "value": 2**64}):
        with pytest.raises((Fallback, KeyError)):
            write(b"", bad)
    # An int for a double is fine for fastavro; the compiled writer leaves it to fastavro.
    with pytest.raises(Fallback):
        write(b"", {**good, "value": None, "iocTimestamp": None, "connection": 3})


@pytest.mark.parametrize("schema", [
    {"type": "record", "name": "T", "fields": [{"name": "t", "type": {"type": "long", "logicalType": "timestamp-millis"}}]},
    {"type": "record", "name": "U", "fields": [{"name": "u", "type": ["null", "double", "long"]}]},  # int would go to double
    {"type": "record", "name": "R", "fields": [{"name": "r", "type": ["null", "R"]}]},  # recursive
    {"type": "record", "name": "M", "fields": [{"name": "m", "type": ["null", {"type": "map", "values": "string"},
                                                                      {"type": "record", "name": "N", "fields": []}]}]},
    # one record's fields a subset of another's: fastavro's choice depends on defaults
    {"type": "record", "name": "P", "fields": [{"name": "p", "type": [
        {"type": "record", "name": "P1", "fields": [{"name": "a", "type": "string"}]},
        {"type": "record", "name": "P2", "fields": [{"name": "a", "type": "string"},
                                                    {"name": "b", "type": "string", "default": ""}]}]}]},
])
def test_schemas_it_does_not_cover_compile_to_none(schema):
    assert compile_writer(schema) is None


def test_long_enum_and_union_indexes_beyond_one_byte_are_left_to_fastavro():
    symbols = [f"S{i}" for i in range(100)]
    schema = {"type": "record", "name": "E", "fields": [{"name": "e", "type": {"type": "enum", "name": "Big",
                                                                               "symbols": symbols}}]}
    body = fa_write(schema, {"e": "S99"})
    assert compile_writer(schema)(b"", {"e": "S99"}) == body
    with pytest.raises(Fallback):
        compile_reader(schema)(body, 0)
