"""The MOSS calculator plugin (``Calculate``) as a LangChain tool.

The model's expression is checked here, in the agent process, against the allowlist of
:mod:`moss_agent.tools.math.check` (text that is not plain arithmetic never goes further), then evaluated with
sympy in a time-bounded worker process (:mod:`moss_agent.tools.math.worker`). Results print as the calculator
that recorded MOSS's training data printed them: Python's numbers, ``^`` as power (``12*3`` -> ``'36'``,
``20/2`` -> ``'10.0'``, ``12*sqrt(3)`` -> ``'20.784609690826528'``), and ``'No result.'`` on any failure.

Example:
    >>> from moss_agent.tools.calculator import CalculatorTool, calculate
    >>> calculate("pi*3^2*20")
    '565.4866776461628'
    >>> CalculatorTool().invoke({"expression": "8400/7"})
    "'1200.0'"
"""

from __future__ import annotations

import logging
from typing import TypedDict, cast

from langchain_core.callbacks import CallbackManagerForToolRun
from pydantic import BaseModel, Field

from moss_agent.protocol.plugins import CALCULATOR, format_calculate

from .math.base import DEFAULT_TIMEOUT, MathTool
from .math.check import MathInputError, MathLimits, describe, parse_calculation
from .math.worker import MathWorker, WorkerError, shared_worker

__all__ = ["DEFAULT_TIMEOUT", "CalculateArtifact", "CalculateInput", "CalculatorTool", "calculate", "evaluate"]

logger = logging.getLogger(__name__)


class CalculateArtifact(TypedDict):
    """The structured result of one calculation (the tool's ``ToolMessage.artifact``)."""

    expression: str
    """The expression as the model wrote it."""
    value: int | float | None
    """The value, or None when there is no result."""
    text: str | None
    """The value as printed for MOSS (``'36'``, ``'10.0'``), or None."""
    error: str | None
    """Why there is no result, or None."""


def evaluate(
    expression: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    limits: MathLimits | None = None,
    worker: MathWorker | None = None,
) -> CalculateArtifact:
    """Evaluate a calculator expression safely; never raises for bad input.

    Args:
        expression: Arithmetic as MOSS writes it, e.g. ``"(1/4)*12^2*sqrt(3)"``.
        timeout: Seconds the computation may run.
        limits: Caps on size and magnitude; the defaults suit MOSS.
        worker: The worker process to use; by default the one shared by all math tools.

    Returns:
        The value and its printed text, or the error that stopped it.
    """
    limits = limits or MathLimits()
    try:
        parse_calculation(expression, limits)  # checked here, so rejected text never leaves this process
        text = (worker or shared_worker()).call("calculate", expression, limits.as_dict(), timeout=timeout)
    except (MathInputError, ValueError, WorkerError) as err:
        if isinstance(err, WorkerError):
            logger.warning("Calculate(%r) failed: %s", expression[:80], err)
        return {"expression": expression, "value": None, "text": None, "error": describe(err)}
    return {"expression": expression, "value": _number(text), "text": text, "error": None}


def _number(text: str) -> int | float:
    return float(text) if any(ch in text for ch in ".eE") else int(text)


def calculate(expression: str, *, timeout: float = DEFAULT_TIMEOUT, limits: MathLimits | None = None) -> str | None:
    """The calculator's printed result, e.g. ``calculate("12*3") == "36"``, or None when there is none."""
    return evaluate(expression, timeout=timeout, limits=limits)["text"]


class CalculateInput(BaseModel):
    """Arguments of the ``Calculate`` tool."""

    expression: str = Field(
        description="The arithmetic to evaluate, e.g. 'pi*3^2*20' or '(25/60)*100'. Numbers only, no variables."
    )


class CalculatorTool(MathTool):
    """MOSS's ``Calculate(expression)`` plugin: safe arithmetic evaluated with sympy.

    The content of a call is what MOSS reads after ``=>`` (``'565.4866776461628'`` or ``'No result.'``); the
    artifact is a :class:`CalculateArtifact`. Constructing the tool starts the shared math worker in the
    background, so that the first call does not wait for sympy to import.
    """

    name: str = cast(str, CALCULATOR.api)
    description: str = (
        "Evaluate an arithmetic expression and return its value. Supports numbers, + - * / // %, ^ or ** for "
        "powers, parentheses, the constants pi and e, and sqrt, exp, log (natural; log(x, base)), ln, log10, "
        "log2, sin, cos, tan (radians), asin, acos, atan, sinh, cosh, tanh, degrees, radians, abs, floor, ceil, "
        "factorial, round, min, max. Integers stay exact and / gives a decimal. "
        "Returns the value, or 'No result.' if the expression cannot be computed."
    )
    args_schema: type[BaseModel] = CalculateInput

    def _run(
        self, expression: str, run_manager: CallbackManagerForToolRun | None = None
    ) -> tuple[str, CalculateArtifact]:
        result = evaluate(expression, timeout=self.timeout, limits=self.limits)
        return format_calculate(result["text"]), result
