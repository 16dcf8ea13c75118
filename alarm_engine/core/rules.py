"""A small, safe expression language for rule alarms.

Parsed by a hand-written tokenizer and Pratt parser into an immutable AST and
evaluated by a tree walker; Python's eval/compile/ast are never used.

Syntax
------
    `IOC:TEMP`            value of a PV (any non-blank characters but a backquote)
    severity(`PV`)        the PV's EPICS severity as 0..3 (INVALID when not connected)
    connected(`PV`)       true/false
    abs(x) min(a, ...) max(a, ...)
    12  1.5  1e3  "text"  true  false  NO_ALARM MINOR MAJOR INVALID (= 0..3)
    + - * / %   unary -   < <= > >= == !=   and or not   && || !   ( )

Precedence, loosest first (all binary operators are left-associative except
comparisons, which cannot be chained: `a < b < c` is an error):

    or ||  <  and &&  <  not !  <  comparisons  <  + -  <  * / %  <  unary -

`not`/`!` bind like Python's `not` (so `!a == b` is `!(a == b)`); they may
not appear as an operand of a comparison or arithmetic without parentheses.

Values and "unknown"
--------------------
Values are numbers (int/float), strings, booleans, or None meaning unknown.
Unknown arises from: a PV missing from the environment, not connected, or
without a value; a NaN; a type mismatch (arithmetic on non-numbers, comparing
a number with a string, ordering booleans); division or modulo by zero.
Unknown propagates through arithmetic and comparisons; and/or/not use Kleene
three-valued logic (`false and unknown` is false, `true or unknown` is true).
Truth of a value: booleans are themselves, numbers are true when non-zero,
anything else (strings, waveforms) is unknown.

Limits: MAX_TEXT_LENGTH characters, MAX_DEPTH nesting (of the parse and of the
tree), MAX_NODES nodes. Exceeding any of them is a RuleError.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Union

from alarm_engine.core.model import Connection, PVState, Severity

MAX_TEXT_LENGTH = 4096
MAX_DEPTH = 64
MAX_NODES = 1000


class RuleError(ValueError):
    """A rule that does not parse. `position` is the 0-based character offset."""

    def __init__(self, message: str, position: int) -> None:
        self.message = message
        self.position = position
        super().__init__(f"{message} at column {position + 1}")

    @property
    def column(self) -> int:
        """1-based column, as in the message."""
        return self.position + 1

    def __reduce__(self):  # keep pickling (e.g. across processes) working
        return (RuleError, (self.message, self.position))


# --------------------------------------------------------------------- AST


def _depth(*children: "Node") -> int:
    return 1 + max((c.depth for c in children), default=0)


@dataclass(frozen=True)
class Literal:
    value: Union[int, float, str, bool]
    depth: int = field(default=1, init=False, repr=False, compare=False)


@dataclass(frozen=True)
class PVRef:
    """`PV` (what='value'), severity(`PV`) or connected(`PV`)."""

    name: str
    what: str = "value"
    depth: int = field(default=1, init=False, repr=False, compare=False)


@dataclass(frozen=True)
class Neg:
    operand: "Node"
    depth: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "depth", _depth(self.operand))


@dataclass(frozen=True)
class Not:
    operand: "Node"
    depth: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "depth", _depth(self.operand))


@dataclass(frozen=True)
class Binary:
    """Arithmetic (+ - * / %) or comparison (< <= > >= == !=)."""

    op: str
    left: "Node"
    right: "Node"
    depth: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "depth", _depth(self.left, self.right))


@dataclass(frozen=True)
class Logic:
    """'and'/'or' over two or more operands; n-ary so long chains stay shallow."""

    op: str
    operands: tuple
    depth: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "depth", _depth(*self.operands))


@dataclass(frozen=True)
class Call:
    """abs(x), min(...), max(...)."""

    func: str
    args: tuple
    depth: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "depth", _depth(*self.args))


Node = Union[Literal, PVRef, Neg, Not, Binary, Logic, Call]


# --------------------------------------------------------------- tokenizer


@dataclass(frozen=True)
class _Token:
    kind: str  # 'num' 'str' 'pv' 'name' 'op' 'end'
    text: str
    pos: int
    value: object = None


# Longest first, so that '<=' wins over '<'.
_OPERATORS = ("<=", ">=", "==", "!=", "&&", "||", "<", ">", "+", "-", "*", "/", "%", "(", ")", ",", "!")
_DIGITS = frozenset("0123456789")
_NAME_START = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_NAME_CHARS = _NAME_START | _DIGITS
_BLANKS = frozenset(" \t\r\n")


def _describe(ch: str) -> str:
    return repr(ch) if ch.isprintable() else f"U+{ord(ch):04X}"


def _scan_number(text: str, i: int) -> tuple[_Token, int]:
    start, n = i, len(text)
    while i < n and text[i] in _DIGITS:
        i += 1
    is_float = False
    if i < n and text[i] == ".":
        is_float = True
        i += 1
        while i < n and text[i] in _DIGITS:
            i += 1
    if i < n and text[i] in "eE":
        is_float = True
        i += 1
        if i < n and text[i] in "+-":
            i += 1
        if i >= n or text[i] not in _DIGITS:
            raise RuleError("malformed number", start)
        while i < n and text[i] in _DIGITS:
            i += 1
    literal = text[start:i]
    # '1.2.3', '12abc', '.' alone: reject rather than split into odd tokens.
    if literal == "." or (i < n and (text[i] in _NAME_CHARS or text[i] == ".")):
        raise RuleError("malformed number", start)
    if is_float:
        value: Union[int, float] = float(literal)
        if not math.isfinite(value):
            raise RuleError("number out of range", start)
    else:
        value = int(literal)
    return _Token("num", literal, start, value), i


def _scan_string(text: str, i: int) -> tuple[_Token, int]:
    start, n = i, len(text)
    i += 1
    chars = []
    while i < n:
        ch = text[i]
        if ch == '"':
            return _Token("str", text[start : i + 1], start, "".join(chars)), i + 1
        if ch == "\\":
            if i + 1 < n and text[i + 1] in '"\\':
                chars.append(text[i + 1])
                i += 2
                continue
            raise RuleError('bad escape in string (only \\" and \\\\ are allowed)', i)
        chars.append(ch)
        i += 1
    raise RuleError("unterminated string", start)


def _scan_pv(text: str, i: int) -> tuple[_Token, int]:
    start = i
    end = text.find("`", i + 1)
    if end < 0:
        raise RuleError("unterminated PV name (missing closing backquote)", start)
    name = text[i + 1 : end]
    if not name:
        raise RuleError("empty PV name", start)
    for k, ch in enumerate(name):
        if not ch.isprintable() or ch.isspace():
            raise RuleError(f"invalid character {_describe(ch)} in PV name", start + 1 + k)
    return _Token("pv", text[start : end + 1], start, name), end + 1


def _tokenize(text: str) -> list[_Token]:
    tokens = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in _BLANKS:
            i += 1
        elif ch in _DIGITS or (ch == "." and i + 1 < n and text[i + 1] in _DIGITS):
            tok, i = _scan_number(text, i)
            tokens.append(tok)
        elif ch == '"':
            tok, i = _scan_string(text, i)
            tokens.append(tok)
        elif ch == "`":
            tok, i = _scan_pv(text, i)
            tokens.append(tok)
        elif ch in _NAME_START:
            j = i + 1
            while j < n and text[j] in _NAME_CHARS:
                j += 1
            tokens.append(_Token("name", text[i:j], i))
            i = j
        else:
            for op in _OPERATORS:
                if text.startswith(op, i):
                    tokens.append(_Token("op", op, i))
                    i += len(op)
                    break
            else:
                hint = "; did you mean '=='?" if ch == "=" else ""
                raise RuleError(f"unexpected character {_describe(ch)}{hint}", i)
    tokens.append(_Token("end", "", n))
    return tokens


# ------------------------------------------------------------------ parser

# Binding powers of infix operators (higher binds tighter).
_OR, _AND, _NOT, _CMP, _ADD, _MUL = 1, 2, 3, 4, 5, 6
_INFIX = {
    "or": ("or", _OR), "||": ("or", _OR),
    "and": ("and", _AND), "&&": ("and", _AND),
    "<": ("<", _CMP), "<=": ("<=", _CMP), ">": (">", _CMP), ">=": (">=", _CMP),
    "==": ("==", _CMP), "!=": ("!=", _CMP),
    "+": ("+", _ADD), "-": ("-", _ADD),
    "*": ("*", _MUL), "/": ("/", _MUL), "%": ("%", _MUL),
}  # fmt: skip
_CONSTANTS = {"true": True, "false": False, **{s.name: int(s) for s in Severity}}
_PV_FUNCTIONS = ("severity", "connected")
_FUNCTIONS = {"abs": (1, 1), "min": (1, None), "max": (1, None)}


def _infix_key(tok: _Token) -> str | None:
    if tok.kind == "op" or (tok.kind == "name" and tok.text in ("and", "or")):
        return tok.text
    return None


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.i = 0
        self.depth = 0
        self.nodes = 0

    # -- helpers
    def peek(self) -> _Token:
        return self.tokens[self.i]

    def advance(self) -> _Token:
        tok = self.tokens[self.i]
        if tok.kind != "end":
            self.i += 1
        return tok

    @staticmethod
    def unexpected(tok: _Token) -> RuleError:
        if tok.kind == "end":
            return RuleError("unexpected end of expression", tok.pos)
        return RuleError(f"unexpected {tok.text!r}", tok.pos)

    def expect(self, text: str) -> _Token:
        tok = self.advance()
        if tok.kind != "op" or tok.text != text:
            raise RuleError(f"expected {text!r} but found {self._found(tok)}", tok.pos)
        return tok

    @staticmethod
    def _found(tok: _Token) -> str:
        return "end of expression" if tok.kind == "end" else repr(tok.text)

    def node(self, node: Node, pos: int) -> Node:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise RuleError(f"expression too large (more than {MAX_NODES} nodes)", pos)
        if node.depth > MAX_DEPTH:
            raise RuleError(f"expression nested too deeply (more than {MAX_DEPTH} levels)", pos)
        return node

    # -- grammar
    def parse(self) -> Node:
        root = self.expr(0)
        tok = self.peek()
        if tok.kind != "end":
            raise self.unexpected(tok)
        return root

    def expr(self, min_bp: int) -> Node:
        start = self.peek()
        self.depth += 1
        # Guards the recursion itself; a RecursionError must never escape.
        if self.depth > MAX_DEPTH:
            raise RuleError(f"expression nested too deeply (more than {MAX_DEPTH} levels)", start.pos)
        left = self.prefix(min_bp)
        after_comparison = False
        while True:
            tok = self.peek()
            if tok.kind == "end" or (tok.kind == "op" and tok.text in (")", ",")):
                break  # the caller decides whether this terminator is welcome
            key = _infix_key(tok)
            if key not in _INFIX:  # an operand, '(' or '!' right after an operand
                raise self.unexpected(tok)
            op, bp = _INFIX[key]
            if bp <= min_bp:
                break
            if bp == _CMP and after_comparison:
                raise RuleError("comparisons cannot be chained; use 'and'", tok.pos)
            self.advance()
            if op in ("and", "or"):
                # Collect the whole chain into one n-ary node.
                operands = [left, self.expr(bp)]
                while (k := _infix_key(self.peek())) in _INFIX and _INFIX[k] == (op, bp):
                    self.advance()
                    operands.append(self.expr(bp))
                left = self.node(Logic(op, tuple(operands)), tok.pos)
            else:
                left = self.node(Binary(op, left, self.expr(bp)), tok.pos)
            after_comparison = bp == _CMP
        self.depth -= 1
        return left

    def prefix(self, min_bp: int) -> Node:
        tok = self.advance()
        if tok.kind in ("num", "str"):
            return self.node(Literal(tok.value), tok.pos)
        if tok.kind == "pv":
            return self.node(PVRef(tok.value), tok.pos)
        if tok.kind == "op":
            if tok.text == "(":
                inner = self.expr(0)
                self.expect(")")
                return inner
            if tok.text == "-":
                # Binds tighter than every binary operator: -a*b is (-a)*b.
                return self.node(Neg(self.expr(_MUL)), tok.pos)
            if tok.text == "!":
                return self.not_(tok, min_bp)
            raise self.unexpected(tok)
        if tok.kind == "name":
            if tok.text == "not":
                return self.not_(tok, min_bp)
            if tok.text in _CONSTANTS:
                return self.node(Literal(_CONSTANTS[tok.text]), tok.pos)
            if tok.text in _PV_FUNCTIONS:
                return self.pv_function(tok)
            if tok.text in _FUNCTIONS:
                return self.function(tok)
            if self.peek().kind == "op" and self.peek().text == "(":
                known = ", ".join((*_PV_FUNCTIONS, *_FUNCTIONS))
                raise RuleError(f"unknown function {tok.text!r} (known: {known})", tok.pos)
            raise RuleError(
                f"unknown name {tok.text!r} (write PV names in backquotes, e.g. `{tok.text}`)", tok.pos
            )
        raise self.unexpected(tok)

    def not_(self, tok: _Token, min_bp: int) -> Node:
        if min_bp >= _NOT:
            raise RuleError(f"{tok.text!r} needs parentheses here", tok.pos)
        return self.node(Not(self.expr(_AND)), tok.pos)

    def pv_function(self, tok: _Token) -> Node:
        self.expect("(")
        arg = self.advance()
        if arg.kind != "pv":
            raise RuleError(f"{tok.text}() takes a PV name in backquotes, e.g. {tok.text}(`IOC:PV`)", arg.pos)
        self.expect(")")
        return self.node(PVRef(arg.value, tok.text), tok.pos)

    def function(self, tok: _Token) -> Node:
        self.expect("(")
        args = [self.expr(0)]
        while self.peek().kind == "op" and self.peek().text == ",":
            self.advance()
            args.append(self.expr(0))
        close = self.expect(")")
        low, high = _FUNCTIONS[tok.text]
        if len(args) < low or (high is not None and len(args) > high):
            wanted = f"exactly {low}" if low == high else f"at least {low}"
            raise RuleError(f"{tok.text}() takes {wanted} argument(s), got {len(args)}", close.pos)
        return self.node(Call(tok.text, tuple(args)), tok.pos)


# -------------------------------------------------------------- evaluation


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _known(v: object) -> object:
    """Map NaN to unknown so that it never leaks into comparisons."""
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def truth(v: object) -> bool | None:
    """Three-valued truth of a value."""
    if isinstance(v, bool):
        return v
    if _is_num(v):
        return v != 0
    return None


def _arith(op: str, a: object, b: object) -> object:
    if not (_is_num(a) and _is_num(b)):
        return None
    try:
        if op == "+":
            r = a + b
        elif op == "-":
            r = a - b
        elif op == "*":
            r = a * b
        elif op == "/":
            r = a / b
        else:
            r = a % b
    except (ArithmeticError, ValueError):  # zero division, int too large for float
        return None
    return _known(r)


def _compare(op: str, a: object, b: object) -> bool | None:
    comparable = (_is_num(a) and _is_num(b)) or (isinstance(a, str) and isinstance(b, str))
    if not comparable:
        # Booleans only support equality; everything else mixed is a type error.
        if isinstance(a, bool) and isinstance(b, bool) and op in ("==", "!="):
            return (a == b) == (op == "==")
        return None
    try:
        if op == "<":
            return a < b
        if op == "<=":
            return a <= b
        if op == ">":
            return a > b
        if op == ">=":
            return a >= b
        if op == "==":
            return a == b
        return a != b
    except (ArithmeticError, ValueError):  # huge int vs float
        return None


def _pv(ref: PVRef, env: Mapping[str, PVState]) -> object:
    state = env.get(ref.name)
    if state is None:
        return None
    connected = state.connection is Connection.CONNECTED
    if ref.what == "connected":
        return connected
    if ref.what == "severity":
        # A PV that is not connected has no trustworthy severity: INVALID.
        return int(state.severity) if connected else int(Severity.INVALID)
    if not connected:
        return None
    value = state.value
    if isinstance(value, (list, tuple)):
        return tuple(value)  # waveforms: only a type error in any operation
    return _known(value)


def _eval(node: Node, env: Mapping[str, PVState]) -> object:
    if isinstance(node, Literal):
        return node.value
    if isinstance(node, PVRef):
        return _pv(node, env)
    if isinstance(node, Binary):
        a = _eval(node.left, env)
        b = _eval(node.right, env)
        if node.op in ("+", "-", "*", "/", "%"):
            return _arith(node.op, a, b)
        return _compare(node.op, a, b)
    if isinstance(node, Logic):
        # Kleene: a deciding operand wins regardless of unknowns; stop early.
        decisive = node.op == "or"
        unknown = False
        for operand in node.operands:
            t = truth(_eval(operand, env))
            if t is decisive:
                return decisive
            if t is None:
                unknown = True
        return None if unknown else not decisive
    if isinstance(node, Not):
        t = truth(_eval(node.operand, env))
        return None if t is None else not t
    if isinstance(node, Neg):
        v = _eval(node.operand, env)
        return -v if _is_num(v) else None
    if isinstance(node, Call):
        args = [_eval(a, env) for a in node.args]
        if not all(_is_num(a) for a in args):
            return None
        if node.func == "abs":
            return abs(args[0])
        try:
            return min(args) if node.func == "min" else max(args)
        except (ArithmeticError, ValueError):
            return None
    raise TypeError(f"not a rule node: {node!r}")


def _collect_pvs(node: Node, out: set[str]) -> None:
    if isinstance(node, PVRef):
        out.add(node.name)
    elif isinstance(node, (Neg, Not)):
        _collect_pvs(node.operand, out)
    elif isinstance(node, Binary):
        _collect_pvs(node.left, out)
        _collect_pvs(node.right, out)
    elif isinstance(node, Logic):
        for o in node.operands:
            _collect_pvs(o, out)
    elif isinstance(node, Call):
        for a in node.args:
            _collect_pvs(a, out)


# ------------------------------------------------------------------ public


@dataclass(frozen=True)
class Rule:
    """A parsed rule expression."""

    text: str
    root: Node = field(repr=False)
    pvs: frozenset = field(default=frozenset(), repr=False)

    def value(self, env: Mapping[str, PVState]) -> object:
        """The raw value of the expression (None = unknown)."""
        return _eval(self.root, env)

    def evaluate(self, env: Mapping[str, PVState]) -> bool | None:
        """True/False whether the rule holds, None when unknown."""
        return truth(self.value(env))


def parse(text: str) -> Rule:
    """Parse a rule expression; raises RuleError on any problem."""
    if not isinstance(text, str):
        raise TypeError(f"rule expression must be a str, not {type(text).__name__}")
    if len(text) > MAX_TEXT_LENGTH:
        raise RuleError(f"expression too long ({len(text)} characters, max {MAX_TEXT_LENGTH})", MAX_TEXT_LENGTH)
    root = _Parser(text).parse()
    pvs: set[str] = set()
    _collect_pvs(root, pvs)
    return Rule(text, root, frozenset(pvs))
