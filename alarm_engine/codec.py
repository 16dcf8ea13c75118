"""Record values on the wire: Confluent-framed Avro, plain JSON, or null.

Every input topic accepts three forms, because operators produce with
standard tools (kcat, kafka-console-producer) that cannot write Avro:

- Avro with the Confluent framing: magic byte 0, 4-byte big-endian schema id,
  Avro body. The writer schema is fetched from the registry by id (cached)
  and resolved against the project's reader schema.
- A JSON object, checked strictly against the same reader schema (unknown
  fields and wrong types are errors, defaults are filled in).
- A null value: a tombstone.

Both encodings decode to the same plain Python dict, so the layers above
never care how a record was written. Anything else raises `BadRecord` with a
reason an operator can act on.
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Any, Callable

import fastavro

from alarm_engine.avro_compiled import Fallback, compile_reader, compile_writer

MAGIC = 0
# What a compiled reader raises on a body it cannot read: fastavro then reads it or says why.
_READ_FALLBACK = (Fallback, IndexError, struct.error, UnicodeDecodeError)
_HEADER = struct.Struct(">bI")
SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
# Bound on what one record may hold: a control system's alarm records are small.
MAX_VALUE_BYTES = 1 << 20


class BadRecord(ValueError):
    """A record that cannot be accepted; str() is the reason."""


class RegistryUnavailable(RuntimeError):
    """The writer schema of a record could not be fetched because the registry
    did not answer: the record is not bad, reading it must wait."""


def load_schema(name: str, directory: Path = SCHEMA_DIR) -> dict:
    with open(directory / f"{name}.avsc", encoding="utf-8") as f:
        return json.load(f)


# --- JSON → Avro datum, strictly -------------------------------------------

_INT_RANGE = {"int": (-(2**31), 2**31 - 1), "long": (-(2**63), 2**63 - 1)}


def _named_types(schema: Any, names: dict, namespace: str | None = None) -> None:
    """Collect named types, by short and full name, so references resolve."""
    if isinstance(schema, list):
        for branch in schema:
            _named_types(branch, names, namespace)
    elif isinstance(schema, dict):
        if schema.get("type") in ("record", "enum", "fixed"):
            namespace = schema.get("namespace", namespace)
            names[schema["name"]] = schema
            if namespace:
                names[f"{namespace}.{schema['name']}"] = schema
        for f in schema.get("fields", ()):
            _named_types(f["type"], names, namespace)
        for key in ("items", "values"):
            if key in schema:
                _named_types(schema[key], names, namespace)


def _type_label(schema: Any) -> str:
    if isinstance(schema, str):
        return schema
    if isinstance(schema, list):
        return " | ".join(_type_label(s) for s in schema)
    return schema.get("name") or schema["type"]


class JsonReader:
    """Converts a JSON document to the datum Avro decoding would give."""

    def __init__(self, schema: dict):
        self.schema = schema
        self.names: dict = {}
        _named_types(schema, self.names)

    def read(self, obj: Any) -> dict:
        return self._convert(self.schema, obj, "value")

    def read_field(self, name: str, obj: Any, path: str) -> Any:
        """One field of the top-level record, checked as `read` checks it (the
        facility file reports every bad field, not only the first)."""
        field = next(f for f in self.schema["fields"] if f["name"] == name)
        return self._convert(field["type"], obj, path)

    def default_of(self, name: str) -> Any:
        """The default of a top-level field, as a datum."""
        field = next(f for f in self.schema["fields"] if f["name"] == name)
        return self._default(field["type"], field["default"])

    def _convert(self, schema: Any, obj: Any, path: str) -> Any:
        if isinstance(schema, str) and schema in self.names:
            schema = self.names[schema]
        if isinstance(schema, list):
            return self._union(schema, obj, path)
        kind = schema if isinstance(schema, str) else schema["type"]
        if isinstance(kind, (dict, list)):
            return self._convert(kind, obj, path)
        if kind == "null":
            if obj is not None:
                raise BadRecord(f"{path}: expected null, got {json.dumps(obj)[:60]}")
            return None
        if kind == "boolean":
            if not isinstance(obj, bool):
                raise BadRecord(f"{path}: expected true or false, got {json.dumps(obj)[:60]}")
            return obj
        if kind in ("int", "long"):
            if isinstance(obj, bool) or not isinstance(obj, int):
                raise BadRecord(f"{path}: expected an integer, got {json.dumps(obj)[:60]}")
            lo, hi = _INT_RANGE[kind]
            if not lo <= obj <= hi:
                raise BadRecord(f"{path}: integer {obj} out of range for {kind}")
            return obj
        if kind in ("float", "double"):
            if isinstance(obj, bool) or not isinstance(obj, (int, float)):
                raise BadRecord(f"{path}: expected a number, got {json.dumps(obj)[:60]}")
            try:
                return float(obj)
            except OverflowError:  # an int beyond any double (JSON allows 4300 digits)
                raise BadRecord(f"{path}: integer of {len(str(obj))} digits out of range for {kind}") from None
        if kind == "string":
            if not isinstance(obj, str):
                raise BadRecord(f"{path}: expected a string, got {json.dumps(obj)[:60]}")
            return obj
        if kind == "bytes":
            if not isinstance(obj, str):
                raise BadRecord(f"{path}: expected a string of bytes, got {json.dumps(obj)[:60]}")
            return obj.encode("latin-1", errors="strict")
        if kind == "enum":
            if obj not in schema["symbols"]:
                raise BadRecord(
                    f"{path}: {json.dumps(obj)[:60]} is not one of {', '.join(schema['symbols'])}"
                )
            return obj
        if kind == "array":
            if not isinstance(obj, list):
                raise BadRecord(f"{path}: expected a list, got {json.dumps(obj)[:60]}")
            return [self._convert(schema["items"], item, f"{path}[{i}]") for i, item in enumerate(obj)]
        if kind == "map":
            if not isinstance(obj, dict):
                raise BadRecord(f"{path}: expected an object, got {json.dumps(obj)[:60]}")
            return {k: self._convert(schema["values"], v, f"{path}.{k}") for k, v in obj.items()}
        if kind == "record":
            return self._record(schema, obj, path)
        raise BadRecord(f"{path}: unsupported schema type {kind}")

    def _record(self, schema: dict, obj: Any, path: str) -> dict:
        if not isinstance(obj, dict):
            raise BadRecord(f"{path}: expected an object ({schema['name']}), got {json.dumps(obj)[:60]}")
        fields = {f["name"]: f for f in schema["fields"]}
        unknown = sorted(set(obj) - set(fields))
        if unknown:
            raise BadRecord(
                f"{path}: unknown field {unknown[0]!r} for {schema['name']} "
                f"(fields: {', '.join(fields)})"
            )
        out = {}
        for name, f in fields.items():
            if name in obj:
                out[name] = self._convert(f["type"], obj[name], f"{path}.{name}")
            elif "default" in f:
                out[name] = self._default(f["type"], f["default"])
            else:
                raise BadRecord(f"{path}: missing required field {name!r} ({schema['name']})")
        return out

    def _default(self, schema: Any, default: Any) -> Any:
        # A union's default belongs to its first branch.
        if isinstance(schema, list):
            schema = schema[0]
        return self._convert(schema, default, "default")

    def _union(self, branches: list, obj: Any, path: str) -> Any:
        if obj is None:
            if "null" in branches:
                return None
            raise BadRecord(f"{path}: must not be null (expected {_type_label(branches)})")
        resolved = [self.names.get(b, b) if isinstance(b, str) else b for b in branches]
        # Avro's JSON encoding tags a union value with its type name: accept it.
        if isinstance(obj, dict) and len(obj) == 1:
            (tag, inner), = obj.items()
            for b in resolved:
                if isinstance(b, dict) and self.names.get(tag) is b:
                    return self._convert(b, inner, path)
        errors = []
        for b in resolved:
            if b == "null":
                continue
            try:
                return self._convert(b, obj, path)
            except BadRecord as e:
                errors.append(str(e))
        if isinstance(obj, dict):
            # Name the record branches so the operator can see the options.
            options = [b["name"] for b in resolved if isinstance(b, dict) and b.get("type") == "record"]
            if options:
                raise BadRecord(
                    f"{path}: matches none of {', '.join(options)} "
                    f"(fields given: {', '.join(sorted(obj)) or 'none'})"
                )
        raise BadRecord(errors[0] if len(errors) == 1 else f"{path}: expected {_type_label(branches)}")


# --- the codec -------------------------------------------------------------


class Codec:
    """Encodes and decodes the values of one set of topics.

    `fetch_schema(schema_id) -> dict | None` gives a writer schema by id; it is
    called once per id (results are cached, so a worker keeps decoding known
    ids while the registry is unreachable).
    `register(subject, schema) -> id` registers a reader schema.
    """

    def __init__(self, schemas: dict[str, dict], fetch_schema: Callable[[int], dict | None],
                 register: Callable[[str, dict], int] | None = None,
                 subject: Callable[[str], str] = lambda topic: f"{topic}-value"):
        self.schemas = schemas  # logical topic -> reader schema (JSON)
        self._parsed = {t: fastavro.parse_schema(s) for t, s in schemas.items()}
        # Compiled to Python per schema (alarm_engine.avro_compiled): the plain datums of the
        # hot path, 3x faster to write than fastavro's per-call set-up; None: fastavro only.
        self._fast_write = {t: compile_writer(s) for t, s in schemas.items()}
        self._fast_read = {t: compile_reader(s) for t, s in schemas.items()}
        self._headers: dict[str, bytes] = {}
        self._json = {t: JsonReader(s) for t, s in schemas.items()}
        self._defaults: dict[str, tuple[str, ...]] = {}
        self._fetch = fetch_schema
        self._register = register
        self.subject = subject
        self._writer_ids: dict[str, int] = {}
        self._writers: dict[int, Any] = {}
        # Schema ids whose writer schema is the topic's reader schema: read without resolution
        # (fastavro's schema resolution doubles the time of a decode).
        self._same: dict[int, str] = {}

    # Writer side: our own schema, registered under the TopicNameStrategy subject.
    def schema_id(self, topic: str) -> int:
        if topic not in self._writer_ids:
            if self._register is None:
                raise RuntimeError("this codec cannot register schemas")
            sid = self._register(self.subject(topic), self.schemas[topic])
            self._writer_ids[topic] = sid
            self._writers[sid] = self._parsed[topic]
            self._same[sid] = topic
        return self._writer_ids[topic]

    def encode(self, topic: str, datum: dict | None) -> bytes | None:
        if datum is None:
            return None
        header = self._headers.get(topic)
        if header is None:
            header = self._headers[topic] = _HEADER.pack(MAGIC, self.schema_id(topic))
        fast = self._fast_write[topic]
        if fast is not None:
            try:
                return fast(header, datum)
            except (Fallback, KeyError):
                pass  # a field left to its default, or not the plain case: fastavro says
        buf = io.BytesIO()
        buf.write(header)
        try:
            # Strict (unknown fields are errors), but a top-level field the schema gives a
            # default may be left out: producers written before a field was added keep working.
            missing = [f for f in self._defaulted(topic) if f not in datum]
            if missing:
                datum = {**datum, **{f: self._json[topic].default_of(f) for f in missing}}
            fastavro.schemaless_writer(buf, self._parsed[topic], datum, strict=True)
        except (ValueError, TypeError, KeyError) as e:
            raise BadRecord(f"cannot encode as {topic}: {e}") from e
        return buf.getvalue()

    def _defaulted(self, topic: str) -> tuple[str, ...]:
        names = self._defaults.get(topic)
        if names is None:
            names = self._defaults[topic] = tuple(
                f["name"] for f in self.schemas[topic]["fields"] if "default" in f)
        return names

    def encode_json(self, topic: str, datum: dict | None) -> bytes | None:
        return None if datum is None else json.dumps(datum, separators=(",", ":")).encode()

    def decode(self, topic: str, raw: bytes | None) -> dict | None:
        """The datum of a record value; None for a tombstone; BadRecord otherwise."""
        if raw is None:
            return None
        if len(raw) == 0:
            raise BadRecord(
                "empty value: to delete a record produce a null value "
                "(kcat -Z, or kafka-console-producer --property null.marker=NULL)"
            )
        if len(raw) > MAX_VALUE_BYTES:
            raise BadRecord(f"value of {len(raw)} bytes exceeds the {MAX_VALUE_BYTES}-byte limit")
        if raw[0] == MAGIC:
            return self._decode_avro(topic, raw)
        if raw.lstrip()[:1] == b"{":
            return self._decode_json(topic, raw)
        raise BadRecord(
            f"neither Confluent-framed Avro (magic byte 0) nor a JSON object "
            f"(first byte 0x{raw[0]:02x})"
        )

    def _decode_avro(self, topic: str, raw: bytes) -> dict:
        if len(raw) < _HEADER.size:
            raise BadRecord(f"Avro value of {len(raw)} bytes is shorter than its 5-byte header")
        _, sid = _HEADER.unpack_from(raw)
        writer = self._writers.get(sid)
        if writer is None:
            try:
                schema = self._fetch(sid)
            except Exception as e:  # registry down: not the record's fault, the reader retries
                raise RegistryUnavailable(
                    f"schema id {sid}: schema registry unreachable ({e.__class__.__name__}: {e})") from e
            if schema is None:
                raise BadRecord(f"unknown schema id {sid} (not in the schema registry)")
            try:
                writer = self._writers[sid] = fastavro.parse_schema(schema)
            except Exception as e:
                raise BadRecord(f"schema id {sid} is not a usable Avro schema: {e}") from e
            if schema == self.schemas.get(topic):
                self._same[sid] = topic
        same = self._same.get(sid) == topic
        fast = self._fast_read[topic] if same else None
        if fast is not None:
            try:
                return fast(raw, _HEADER.size)
            except _READ_FALLBACK:
                pass  # fastavro reads it, or says what is wrong with it
        body = io.BytesIO(raw[_HEADER.size:])
        try:
            reader = None if same else self._parsed[topic]
            datum = fastavro.schemaless_reader(body, writer, reader)
        except Exception as e:
            raise BadRecord(
                f"Avro body does not decode with schema id {sid} as {topic}: "
                f"{e.__class__.__name__}: {e}"
            ) from e
        if body.tell() != len(raw) - _HEADER.size:
            raise BadRecord(f"Avro body has {len(raw) - _HEADER.size - body.tell()} trailing bytes")
        return datum

    def _decode_json(self, topic: str, raw: bytes) -> dict:
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise BadRecord(f"JSON value is not UTF-8: {e}") from e
        except (ValueError, RecursionError) as e:
            raise BadRecord(f"malformed JSON: {e}") from e
        return self._json[topic].read(obj)


def decode_key(raw: bytes | None) -> str:
    """Keys are plain UTF-8 strings (PV name or alarm name)."""
    if raw is None or raw == b"":
        raise BadRecord("missing key: the key must be the PV or alarm name")
    try:
        key = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecord(f"key is not UTF-8: {e}") from e
    if not key.strip() or len(key) > 512 or any(c in key for c in "\x00\n\r"):
        raise BadRecord(f"key {key[:80]!r} is not a usable name")
    return key
