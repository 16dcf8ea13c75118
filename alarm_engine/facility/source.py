"""YAML and JSON documents with the line of every mapping key.

PyYAML composes the node tree (in C when libyaml is there); this module builds plain
values from it with its own scalar rules, those of YAML 1.2's core schema: only
true/false, null/~, and plain numbers are typed, everything else is a string. YAML 1.1's
extra rules would turn a PV named ON into True and 1:30 into 90. A key given twice in
one mapping is an error (PyYAML would keep the last silently).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import yaml

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_INT = re.compile(r"[-+]?[0-9]+\Z")
_HEX = re.compile(r"0x[0-9a-fA-F]+\Z")
_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?\Z")
_SPECIAL = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False,
            "null": None, "Null": None, "NULL": None, "~": None, "": None,
            ".inf": float("inf"), "+.inf": float("inf"), "-.inf": float("-inf"), ".nan": float("nan")}


@dataclass(frozen=True)
class Problem:
    """One error of a file: FILE:LINE: field: reason."""

    file: str
    line: int
    field: str
    reason: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.field}: {self.reason}" if self.field else f"{where}: {self.reason}"


class Mapping(dict):
    """A dict that remembers its own line and the line of each key (1-based)."""

    __slots__ = ("line", "key_lines")

    def __init__(self, line: int = 0):
        super().__init__()
        self.line = line
        self.key_lines: dict[str, int] = {}

    def line_of(self, key) -> int:
        return self.key_lines.get(key, self.line)


class Sequence(list):
    __slots__ = ("line",)

    def __init__(self, items=(), line: int = 0):
        super().__init__(items)
        self.line = line


def scalar(node: yaml.ScalarNode):
    if node.style:  # quoted or block: always a string (plain is None, or "" from libyaml)
        return node.value
    text = node.value
    if text in _SPECIAL:
        return _SPECIAL[text]
    if _INT.match(text):
        return int(text)
    if _HEX.match(text):
        return int(text, 16)
    if _FLOAT.match(text):
        return float(text)
    return text


def _key_text(node) -> str | None:
    if isinstance(node, yaml.ScalarNode):
        return node.value  # a key is a name, never typed
    return None


_COLLECTIONS = ("alarms", "monitored", "locations")


def _child_label(label: str, key: str) -> str:
    if label.endswith(_COLLECTIONS):
        return f"{label}[{key}]"
    return f"{label}.{key}" if label else key


def build(node, file: str, problems: list[Problem], _memo=None, label: str = ""):
    """Plain values (Mapping, Sequence, scalars) from a composed node tree."""
    memo = {} if _memo is None else _memo
    if id(node) in memo:  # an alias: the same node again (linear, even for alias bombs)
        return memo[id(node)]
    line = node.start_mark.line + 1
    if isinstance(node, yaml.ScalarNode):
        value = scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = Sequence(line=line)
        memo[id(node)] = value
        value.extend(build(n, file, problems, memo, f"{label}[{i}]") for i, n in enumerate(node.value))
    else:
        value = Mapping(line)
        memo[id(node)] = value
        merged: list[Mapping] = []
        for knode, vnode in node.value:
            if knode.tag == "tag:yaml.org,2002:merge":
                src = build(vnode, file, problems, memo, label)
                merged.extend(src if isinstance(src, list) else [src])
                continue
            key = _key_text(knode)
            kline = knode.start_mark.line + 1
            if key is None:
                problems.append(Problem(file, kline, label, "a key must be a plain name, not a list or mapping"))
                continue
            if key in value:
                problems.append(Problem(file, kline, _child_label(label, key),
                                        f"duplicate key (first at line {value.key_lines[key]})"))
                continue
            value[key] = build(vnode, file, problems, memo, _child_label(label, key))
            value.key_lines[key] = kline
        for src in merged:  # `<<: *defaults`: keys given here win
            if isinstance(src, Mapping):
                for k, v in src.items():
                    if k not in value:
                        value[k] = v
                        value.key_lines[k] = src.line_of(k)
    memo[id(node)] = value
    return value


def from_plain(obj):
    """Mapping/Sequence (without lines) from plain dicts and lists, e.g. an importer's output."""
    if isinstance(obj, dict) and not isinstance(obj, Mapping):
        m = Mapping(0)
        for k, v in obj.items():
            m[k] = from_plain(v)
        return m
    if isinstance(obj, list) and not isinstance(obj, Sequence):
        return Sequence([from_plain(x) for x in obj])
    return obj


def parse(text: str, file: str) -> tuple[object, list[Problem]]:
    """The document of a YAML or JSON text, and its syntax problems."""
    problems: list[Problem] = []
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 0
        reason = " ".join(x for x in (e.context, e.problem) if x) or str(e)
        return None, [Problem(file, line, "", f"not valid YAML/JSON: {reason}")]
    except yaml.YAMLError as e:
        return None, [Problem(file, 0, "", f"not valid YAML/JSON: {e}")]
    if node is None:
        return Mapping(1), problems
    return build(node, file, problems), problems


def load(path: str) -> tuple[object, list[Problem]]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        return None, [Problem(path, 0, "", f"cannot read: {e}")]
    return parse(text, path)
