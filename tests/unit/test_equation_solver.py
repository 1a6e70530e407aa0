"""The Solve tool: sympy solving, the recorded solver's printing, MOSS text, LangChain plumbing."""

from __future__ import annotations

import time
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from langchain_core.messages import ToolMessage
from langchain_tests.unit_tests import ToolsUnitTests
from pydantic import ValidationError

from moss_agent.protocol.plugins import EQUATION_SOLVER, NO_RESULT, format_solve
from moss_agent.tools.equation_solver import EquationSolverTool, solution_lines, solve, solve_equations
from moss_agent.tools.math.worker import MathWorker

CASES = [
    # exact input stays exact
    ("3x+7=24", [("x", "17/3")]),
    ("x/4=(120-x)/5", [("x", "160/3")]),
    ("x+y=10;x-z=3;y-z=4", [("x", "9/2"), ("y", "11/2"), ("z", "3/2")]),
    ("3x*4x=180", [("x_0", "-sqrt(15)"), ("x_1", "sqrt(15)")]),
    ("x*2x*4x=64", [("x_0", "2"), ("x_1", "-1 - sqrt(3)*I"), ("x_2", "-1 + sqrt(3)*I")]),
    # number/number is a float, as in Python; so are pi, sqrt(5), cos(120): results print with 15 digits
    ("(4/3)x - x = 64", [("x", "192.000000000000")]),
    ("y-x=36;y/2=x+k;x/y=2/3", [("k", "-18.0000000000000"), ("x", "72.0000000000000"), ("y", "108.000000000000")]),
    ("y=(5/4)*(x-y);y-40=(1/10)*(x-y+40)", [("x", "86.0869565217391"), ("y", "47.8260869565217")]),
    ("3/4x+45=2/3x", [("x", "-540.000000000000")]),
    ("24*pi = 2*pi*r", [("r", "12.0000000000000")]),
    ("5*(x^2)*sqrt(5)/4=25", [("x_0", "-2.99069756244244"), ("x_1", "2.99069756244244")]),
    ("x+y=100000;0.08*x+0.11*y=10000", [("x", "33333.3333333333"), ("y", "66666.6666666667")]),
    # what to solve for, commas, implicit products
    ("2t + 6t + t = 1, t", [("t", "1/9")]),
    ("6*a^2=216;a^3", [("a_0", "-6"), ("a_1", "6")]),
    ("a^2=16^2+25^2-2*16*25*cos(120); a", [("a_0", "-15.1543796830735"), ("a_1", "15.1543796830735")]),
    ("x + y = 3, 2x + 4y = 4", [("x", "4"), ("y", "-1")]),
    ("y=2x-3;10x+y=0.45(10y+x)", [("x", "-4.11764705882353"), ("y", "-11.2352941176471")]),
    ("(x + 5)^2 = 169", [("x_0", "-18"), ("x_1", "8")]),
    ("x+y=7;xy=12", [("x_0", "3"), ("x_1", "4"), ("y_0", "4"), ("y_1", "3")]),  # xy = x*y: both are variables
    ("x == 2", [("x", "2")]),
    ("3x+280", [("x", "-280/3")]),  # no equation at all: the expression equals 0
    ("log(x)=2", [("x", "exp(2)")]),
]


@pytest.mark.parametrize(("equation", "lines"), CASES, ids=[c[0] for c in CASES])
def test_solutions(equation: str, lines: list[tuple[str, str]]) -> None:
    assert solve(equation) == lines


@pytest.mark.parametrize(
    "equation",
    [
        "x/2 = 19/5; x = 19/5*2+19",  # inconsistent
        "x+y=1;x+y=2",
        "X^2+Y^2=100",  # infinitely many
        "a+b+c+d+e=45;a-e=15",
        "x=x",
        "2=3",
        "2.5x+1.5y=50;x+y=?",
        "det(randMatrix(5,7))",
        "x^2-(2+a)x-2*b=0;factor(x^2-(2+a)x-2*b)",
        "x=",
        "= 3",
        "x = = 3",
        "(x+1=2",
        "x+1)=2",
        "",
        "x^17=1",  # beyond the degree cap
        "a+b+c+d+e+f+g+h+i=1",  # more unknowns than the cap
        "factorial(x)=6",
    ],
)
def test_no_result(equation: str) -> None:
    result = solve_equations(equation)
    assert result["solutions"] == [] and result["error"]
    assert solve(equation) is None


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(-9, 9), min_size=6, max_size=6))
def test_linear_systems_solve_exactly(numbers: list[int]) -> None:
    a, b, c, d, e, f = numbers
    det = a * d - b * c
    lines = solve(f"{a}x+{b}y={e};{c}x+{d}y={f}")
    if det == 0:
        assert lines is None or len(lines) < 2 or all("_" not in name for name, _ in lines)
        return
    x, y = Fraction(e * d - b * f, det), Fraction(a * f - e * c, det)
    assert lines == [("x", str(x)), ("y", str(y))]


def test_solution_lines_number_several_solutions_by_variable() -> None:
    assert solution_lines([{"y": "2", "x": "1"}]) == [("x", "1"), ("y", "2")]
    assert solution_lines([{"x": "1", "y": "2"}, {"x": "3", "y": "4"}]) == [
        ("x_0", "1"),
        ("x_1", "3"),
        ("y_0", "2"),
        ("y_1", "4"),
    ]


def test_a_job_past_its_limit_is_cut_off_and_the_next_call_is_quick() -> None:
    worker = MathWorker(startup_timeout=120)  # three sympy imports at once: slow on a loaded machine
    try:
        assert worker.wait_ready()  # the worker and its hot spare
        started = time.monotonic()
        slow = solve_equations("sin(x)+cos(y)=1;x^2+y=3", timeout=0.5, worker=worker)
        assert time.monotonic() - started < 2.0
        assert slow["solutions"] == [] and "time limit" in (slow["error"] or "")
        started = time.monotonic()
        assert solve_equations("6x=30", worker=worker)["solutions"] == [{"x": "5"}]
        assert time.monotonic() - started < 2.0  # the hot spare took over: no wait for a new process
    finally:
        worker.close()


# -- the tool


def test_tool_call_gives_moss_text_and_artifact() -> None:
    tool = EquationSolverTool()
    call = {"type": "tool_call", "id": "s1", "name": "Solve", "args": {"equation": "x+y=30;y=2x+6"}}
    message = tool.invoke(call)
    assert isinstance(message, ToolMessage)
    assert message.content == "x = 8\ny = 22\n" == format_solve([("x", "8"), ("y", "22")])
    assert message.artifact == {"equation": "x+y=30;y=2x+6", "solutions": [{"x": "8", "y": "22"}], "error": None}


def test_tool_failure_is_no_result_with_reason() -> None:
    call = {"type": "tool_call", "id": "s2", "name": "Solve", "args": {"equation": "x+y=1;x+y=2"}}
    message = EquationSolverTool().invoke(call)
    assert message.content == NO_RESULT + "\n"
    assert message.artifact["solutions"] == [] and message.artifact["error"]


async def test_tool_runs_async() -> None:
    assert await EquationSolverTool().ainvoke({"equation": "6x=30"}) == "x = 5\n"


def test_names_come_from_the_plugin_table() -> None:
    tool = EquationSolverTool(prestart=False)
    assert tool.name == EQUATION_SOLVER.api
    assert list(tool.args) == [EQUATION_SOLVER.arg]


def test_timeout_must_be_positive() -> None:
    with pytest.raises(ValidationError, match="positive"):
        EquationSolverTool(timeout=-1)


class TestEquationSolverStandard(ToolsUnitTests):
    @property
    def tool_constructor(self) -> type[EquationSolverTool]:
        return EquationSolverTool

    @property
    def tool_constructor_params(self) -> dict:
        return {}

    @property
    def tool_invoke_params_example(self) -> dict:
        return {"equation": "x+y=18;x-y=6"}
