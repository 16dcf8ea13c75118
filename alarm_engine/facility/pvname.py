"""What EPICS accepts as a PV name: RECORD[.FIELD][$], then optionally a channel filter.

The record part follows EPICS base's dbRecordNameValidate: printable ASCII, none of
blank, tab, '"', "'", '.', '$'. A field is upper-case letters and digits (e.g. VAL, HIHI,
DESC); '$' after it asks for a long string. A channel filter is a JSON object after the
name (e.g. `T:1.VAL{"dbnd":{"abs":1}}`); it cannot contain blanks here, since a record key
cannot. The backquote is refused too: it delimits PV names in rules.
"""

from __future__ import annotations

import re

_BAD_RECORD_CHARS = set(" \t\"'.$`")
_FIELD = re.compile(r"[A-Z][A-Z0-9_]*\Z")
# Printable ASCII without blanks, quotes, '$', '.', '`' and braces, optionally .FIELD[$].
_USUAL = re.compile(r"[!#%&()*+,/0-9:;<=>?@A-Z\[\\\]^_a-z|~-]+(\.[A-Z][A-Z0-9_]*\$?)?\Z")
MAX_NAME = 512  # records.MAX_NAME: a PV name is a record key


def problem(name: object) -> str | None:
    """Why `name` cannot be an EPICS PV name, or None if it can be."""
    if not isinstance(name, str):
        return f"a PV name must be a string, not {type(name).__name__}"
    if not name:
        return "empty PV name"
    if len(name) > MAX_NAME:
        return f"PV name of {len(name)} characters (at most {MAX_NAME})"
    if _USUAL.match(name):  # most names: one regular expression, no loop
        return None
    for i, ch in enumerate(name):
        if not (" " < ch <= "~"):
            return (f"PV name {name[:80]!r} has character U+{ord(ch):04X} at position {i + 1}: "
                    f"EPICS names are printable ASCII without blanks")
    record, dot, field = name.partition(".")
    brace = field.find("{")
    if brace >= 0:  # a channel filter: rec.FIELD{...} or rec.{...}
        if not field.endswith("}"):
            return f"channel filter {field[brace:][:60]!r} is not a JSON object ({{...}})"
        field = field[:brace]
        if not field:
            dot = ""
    if not record:
        return f"PV name {name[:80]!r} has no record name"
    bad = sorted(set(record) & _BAD_RECORD_CHARS)
    if bad:
        shown = " ".join(repr(c) for c in bad)
        return f"record name {record[:80]!r} contains {shown}, which EPICS does not allow in a record name"
    if dot:
        if field.endswith("$"):
            field = field[:-1]
        if not _FIELD.match(field):
            return (f"field {field[:40]!r} of PV {name[:80]!r} is not a field name "
                    f"(upper-case letters and digits, e.g. VAL, HIHI)")
    return None
