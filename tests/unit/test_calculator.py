"""The Calculate tool: Python's numbers (as the recorded calculator printed them), MOSS text, LangChain plumbing."""

from __future__ import annotations

import math
import operator
import subprocess
import sys
import textwrap
from collections.abc import Callable
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.messages import ToolMessage
from langchain_tests.unit_tests import ToolsUnitTests
from pydantic import ValidationError

from moss_agent.protocol.plugins import CALCULATOR, NO_RESULT, format_calculate
from moss_agent.tools.calculator import CalculatorTool, calculate, evaluate
from moss_agent.tools.math.check import MathLimits


def printed(value: int | float) -> str:
    """How the recorded calculator printed a Python number."""
    return str(value) if isinstance(value, int) else repr(value)


# Python evaluates the right-hand side of each pair itself: it is the oracle, since the recorder printed Python numbers.
PYTHON_CASES: list[tuple[str, int | float]] = [
    ("12*3", 12 * 3),
    ("20/2", 20 / 2),
    ("10^16", 10**16),
    ("400*(1-0.45)", 400 * (1 - 0.45)),
    ("12*sqrt(3)", 12 * math.sqrt(3)),
    ("125^(1/3)", 125 ** (1 / 3)),
    ("pi*3^2*20", math.pi * 3**2 * 20),
    ("(1/3)*(20*20)*40", (1 / 3) * (20 * 20) * 40),
    ("(90/(1-0.95))", 90 / (1 - 0.95)),
    ("0.5*8*15*sin(30)", 0.5 * 8 * 15 * math.sin(30)),
    ("(5*15^2)/(4*tan(pi/5))", (5 * 15**2) / (4 * math.tan(math.pi / 5))),
    ("sqrt(100)", math.sqrt(100)),
    ("floor((500-80-90-95)/110)+3", math.floor((500 - 80 - 90 - 95) / 110) + 3),
    ("ceil(500/(80+90+95+110))", math.ceil(500 / (80 + 90 + 95 + 110))),
    ("0b01101000", 0b01101000),
    ("3.33e8*0.601", 3.33e8 * 0.601),
    ("2^-1", 2**-1),
    ("7//2", 7 // 2),
    ("-7%3", -7 % 3),
    ("-7.5%2", -7.5 % 2),
    ("7.0//0.1", 7.0 // 0.1),
    ("round(2.675, 2)", round(2.675, 2)),
    ("round(2.5)", round(2.5)),
    ("round(-2.5)", round(-2.5)),
    ("round(123456, -2)", round(123456, -2)),
    ("abs(-3)", abs(-3)),
    ("abs(-3.5)", abs(-3.5)),
    ("factorial(20)", math.factorial(20)),
    ("log(8, 2)", math.log(8, 2)),
    ("log10(1000)", math.log10(1000)),
    ("log2(1024)", math.log2(1024)),
    ("ln(10)", math.log(10)),
    ("exp(1)", math.exp(1)),
    ("asin(0.5)", math.asin(0.5)),
    ("atan2(1, 2)", math.atan2(1, 2)),
    ("cosh(1)", math.cosh(1)),
    ("degrees(pi/3)", math.degrees(math.pi / 3)),
    ("radians(180)", math.radians(180)),
    ("max(1, 2.0, -3)", max(1, 2.0, -3)),
    ("min(4, 2)", min(4, 2)),
    ("pow(12, 1/3)", pow(12, 1 / 3)),  # as MOSS writes a cube root
    ("pow(2, 10)", pow(2, 10)),
    ("pow(2, -1)", pow(2, -1)),
    ("pow(2.5, 2)", pow(2.5, 2)),
    ("pow(3, 200, 7)", pow(3, 200, 7)),
    ("2*pow(12, 1/3)^2", 2 * pow(12, 1 / 3) ** 2),
    ("(-2)^2.0", (-2) ** 2.0),
    ("2**0.5", 2**0.5),
    ("1e16", 1e16),
    ("1e-300*1e-300", 1e-300 * 1e-300),
    ("tau/2 - pi", math.tau / 2 - math.pi),
    ("e^2", math.e**2),
    ("2^62*2^62", 2**62 * 2**62),
]


@pytest.mark.parametrize(("expression", "value"), PYTHON_CASES, ids=[c[0] for c in PYTHON_CASES])
def test_values_are_pythons_numbers(expression: str, value: int | float) -> None:
    assert calculate(expression) == printed(value)


def test_assignments_then_an_expression() -> None:
    p = (1300 + 700 + 1100) / 2
    expected = math.sqrt(p * (p - 1300) * (p - 700) * (p - 1100))
    assert calculate("p=(1300+700+1100)/2;sqrt(p*(p-1300)*(p-700)*(p-1100))") == repr(expected)
    assert calculate("a = 2; b = a^10; b - 24") == "1000"
    assert calculate("a = 2; b = 3;") is None  # nothing left to compute


@pytest.mark.parametrize(
    "expression",
    [
        "x + 1",  # variables belong to the solver
        "1700>=1600",
        "-9 == 1 - 8",
        "7!/(4!*(7-4)!)",
        "sqrt[(41-10)(41-20)]",
        "2(3+4)",  # Python would call 2: no implicit multiplication in the calculator
        "1/0",
        "1/0.0",
        "0.0^-1",
        "sqrt(-1)",
        "log(0)",
        "acos(2)",
        "(-8)^(1/3)",  # a complex number in Python
        "exp(1000)",
        "1e308*10",
        "factorial(2.5)",
        "factorial(-1)",
        "sqrt",
        "sqrt(1, 2)",
        "round(2.5, 1.5)",
        "pow(2)",
        "pow(-8, 1/3)",  # complex in Python
        "pow(2.5, 2, 3)",  # a modulus needs integers
        "pow(2, 3, 0)",
        "147227.31亿美元*6.474",  # the recorder dropped the Chinese characters and printed a wrong value
        "",
        "   ",
        "1 +",
    ],
)
def test_no_result(expression: str) -> None:
    result = evaluate(expression)
    assert result["value"] is None and result["text"] is None
    assert result["error"]


# -- property: any arithmetic on small numbers prints exactly what Python prints

_OPS: dict[str, Callable[[object, object], object]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.truediv,
    "//": operator.floordiv,
    "%": operator.mod,
}
_leaves = st.one_of(
    st.integers(-50, 50).map(lambda n: (f"({n})", n)),
    st.sampled_from([0.1, 0.45, 2.5, 3.14, 1e-3, 7.0, 0.3, 1.1]).map(lambda f: (repr(f), f)),
)


def _combine(children: st.SearchStrategy) -> st.SearchStrategy:
    binary = st.tuples(children, st.sampled_from(sorted(_OPS)), children).map(
        lambda t: (f"({t[0][0]} {t[1]} {t[2][0]})", (_OPS[t[1]], t[0][1], t[2][1]))
    )
    power = st.tuples(children, st.integers(0, 4)).map(lambda t: (f"({t[0][0]})^{t[1]}", (operator.pow, t[0][1], t[1])))
    return st.one_of(binary, power)


def _python_value(tree: object) -> object:
    if not isinstance(tree, tuple):
        return tree
    function, left, right = tree
    return function(_python_value(left), _python_value(right))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.recursive(_leaves, _combine, max_leaves=8))
def test_arithmetic_matches_python(case: tuple[str, object]) -> None:
    text, tree = case
    try:
        value = _python_value(tree)
    except (ZeroDivisionError, OverflowError):
        value = None
    if isinstance(value, float) and (math.isinf(value) or math.isnan(value)):
        value = None
    ours = calculate(text)
    if value is None:
        assert ours is None
    elif value == 0 and isinstance(value, float):
        assert ours == "0.0"  # sympy's floats have no negative zero: -0.0 prints as 0.0
    else:
        assert isinstance(value, (int, float)) and ours == printed(value), text


def test_big_integers_stay_exact() -> None:
    assert calculate("2^200 + 1") == str(2**200 + 1)
    assert calculate("factorial(100) // factorial(98)") == str(100 * 99)
    assert Fraction(calculate("3^40 / 3^38") or "0") == 9


def test_limits_are_configurable() -> None:
    assert calculate("factorial(12)", limits=MathLimits(max_factorial=10)) is None
    assert calculate("2^100", limits=MathLimits(max_int_digits=10)) is None
    assert calculate("((1))", limits=MathLimits(max_depth=1)) == "1"
    assert calculate("-(-(-(1)))", limits=MathLimits(max_depth=2)) is None
    with pytest.raises(ValueError, match="max_depth"):
        MathLimits(max_depth=0)
    with pytest.raises(ValueError, match="4300"):
        MathLimits(max_int_digits=5000)


# -- the tool


def test_tool_call_gives_moss_text_and_artifact() -> None:
    tool = CalculatorTool()
    message = tool.invoke({"type": "tool_call", "id": "c1", "name": "Calculate", "args": {"expression": "8400/7"}})
    assert isinstance(message, ToolMessage)
    assert message.content == "'1200.0'" == format_calculate("1200.0")
    assert message.artifact == {"expression": "8400/7", "value": 1200.0, "text": "1200.0", "error": None}
    assert tool.invoke({"expression": "12*3"}) == "'36'"


def test_tool_failure_is_no_result_with_reason() -> None:
    message = CalculatorTool().invoke(
        {"type": "tool_call", "id": "c2", "name": "Calculate", "args": {"expression": "__import__('os')"}}
    )
    assert message.content == repr(NO_RESULT)
    assert message.artifact["value"] is None and "__import__" in message.artifact["error"]


async def test_tool_runs_async() -> None:
    assert await CalculatorTool().ainvoke({"expression": "(25/60)*100"}) == format_calculate(repr((25 / 60) * 100))


def test_names_come_from_the_plugin_table() -> None:
    tool = CalculatorTool(prestart=False)
    assert tool.name == CALCULATOR.api
    assert list(tool.args) == [CALCULATOR.arg]
    assert "sqrt" in tool.description


def test_timeout_must_be_positive() -> None:
    with pytest.raises(ValidationError, match="positive"):
        CalculatorTool(timeout=0)


def test_agent_process_never_imports_sympy() -> None:
    code = textwrap.dedent(
        """
        import sys
        from moss_agent.tools.calculator import CalculatorTool
        from moss_agent.tools.equation_solver import EquationSolverTool
        assert CalculatorTool().invoke({"expression": "2^10"}) == "'1024'"
        assert EquationSolverTool().invoke({"equation": "2x=4"}) == "x = 2\\n"
        print("sympy" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


class TestCalculatorStandard(ToolsUnitTests):
    @property
    def tool_constructor(self) -> type[CalculatorTool]:
        return CalculatorTool

    @property
    def tool_constructor_params(self) -> dict:
        return {}

    @property
    def tool_invoke_params_example(self) -> dict:
        return {"expression": "pi*3^2*20"}
