"""The MOSS equation-solver plugin (``Solve``) as a LangChain tool.

Input is what MOSS writes: equations separated by ``;`` (or ``,``), ``^`` as power, implicit multiplication
(``2x``, ``0.45(10y+x)``); the variables are found automatically, and a trailing bare expression names the
ones to solve for (``2t+6t+t=1, t``). The text is checked here against the allowlist of
:mod:`moss_agent.tools.math.check`, then solved with sympy in a time-bounded worker process.

The output follows the recorded solver: one ``name = value`` line per variable, sorted by name; exact
rationals stay exact (``x = 17/3``), values that involve floats print as sympy's 15-digit floats
(``x = 86.0869565217391``); several solutions are numbered (``x_0 = -6``, ``x_1 = 6``); ``No result.`` when
there is no solution, infinitely many, or the input cannot be solved.

Example:
    >>> from moss_agent.tools.equation_solver import EquationSolverTool, solve
    >>> solve("x+y=30;y=2x+6")
    [('x', '8'), ('y', '22')]
    >>> print(EquationSolverTool().invoke({"equation": "3x+7=24"}), end="")
    x = 17/3
"""

from __future__ import annotations

import logging
from typing import TypedDict, cast

from langchain_core.callbacks import CallbackManagerForToolRun
from pydantic import BaseModel, Field

from moss_agent.protocol.plugins import EQUATION_SOLVER, format_solve

from .math.base import DEFAULT_TIMEOUT, MathTool
from .math.check import MathInputError, MathLimits, describe, parse_equations
from .math.worker import MathWorker, WorkerError, shared_worker

__all__ = [
    "DEFAULT_TIMEOUT",
    "EquationSolverTool",
    "SolveArtifact",
    "SolveInput",
    "solution_lines",
    "solve",
    "solve_equations",
]

logger = logging.getLogger(__name__)


class SolveArtifact(TypedDict):
    """The structured result of one solve (the tool's ``ToolMessage.artifact``)."""

    equation: str
    """The input as the model wrote it."""
    solutions: list[dict[str, str]]
    """One ``{variable: value}`` dict per solution (values as printed); empty when there is no result."""
    error: str | None
    """Why there is no result, or None."""


def solution_lines(solutions: list[dict[str, str]]) -> list[tuple[str, str]]:
    """The ``(name, value)`` lines MOSS reads, sorted by name; several solutions are numbered ``x_0, x_1``."""
    if len(solutions) == 1:
        return sorted(solutions[0].items())
    names = sorted(set().union(*solutions))
    return [(f"{name}_{i}", row[name]) for name in names for i, row in enumerate(solutions) if name in row]


def solve_equations(
    equation: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    limits: MathLimits | None = None,
    worker: MathWorker | None = None,
) -> SolveArtifact:
    """Solve equations safely; never raises for bad input.

    Args:
        equation: Equations as MOSS writes them, e.g. ``"x+y=30;y=2x+6"``.
        timeout: Seconds the computation may run.
        limits: Caps on size, powers and unknowns; the defaults suit MOSS.
        worker: The worker process to use; by default the one shared by all math tools.

    Returns:
        The solutions, or the error that stopped the solver.
    """
    limits = limits or MathLimits()
    try:
        parse_equations(equation, limits)  # checked here, so rejected text never leaves this process
        rows = (worker or shared_worker()).call("solve", equation, limits.as_dict(), timeout=timeout)
    except (MathInputError, ValueError, WorkerError) as err:
        if isinstance(err, WorkerError):
            logger.warning("Solve(%r) failed: %s", equation[:80], err)
        return {"equation": equation, "solutions": [], "error": describe(err)}
    return {"equation": equation, "solutions": rows, "error": None}


def solve(
    equation: str, *, timeout: float = DEFAULT_TIMEOUT, limits: MathLimits | None = None
) -> list[tuple[str, str]] | None:
    """The solver's result lines, e.g. ``solve("6x=30") == [("x", "5")]``, or None when there is none."""
    result = solve_equations(equation, timeout=timeout, limits=limits)
    return solution_lines(result["solutions"]) if result["solutions"] else None


class SolveInput(BaseModel):
    """Arguments of the ``Solve`` tool."""

    equation: str = Field(
        description="Equations separated by ';', e.g. 'x+y=30;y=2x+6' or '3x+7=24'; '^' is power and '2x' "
        "means 2*x. Append '; x' to name the variable to solve for."
    )


class EquationSolverTool(MathTool):
    """MOSS's ``Solve(equation)`` plugin: safe symbolic equation solving with sympy.

    The content of a call is what MOSS reads after ``=>`` (``x = 17/3`` lines, or ``No result.``); the artifact
    is a :class:`SolveArtifact`. Constructing the tool starts the shared math worker in the background.
    """

    name: str = cast(str, EQUATION_SOLVER.api)
    description: str = (
        "Solve one equation or a system of equations for its unknowns. Separate equations with ';' "
        "(e.g. 'x+y=30;y=2x+6'); use ^ for powers; 2x means 2*x; variables are found automatically; append "
        "'; x' to solve for x only. Supports pi, sqrt, exp, log, sin, cos, tan and other common functions "
        "(e is a variable here: write exp(1) for Euler's number). "
        "Returns one 'name = value' line per variable (numbered x_0, x_1 when there are several solutions), "
        "or 'No result.'."
    )
    args_schema: type[BaseModel] = SolveInput

    def _run(self, equation: str, run_manager: CallbackManagerForToolRun | None = None) -> tuple[str, SolveArtifact]:
        result = solve_equations(equation, timeout=self.timeout, limits=self.limits)
        return format_solve(solution_lines(result["solutions"]) if result["solutions"] else None), result
