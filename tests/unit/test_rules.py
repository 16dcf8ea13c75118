"""The rule expression language: parsing, errors, limits, evaluation."""

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alarm_engine.core.model import Connection, PVState, Severity
from alarm_engine.core.rules import MAX_DEPTH, MAX_NODES, MAX_TEXT_LENGTH, RuleError, parse

C, D, N = Connection.CONNECTED, Connection.DISCONNECTED, Connection.NEVER_CONNECTED


def ok(value=None, severity=Severity.NO_ALARM, connection=C):
    return PVState(connection, value, severity, "", None, 0)


def ev(text, env=None):
    return parse(text).value(env or {})


# ------------------------------------------------------------------ basics


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("10 - 4 - 3", 3),  # left-associative
        ("12 / 4 / 3", 1.0),
        ("7 % 4", 3),
        ("-2 * 3", -6),
        ("--2", 2),
        ("2 * -3", -6),
        ("1e3", 1000.0),
        ("1.5e-1 * 10", 1.5),
        (".5 + 1.", 1.5),
        ("abs(-4)", 4),
        ("min(3, 1, 2)", 1),
        ("max(3, 1.5)", 3),
        ("min(7)", 7),
        ('"abc"', "abc"),
        ('"a\\"b\\\\"', 'a"b\\'),
        ("true", True),
        ("false", False),
        ("NO_ALARM + MINOR + MAJOR + INVALID", 6),
        ("1 < 2", True),
        ("2 <= 2", True),
        ("3 > 4", False),
        ("3 >= 4", False),
        ("1 == 1.0", True),
        ("1 != 1", False),
        ('"abc" < "abd"', True),
        ('"a" == "a"', True),
        ("true == true", True),
        ("true != false", True),
        ("not true", False),
        ("!false", True),
        ("not 1 == 2", True),  # not binds looser than comparisons
        ("!1 == 2", True),  # and so does '!'
        ("not true and false", False),  # (not true) and false
        ("true or false and false", True),  # and binds tighter than or
        ("false && true || true", True),
        ("1 + 1 == 2 and 2 * 2 == 4", True),
        ("  1\t+\n2  ", 3),
    ],
)
def test_values(text, expected):
    value = ev(text)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    "text",
    [
        "1 / 0",
        "1 % 0",
        "1.0 / 0.0",
        '1 + "a"',
        '1 < "a"',
        '1 == "a"',  # mixed types are unknown, not false
        "true < false",  # booleans only compare for equality
        "true == 1",
        "-true",
        'abs("x")',
        "min(1, true)",
        "`A`",  # not in the environment
        "1e308 * 10 - 1e308 * 10",  # inf - inf is NaN
        "10" + "0" * 400 + " / 1",  # int too large for a float
    ],
)
def test_unknown(text):
    assert ev(text) is None
    assert parse(text).evaluate({}) is None


def test_truthiness():
    assert parse("2").evaluate({}) is True
    assert parse("0").evaluate({}) is False
    assert parse("0.0").evaluate({}) is False
    assert parse('"yes"').evaluate({}) is None  # strings have no truth value
    assert parse("`W`").evaluate({"W": ok((1.0, 2.0))}) is None  # nor waveforms


def test_kleene_logic():
    u = "1/0 == 1"  # unknown
    assert ev(f"false and {u}") is False
    assert ev(f"{u} and false") is False
    assert ev(f"true and {u}") is None
    assert ev(f"true or {u}") is True
    assert ev(f"{u} or true") is True
    assert ev(f"false or {u}") is None
    assert ev(f"not ({u})") is None
    assert ev(f"{u} or {u} or true") is True


def test_pv_references():
    env = {
        "IOC:TEMP.VAL": ok(81.5, Severity.MINOR),
        "FLOW-1_{a}": ok(3, Severity.MAJOR),
        "LOST": ok(5, Severity.NO_ALARM, D),
        "NEVER": ok(None, Severity.INVALID, N),
        "NAME": ok("Open"),
        "EMPTY": ok(None),
        "NAN": ok(float("nan")),
    }
    assert ev("`IOC:TEMP.VAL` > 80", env) is True
    assert ev("`FLOW-1_{a}` * 2", env) == 6
    assert ev("severity(`IOC:TEMP.VAL`)", env) == 1
    assert ev("severity(`FLOW-1_{a}`) >= MAJOR", env) is True
    assert ev("connected(`IOC:TEMP.VAL`)", env) is True
    assert ev("connected(`LOST`)", env) is False
    assert ev("connected(`NEVER`)", env) is False
    assert ev("connected(`MISSING`)", env) is None  # not reported yet: unknown
    # A disconnected PV's last value can't be trusted; its severity is INVALID.
    assert ev("`LOST`", env) is None
    assert ev("severity(`LOST`)", env) == 3
    assert ev("severity(`NEVER`) == INVALID", env) is True
    assert ev("severity(`MISSING`)", env) is None
    assert ev('`NAME` == "Open"', env) is True
    assert ev("`NAME` == 1", env) is None
    assert ev("`EMPTY` > 1", env) is None
    assert ev("`NAN` == `NAN`", env) is None  # NaN is unknown, not unequal


def test_rule_pvs():
    rule = parse("`A` > 1 and severity(`B:1`) > 0 or connected(`C.VAL`) or `A` < 0")
    assert rule.pvs == frozenset({"A", "B:1", "C.VAL"})
    assert parse("1 + 2").pvs == frozenset()


def test_evaluate_returns_bool_or_none():
    env = {"A": ok(7), "B": ok(2)}
    assert parse("`A` > 5 and `B` < 3").evaluate(env) is True
    assert parse("`A` - `B`").evaluate(env) is True
    assert parse("`A` - 7").evaluate(env) is False


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "text, message, position",
    [
        ("", "unexpected end of expression", 0),
        ("1 +", "unexpected end of expression", 3),
        ("(1))", "unexpected ')'", 3),
        ("(1 + 2", "expected ')' but found end of expression", 6),
        ("1 2", "unexpected '2'", 2),
        ("`A` (", "unexpected '('", 4),
        ("temp > 5", "unknown name 'temp'", 0),
        ("foo(1)", "unknown function 'foo'", 0),
        ("IOC:TEMP > 5", "unexpected character ':'", 3),
        ("1 = 2", "did you mean '=='", 2),
        ("1 & 2", "unexpected character '&'", 2),
        ("1 < 2 < 3", "comparisons cannot be chained", 6),
        ("1 == 2 != 3", "comparisons cannot be chained", 7),
        ("1 == not 2", "'not' needs parentheses here", 5),
        ("-!true", "'!' needs parentheses here", 1),
        ("1 + not true", "'not' needs parentheses here", 4),
        ('"abc', "unterminated string", 0),
        ('"a\\n"', "bad escape", 2),
        ("`A", "unterminated PV name", 0),
        ("``", "empty PV name", 0),
        ("`A B`", "invalid character ' ' in PV name", 2),
        ("1.2.3", "malformed number", 0),
        ("12abc", "malformed number", 0),
        ("1e", "malformed number", 0),
        ("1e999", "number out of range", 0),
        ("severity(1)", "severity() takes a PV name in backquotes", 9),
        ("connected(`A`", "expected ')'", 13),
        ("abs(1, 2)", "abs() takes exactly 1 argument(s), got 2", 8),
        ("min()", "unexpected ')'", 4),
        ("min(1,)", "unexpected ')'", 6),
        ("True", "unknown name 'True'", 0),
        ("1 + é", "unexpected character 'é'", 4),
    ],
)
def test_errors(text, message, position):
    with pytest.raises(RuleError) as info:
        parse(text)
    err = info.value
    assert message in err.message
    assert err.position == position
    assert str(err) == f"{err.message} at column {position + 1}"
    assert err.column == position + 1


def test_error_message_example():
    with pytest.raises(RuleError, match=r"^unexpected '\)' at column 12$"):
        parse("(`AB` + 10))")


def test_error_is_a_value_error_and_pickles():
    import pickle

    err = pytest.raises(RuleError, parse, "1 +").value
    assert isinstance(err, ValueError)
    again = pickle.loads(pickle.dumps(err))
    assert (again.message, again.position, str(again)) == (err.message, err.position, str(err))


def test_parse_rejects_non_strings():
    with pytest.raises(TypeError):
        parse(None)


# ------------------------------------------------------------------ limits


@pytest.mark.parametrize(
    "build",
    [
        lambda n: "(" * n + "1" + ")" * n,
        lambda n: "-" * n + "1",
        lambda n: "not " * n + "true",
        lambda n: "!" * n + "true",
        lambda n: "1" + " + 1" * n,  # left-nested tree, built by a loop
        lambda n: "abs(" * n + "1" + ")" * n,
        lambda n: "min(1, " * n + "1" + ")" * n,
    ],
)
def test_deep_nesting_is_a_rule_error(build):
    parse(build(MAX_DEPTH // 2 - 2))  # comfortably within the limit
    for n in (MAX_DEPTH + 1, 500):
        with pytest.raises(RuleError, match="nested too deeply"):
            parse(build(n))
    with pytest.raises(RuleError):  # past the length limit too: still a RuleError
        parse(build(5000))


def test_long_and_or_chains_stay_shallow():
    # n-ary and/or: a realistic "any of these PVs" rule is not a nesting problem.
    text = " or ".join(f"`PV{i}` > 1" for i in range(200))
    rule = parse(text)
    assert len(rule.pvs) == 200
    assert rule.evaluate({"PV150": ok(2)}) is True


def test_too_long():
    parse("1" + " " * (MAX_TEXT_LENGTH - 1))
    with pytest.raises(RuleError, match="too long") as info:
        parse("1" + " " * MAX_TEXT_LENGTH)
    assert info.value.position == MAX_TEXT_LENGTH


def test_too_many_nodes():
    text = "min(" + ",".join(["1"] * (MAX_NODES + 1)) + ")"
    assert len(text) <= MAX_TEXT_LENGTH
    with pytest.raises(RuleError, match="too large"):
        parse(text)


def test_no_python_evaluation():
    # Python syntax is not rule syntax; nothing reaches eval.
    for text in ("__import__('os')", "[1]", "1 if 1 else 2", "lambda: 1", "2 ** 3", "a.b"):
        with pytest.raises(RuleError):
            parse(text)


# -------------------------------------------------- property: round trip

PV_NAMES = ["A", "IOC:TEMP.VAL", "X-1_{a}", "B"]
SEVERITY_NAMES = ["NO_ALARM", "MINOR", "MAJOR", "INVALID"]
ARITH = ["+", "-", "*", "/", "%"]
COMPARE = ["<", "<=", ">", ">=", "==", "!="]

numbers = st.one_of(
    st.integers(min_value=0, max_value=10**6),
    st.sampled_from([0.0, 0.5, 2.5, 1e3, 1e300, 3.25]),
)
strings = st.text(alphabet='ab "\\:', max_size=4)
leaves = st.one_of(
    numbers.map(lambda v: ("num", v)),
    strings.map(lambda s: ("str", s)),
    st.booleans().map(lambda b: ("bool", b)),
    st.sampled_from(SEVERITY_NAMES).map(lambda s: ("sev", s)),
    st.sampled_from(PV_NAMES).map(lambda p: ("pv", p)),
    st.sampled_from(PV_NAMES).map(lambda p: ("severity", p)),
    st.sampled_from(PV_NAMES).map(lambda p: ("connected", p)),
)


def _compound(children):
    return st.one_of(
        children.map(lambda x: ("neg", x)),
        st.tuples(st.just("not"), children, st.sampled_from(["not", "!"])),
        st.tuples(st.just("arith"), st.sampled_from(ARITH), children, children),
        st.tuples(st.just("cmp"), st.sampled_from(COMPARE), children, children),
        st.tuples(st.sampled_from(["and", "or"]), children, children, st.booleans()),
        st.tuples(st.just("call"), st.just("abs"), st.tuples(children)),
        st.tuples(st.just("call"), st.sampled_from(["min", "max"]), st.lists(children, min_size=1, max_size=3).map(tuple)),
    )


trees = st.recursive(leaves, _compound, max_leaves=12)

pv_values = st.one_of(
    st.none(),
    st.integers(-5, 5),
    st.sampled_from([0.0, -1.5, 2.5, float("nan"), float("inf")]),
    st.sampled_from(["a", "b", ""]),
    st.just((1.0, 2.0)),
)
pv_states = st.builds(
    lambda c, v, s: PVState(c, v, s, "", None, 0),
    st.sampled_from(list(Connection)),
    pv_values,
    st.sampled_from(list(Severity)),
)
envs = st.dictionaries(st.sampled_from(PV_NAMES), pv_states)


# A deliberately plain reference evaluator over the test's own trees.
def is_num(v):
    return type(v) in (int, float)


def ref_truth(v):
    if type(v) is bool:
        return v
    if is_num(v):
        return v != 0
    return None


def ref_eval(node, env):
    kind = node[0]
    if kind in ("num", "str", "bool"):
        return node[1]
    if kind == "sev":
        return SEVERITY_NAMES.index(node[1])
    if kind in ("pv", "severity", "connected"):
        state = env.get(node[1])
        if state is None:
            return None
        connected = state.connection == Connection.CONNECTED
        if kind == "connected":
            return connected
        if kind == "severity":
            return int(state.severity) if connected else 3
        if not connected or state.value is None:
            return None
        if isinstance(state.value, float) and math.isnan(state.value):
            return None
        return state.value
    if kind == "neg":
        v = ref_eval(node[1], env)
        return -v if is_num(v) else None
    if kind == "not":
        t = ref_truth(ref_eval(node[1], env))
        return None if t is None else not t
    if kind in ("and", "or"):
        a = ref_truth(ref_eval(node[1], env))
        b = ref_truth(ref_eval(node[2], env))
        if kind == "and":
            if a is False or b is False:
                return False
            return True if (a is True and b is True) else None
        if a is True or b is True:
            return True
        return False if (a is False and b is False) else None
    if kind == "arith":
        op, a, b = node[1], ref_eval(node[2], env), ref_eval(node[3], env)
        if not (is_num(a) and is_num(b)):
            return None
        if op in ("/", "%") and b == 0:
            return None
        try:
            r = {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b, "/": lambda: a / b, "%": lambda: a % b}[op]()
        except OverflowError:
            return None
        return None if (isinstance(r, float) and math.isnan(r)) else r
    if kind == "cmp":
        op, a, b = node[1], ref_eval(node[2], env), ref_eval(node[3], env)
        both_num = is_num(a) and is_num(b)
        both_str = type(a) is str and type(b) is str
        both_bool = type(a) is bool and type(b) is bool
        if both_bool and op in ("==", "!="):
            return (a == b) if op == "==" else (a != b)
        if not (both_num or both_str):
            return None
        return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b, "==": a == b, "!=": a != b}[op]
    if kind == "call":
        args = [ref_eval(x, env) for x in node[2]]
        if not all(is_num(a) for a in args):
            return None
        return {"abs": lambda: abs(args[0]), "min": lambda: min(args), "max": lambda: max(args)}[node[1]]()
    raise AssertionError(node)


def leaf_text(node):
    kind = node[0]
    if kind == "num":
        return repr(node[1])
    if kind == "str":
        return '"' + node[1].replace("\\", "\\\\").replace('"', '\\"') + '"'
    if kind == "bool":
        return "true" if node[1] else "false"
    if kind == "sev":
        return node[1]
    if kind == "pv":
        return f"`{node[1]}`"
    return f"{kind}(`{node[1]}`)"


def full_parens(node):
    kind = node[0]
    if kind == "neg":
        return f"(-{full_parens(node[1])})"
    if kind == "not":
        return f"({node[2]} {full_parens(node[1])})"
    if kind in ("arith", "cmp"):
        return f"({full_parens(node[2])} {node[1]} {full_parens(node[3])})"
    if kind in ("and", "or"):
        op = kind if node[3] else {"and": "&&", "or": "||"}[kind]
        return f"({full_parens(node[1])} {op} {full_parens(node[2])})"
    if kind == "call":
        return f"{node[1]}({', '.join(full_parens(a) for a in node[2])})"
    return leaf_text(node)


# Levels of the documented precedence table: or 1, and 2, not 3, comparison 4,
# + - 5, * / % 6, unary minus 7, atoms 8.
def minimal(node):
    """Text with only the parentheses the precedence table requires, and level."""

    def wrap(child, at_least):
        text, level = minimal(child)
        return text if level >= at_least else f"({text})"

    kind = node[0]
    if kind == "neg":
        return "-" + wrap(node[1], 7), 7
    if kind == "not":
        return f"{node[2]} " + wrap(node[1], 3), 3
    if kind == "cmp":
        return f"{wrap(node[2], 5)} {node[1]} {wrap(node[3], 5)}", 4
    if kind == "arith":
        level = 5 if node[1] in "+-" else 6
        return f"{wrap(node[2], level)} {node[1]} {wrap(node[3], level + 1)}", level
    if kind in ("and", "or"):
        level = 2 if kind == "and" else 1
        op = kind if node[3] else {"and": "&&", "or": "||"}[kind]
        return f"{wrap(node[1], level)} {op} {wrap(node[2], level + 1)}", level
    if kind == "call":
        return f"{node[1]}({', '.join(minimal(a)[0] for a in node[2])})", 8
    return leaf_text(node), 8


def tree_pvs(node):
    kind = node[0]
    if kind in ("pv", "severity", "connected"):
        return {node[1]}
    if kind in ("neg", "not"):
        return tree_pvs(node[1])
    if kind in ("arith", "cmp"):
        return tree_pvs(node[2]) | tree_pvs(node[3])
    if kind in ("and", "or"):
        return tree_pvs(node[1]) | tree_pvs(node[2])
    if kind == "call":
        return set().union(*(tree_pvs(a) for a in node[2]))
    return set()


def same(a, b):
    if a is None or b is None:
        return a is None and b is None
    if (type(a) is bool) != (type(b) is bool):
        return False
    if isinstance(a, float) and isinstance(b, float) and math.isinf(a):
        return a == b
    return a == b


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(trees, envs)
def test_round_trip_matches_reference(tree, env):
    expected = ref_eval(tree, env)
    for text in (full_parens(tree), minimal(tree)[0]):
        rule = parse(text)
        assert same(rule.value(env), expected), text
        truth = rule.evaluate(env)
        assert truth is ref_truth(expected)
        assert rule.pvs == frozenset(tree_pvs(tree))


# Well-typed trees, so that most evaluations are known rather than type errors.
num_trees = st.recursive(
    st.one_of(
        numbers.map(lambda v: ("num", v)),
        st.sampled_from(SEVERITY_NAMES).map(lambda s: ("sev", s)),
        st.sampled_from(PV_NAMES).map(lambda p: ("pv", p)),
        st.sampled_from(PV_NAMES).map(lambda p: ("severity", p)),
    ),
    lambda ch: st.one_of(
        ch.map(lambda x: ("neg", x)),
        st.tuples(st.just("arith"), st.sampled_from(ARITH), ch, ch),
        st.tuples(st.just("call"), st.sampled_from(["min", "max"]), st.lists(ch, min_size=1, max_size=3).map(tuple)),
    ),
    max_leaves=8,
)
bool_trees = st.recursive(
    st.one_of(
        st.tuples(st.just("cmp"), st.sampled_from(COMPARE), num_trees, num_trees),
        st.sampled_from(PV_NAMES).map(lambda p: ("connected", p)),
        st.booleans().map(lambda b: ("bool", b)),
    ),
    lambda ch: st.one_of(
        st.tuples(st.just("not"), ch, st.sampled_from(["not", "!"])),
        st.tuples(st.sampled_from(["and", "or"]), ch, ch, st.booleans()),
    ),
    max_leaves=6,
)
numeric_envs = st.dictionaries(
    st.sampled_from(PV_NAMES),
    st.builds(
        lambda c, v, s: PVState(c, v, s, "", None, 0),
        st.sampled_from([Connection.CONNECTED] * 4 + list(Connection)),
        st.one_of(st.integers(-5, 5), st.sampled_from([0.0, 2.5, -1.5])),
        st.sampled_from(list(Severity)),
    ),
    min_size=3,
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(num_trees, bool_trees), numeric_envs)
def test_typed_round_trip_matches_reference(tree, env):
    expected = ref_eval(tree, env)
    for text in (full_parens(tree), minimal(tree)[0]):
        rule = parse(text)
        assert same(rule.value(env), expected), text
        assert rule.evaluate(env) is ref_truth(expected)


junk_alphabet = st.sampled_from(
    list("`\"()!&|<>=+-*/%,.e 0123456789") + ["and", "or", "not", "MAJOR", "`A`", "abs(", "min(", "severity(", "true", "\\"]
)


@settings(max_examples=500)
@given(st.one_of(st.text(), st.lists(junk_alphabet, max_size=30).map("".join)), envs)
def test_junk_only_raises_rule_error(text, env):
    try:
        rule = parse(text)
    except RuleError as err:
        assert 0 <= err.position <= len(text)
        assert str(err).endswith(f"at column {err.position + 1}")
        return
    assert rule.evaluate(env) in (True, False, None)


@given(st.integers(MAX_DEPTH + 1, 1500), st.sampled_from(["(", "-", "not ", "!", "abs("]))
def test_random_deep_nesting_is_rule_error(n, opener):
    closer = ")" if opener in ("(", "abs(") else ""
    with pytest.raises(RuleError):
        parse(opener * n + "1" + closer * n)
