"""Avro binary encoding and decoding compiled to Python for one schema: the hot path's codec.

fastavro's `schemaless_writer`/`schemaless_reader` cost 13 µs and 6 µs per call on the
engine's small records, most of it per-call set-up (a Writer or Reader, named-schema
maps, options), which a flood pays for every record. Here a schema is turned once into
the source of one function per direction, with each field's bytes written or read
inline (the Avro 1.11 binary encoding: zig-zag varints, length-prefixed UTF-8,
little-endian IEEE doubles, union branch index, array blocks).

Both directions only take the plain case and give up on anything else:

- the writer accepts exactly the Python types fastavro's strict writer gives for the
  schema (str for string and enum, int for long, float for double, None for null,
  dict with exactly the record's fields, list for arrays, dict with str keys for maps) and raises `Fallback` for any
  other datum, so the caller runs fastavro, which encodes it or says why it cannot;
- the reader reads a body written with this very schema (no schema resolution) and
  raises `Fallback` on a truncated or malformed body, an unknown enum index or a
  bad union branch, for the same reason.

Schemas the compiler does not cover (logical types, a union where the branch depends on
more than the Python type, an enum's symbols or a record's field names, fixed, recursion)
compile to None: fastavro is used.
Property tests compare both functions with fastavro on generated data
(tests/unit/test_avro_compiled.py).
"""

from __future__ import annotations

import struct
from typing import Any, Callable

_DOUBLE = struct.Struct("<d")
_FLOAT = struct.Struct("<f")
_LONG_MIN, _LONG_MAX = -(2**63), 2**63 - 1
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1


class Fallback(Exception):
    """This datum or body is not the plain case: let fastavro handle it."""


class _Unsupported(Exception):
    pass


def _varint(n: int) -> bytes:
    """Zig-zag varint of a long (a constant of the generated code)."""
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def _put_long(b: bytearray, n: int) -> None:
    if n.__class__ is not int or not _LONG_MIN <= n <= _LONG_MAX:
        raise Fallback
    z = (n << 1) ^ (n >> 63)
    while z > 0x7F:
        b.append((z & 0x7F) | 0x80)
        z >>= 7
    b.append(z)


def _put_str(b: bytearray, s: str) -> None:
    if s.__class__ is not str:
        raise Fallback
    raw = s.encode("utf-8")
    _put_long(b, len(raw))
    b += raw


def _get_long(buf: bytes, pos: int) -> tuple[int, int]:
    shift = z = 0
    while True:
        byte = buf[pos]  # IndexError on a truncated body
        pos += 1
        z |= (byte & 0x7F) << shift
        if byte < 0x80:
            break
        shift += 7
        if shift > 63:
            raise Fallback
    return (z >> 1) ^ -(z & 1), pos


def _get_str(buf: bytes, pos: int) -> tuple[str, int]:
    n, pos = _get_long(buf, pos)
    end = pos + n
    if n < 0 or end > len(buf):
        raise Fallback
    return buf[pos:end].decode("utf-8"), end


class _Gen:
    """Writes the source of one function; `names` holds the constants it refers to."""

    def __init__(self, named: dict[str, dict]):
        self.lines: list[str] = []
        self.names: dict[str, Any] = {}
        self.named = named
        self.n = 0
        self.active: set[str] = set()  # named types being compiled (recursion is not supported)

    def var(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def const(self, value: Any, prefix: str = "K") -> str:
        name = self.var(prefix)
        self.names[name] = value
        return name

    def emit(self, depth: int, line: str) -> None:
        self.lines.append("    " * depth + line)

    def resolve(self, schema: Any) -> Any:
        if isinstance(schema, str) and schema in self.named:
            return self.named[schema]
        if isinstance(schema, dict) and isinstance(schema.get("type"), (dict, list)):
            return schema["type"]
        if isinstance(schema, dict) and schema.get("type") in _PRIMITIVES and len(
                [k for k in schema if k not in ("type", "doc")]) == 0:
            return schema["type"]
        return schema


_PRIMITIVES = ("null", "boolean", "int", "long", "float", "double", "bytes", "string")


def _kind(schema: Any) -> str:
    if isinstance(schema, str):
        return schema
    if isinstance(schema, list):
        return "union"
    if "logicalType" in schema:
        raise _Unsupported("logical type")
    return schema["type"]


# Which Python type a branch takes in the writer.
_PY_TYPE = {"null": "NoneType", "boolean": "bool", "int": "int", "long": "int", "float": "float",
            "double": "float", "string": "str", "bytes": "bytes", "enum": "str", "record": "dict",
            "array": "list", "map": "dict"}


def _union_branches(g: _Gen, schema: list) -> list[tuple[int, Any, str, str]]:
    """(index, branch, kind, test) per branch, the tests tried in order: each is true only
    for datums fastavro's writer would write with that branch. fastavro takes the first
    branch a datum validates against, except that among records it takes the one sharing
    the most fields with the datum; here a record is chosen by exactly its field names."""
    branches, taken, records = [], set(), []
    for i, b in enumerate(schema):
        b = g.resolve(b)
        kind = _kind(b)
        if kind not in _PY_TYPE:
            raise _Unsupported(f"union branch {kind}")
        py = _PY_TYPE[kind]
        if kind == "enum":
            test = f"{{v}}.__class__ is str and {{v}} in {g.const(frozenset(b['symbols']), 'K')}"
        elif kind == "record":
            names = frozenset(f["name"] for f in b["fields"])
            # A record whose fields are a subset of another's could tie with it in
            # fastavro's count (the other's extra fields defaulted): not covered.
            if any(names <= other or other <= names for other in records):
                raise _Unsupported("records of a union that share their fields")
            records.append(names)
            test = f"{{v}}.__class__ is dict and {{v}}.keys() == {g.const(names, 'K')}"
        elif py == "NoneType":
            test = "{v} is None"
        else:
            test = f"{{v}}.__class__ is {py}"
        # An int also validates as float/double; a map takes any dict a record would. Two
        # branches of one type otherwise are tried in fastavro's order (a datum the first
        # one's writer refuses falls back to fastavro as a whole).
        if (py == "int" and "float" in taken) or (kind in ("map", "record") and "map" in taken) \
                or (kind == "map" and records):
            raise _Unsupported("ambiguous union")
        taken.add("map" if kind == "map" else py)
        branches.append((i, b, kind, test))
    return branches


def _write(g: _Gen, schema: Any, v: str, depth: int) -> None:
    schema = g.resolve(schema)
    kind = _kind(schema)
    if kind == "null":
        g.emit(depth, f"if {v} is not None: raise Fallback")
    elif kind == "boolean":
        g.emit(depth, f"if {v}.__class__ is not bool: raise Fallback")
        g.emit(depth, f"b.append(1 if {v} else 0)")
    elif kind == "int":
        g.emit(depth, f"if {v}.__class__ is not int or not {_INT_MIN} <= {v} <= {_INT_MAX}: raise Fallback")
        g.emit(depth, f"put_long(b, {v})")
    elif kind == "long":
        g.emit(depth, f"put_long(b, {v})")
    elif kind == "double":
        g.emit(depth, f"if {v}.__class__ is not float: raise Fallback")
        g.emit(depth, f"b += pack_double({v})")
    elif kind == "float":
        g.emit(depth, f"if {v}.__class__ is not float: raise Fallback")
        g.emit(depth, f"b += pack_float({v})")
    elif kind == "string":
        g.emit(depth, f"put_str(b, {v})")
    elif kind == "bytes":
        g.emit(depth, f"if {v}.__class__ is not bytes: raise Fallback")
        g.emit(depth, f"put_long(b, len({v})); b += {v}")
    elif kind == "enum":
        table = g.const({s: _varint(i) for i, s in enumerate(schema["symbols"])}, "E")
        g.emit(depth, f"if {v}.__class__ is not str or {v} not in {table}: raise Fallback")
        g.emit(depth, f"b += {table}[{v}]")
    elif kind == "record":
        name = schema.get("name")
        if name in g.active:
            raise _Unsupported("recursive record")
        g.active.add(name)
        fields = schema["fields"]
        g.emit(depth, f"if {v}.__class__ is not dict or len({v}) != {len(fields)}: raise Fallback")
        for f in fields:
            fv = g.var("v")
            g.emit(depth, f"{fv} = {v}[{f['name']!r}]")  # KeyError: a field missing
            _write(g, f["type"], fv, depth)
        g.active.discard(name)
    elif kind == "array":
        item = g.var("i")
        g.emit(depth, f"if {v}.__class__ is not list: raise Fallback")
        g.emit(depth, f"if {v}:")
        g.emit(depth + 1, f"put_long(b, len({v}))")
        g.emit(depth + 1, f"for {item} in {v}:")
        _write(g, schema["items"], item, depth + 2)
        g.emit(depth, "b.append(0)")
    elif kind == "map":
        key, item = g.var("k"), g.var("i")
        g.emit(depth, f"if {v}.__class__ is not dict: raise Fallback")
        g.emit(depth, f"if {v}:")
        g.emit(depth + 1, f"put_long(b, len({v}))")
        g.emit(depth + 1, f"for {key}, {item} in {v}.items():")
        g.emit(depth + 2, f"put_str(b, {key})")
        _write(g, schema["values"], item, depth + 2)
        g.emit(depth, "b.append(0)")
    elif kind == "union":
        first = True
        for i, b, bkind, test in _union_branches(g, schema):
            g.emit(depth, f"{'if' if first else 'elif'} {test.format(v=v)}:")
            g.emit(depth + 1, f"b += {_varint(i)!r}")
            _write(g, b, v, depth + 1)
            first = False
        g.emit(depth, "else: raise Fallback")
    else:
        raise _Unsupported(kind)


def _read(g: _Gen, schema: Any, out: str, depth: int) -> None:
    """Code that reads one value at `p` of `buf` into the variable `out` and advances `p`."""
    schema = g.resolve(schema)
    kind = _kind(schema)
    if kind == "null":
        g.emit(depth, f"{out} = None")
    elif kind == "boolean":
        g.emit(depth, "c = buf[p]; p += 1")
        g.emit(depth, "if c > 1: raise Fallback")
        g.emit(depth, f"{out} = c == 1")
    elif kind in ("int", "long"):
        g.emit(depth, "c = buf[p]")
        g.emit(depth, f"if c < 0x80: {out} = (c >> 1) ^ -(c & 1); p += 1")
        g.emit(depth, f"else: {out}, p = get_long(buf, p)")
    elif kind == "double":
        g.emit(depth, f"{out}, = unpack_double(buf, p); p += 8")
    elif kind == "float":
        g.emit(depth, f"{out}, = unpack_float(buf, p); p += 4")
    elif kind == "string":
        g.emit(depth, f"{out}, p = get_str(buf, p)")
    elif kind == "bytes":
        n = g.var("n")
        g.emit(depth, f"{n}, p = get_long(buf, p)")
        g.emit(depth, f"if {n} < 0 or p + {n} > len(buf): raise Fallback")
        g.emit(depth, f"{out} = buf[p:p + {n}]; p += {n}")
    elif kind == "enum":
        symbols = g.const(tuple(schema["symbols"]), "S")
        g.emit(depth, "c = buf[p]")
        g.emit(depth, f"if c >= 0x80 or c & 1 or (c >> 1) >= {len(schema['symbols'])}: raise Fallback")
        g.emit(depth, f"{out} = {symbols}[c >> 1]; p += 1")
    elif kind == "record":
        name = schema.get("name")
        if name in g.active:
            raise _Unsupported("recursive record")
        g.active.add(name)
        names = []
        for f in schema["fields"]:
            fv = g.var("f")
            _read(g, f["type"], fv, depth)
            names.append(f"{f['name']!r}: {fv}")
        g.emit(depth, f"{out} = {{{', '.join(names)}}}")
        g.active.discard(name)
    elif kind == "array":
        n, item = g.var("n"), g.var("x")
        g.emit(depth, f"{out} = []")
        g.emit(depth, "while True:")
        g.emit(depth + 1, f"{n}, p = get_long(buf, p)")
        g.emit(depth + 1, f"if {n} == 0: break")
        g.emit(depth + 1, f"if {n} < 0: {n} = -{n}; _, p = get_long(buf, p)  # a block with its byte size")
        g.emit(depth + 1, f"for _ in range({n}):")
        _read(g, schema["items"], item, depth + 2)
        g.emit(depth + 2, f"{out}.append({item})")
    elif kind == "map":
        n, key, item = g.var("n"), g.var("k"), g.var("x")
        g.emit(depth, f"{out} = {{}}")
        g.emit(depth, "while True:")
        g.emit(depth + 1, f"{n}, p = get_long(buf, p)")
        g.emit(depth + 1, f"if {n} == 0: break")
        g.emit(depth + 1, f"if {n} < 0: {n} = -{n}; _, p = get_long(buf, p)  # a block with its byte size")
        g.emit(depth + 1, f"for _ in range({n}):")
        g.emit(depth + 2, f"{key}, p = get_str(buf, p)")
        _read(g, schema["values"], item, depth + 2)
        g.emit(depth + 2, f"{out}[{key}] = {item}")
    elif kind == "union":
        branches = [(i, g.resolve(b)) for i, b in enumerate(schema)]
        for _, b in branches:
            _kind(b)  # logical types are refused here too
        idx = g.var("u")
        g.emit(depth, "c = buf[p]")
        g.emit(depth, f"if c >= 0x80 or c & 1: raise Fallback")
        g.emit(depth, f"{idx} = c >> 1; p += 1")
        for k, (i, b) in enumerate(branches):
            g.emit(depth, f"{'if' if k == 0 else 'elif'} {idx} == {i}:")
            _read(g, b, out, depth + 1)
        g.emit(depth, "else: raise Fallback")
    else:
        raise _Unsupported(kind)


def _named_types(schema: Any, names: dict, namespace: str | None = None) -> None:
    if isinstance(schema, list):
        for b in schema:
            _named_types(b, names, namespace)
    elif isinstance(schema, dict):
        t = schema.get("type")
        if t in ("record", "enum", "fixed"):
            namespace = schema.get("namespace", namespace)
            names[schema["name"]] = schema
            if namespace:
                names[f"{namespace}.{schema['name']}"] = schema
        elif isinstance(t, (dict, list)):
            _named_types(t, names, namespace)
        for f in schema.get("fields", ()):
            _named_types(f["type"], names, namespace)
        for key in ("items", "values"):
            if key in schema:
                _named_types(schema[key], names, namespace)


_HELPERS = {"Fallback": Fallback, "put_long": _put_long, "put_str": _put_str, "get_long": _get_long,
            "get_str": _get_str, "pack_double": _DOUBLE.pack, "pack_float": _FLOAT.pack,
            "unpack_double": _DOUBLE.unpack_from, "unpack_float": _FLOAT.unpack_from}


def _build(g: _Gen, name: str, head: str, tail: list[str]) -> Callable:
    src = "\n".join([head] + g.lines + tail)
    scope = {**_HELPERS, **g.names}
    exec(compile(src, f"<avro {name}>", "exec"), scope)  # noqa: S102 - source generated from a schema above
    return scope[name]


def compile_writer(schema: dict) -> Callable[[bytes, Any], bytes] | None:
    """`write(header, datum) -> header + Avro body`, or None when the schema is not covered.
    The function raises Fallback (or KeyError) for a datum it does not take."""
    named: dict = {}
    _named_types(schema, named)
    g = _Gen(named)
    try:
        _write(g, schema, "d", 1)
    except _Unsupported:
        return None
    return _build(g, "write", "def write(header, d):\n    b = bytearray(header)", ["    return bytes(b)"])


def compile_reader(schema: dict) -> Callable[[bytes, int], Any] | None:
    """`read(buf, pos) -> datum` of a body that ends the buffer, written with this schema;
    None when the schema is not covered. Raises Fallback (or IndexError, struct.error,
    UnicodeDecodeError) for a body it cannot read, trailing bytes included."""
    named: dict = {}
    _named_types(schema, named)
    g = _Gen(named)
    try:
        _read(g, schema, "out", 1)
    except _Unsupported:
        return None
    return _build(g, "read", "def read(buf, p):", ["    if p != len(buf): raise Fallback", "    return out"])
