"""The management fields were added to alarms, shelved-alarms and active-alarms so that
records of the schemas before them (tests/data/schemas-before-management/) are still
read, and older readers still read the new records: every added field has a default."""

from __future__ import annotations

import io
import json
from pathlib import Path

import fastavro
import pytest

from alarm_engine.codec import load_schema

BEFORE = Path(__file__).parent.parent / "data" / "schemas-before-management"
NAMES = sorted(p.name.removesuffix(".avsc") for p in BEFORE.glob("*.avsc"))


def _roundtrip(writer: dict, reader: dict, datum: dict) -> dict:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(writer), datum)
    buf.seek(0)
    return fastavro.schemaless_reader(buf, fastavro.parse_schema(writer), fastavro.parse_schema(reader))


def _minimal(schema: dict) -> dict:
    """A datum with every field: defaults where given, else a value of the field's type."""
    out = {}
    for f in schema["fields"]:
        if "default" in f:
            out[f["name"]] = f["default"]
            continue
        t = f["type"]
        t = t[0] if isinstance(t, list) else t
        if isinstance(t, dict) and t["type"] == "enum":
            out[f["name"]] = t["symbols"][0]
        elif isinstance(t, dict) and t["type"] == "record":
            out[f["name"]] = _minimal(t)
        else:
            out[f["name"]] = {"string": "x", "long": 1_800_000_000_000, "int": 1, "boolean": False,
                              "double": 1.0}.get(t if isinstance(t, str) else t["type"], None)
    return out


def test_every_old_schema_is_kept():
    assert NAMES == ["active-alarms-value", "alarms-value", "shelved-alarms-value"]


@pytest.mark.parametrize("name", NAMES)
def test_new_readers_read_old_records_and_old_readers_new_ones(name):
    old = json.loads((BEFORE / f"{name}.avsc").read_text())
    new = load_schema(name)
    old_datum = _minimal(old)
    read = _roundtrip(old, new, old_datum)
    added = {f["name"] for f in new["fields"]} - {f["name"] for f in old["fields"]}
    assert added, "the new schema adds fields"
    for f in new["fields"]:
        if f["name"] in added:
            assert read[f["name"]] == f["default"]
    back = _roundtrip(new, old, read)
    assert back == old_datum
