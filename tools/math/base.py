"""The base of the Calculate and Solve tools: the time limit, the caps and the shared sympy worker."""

from __future__ import annotations

from typing import Literal

from langchain_core.tools import BaseTool
from pydantic import Field, model_validator
from typing_extensions import Self

from .check import MathLimits
from .worker import shared_worker

DEFAULT_TIMEOUT = 1.5
"""Seconds one calculation or solve may run before it is cut off."""


class MathTool(BaseTool):
    """A tool whose work runs in the shared, time-bounded sympy worker."""

    response_format: Literal["content", "content_and_artifact"] = "content_and_artifact"
    timeout: float = DEFAULT_TIMEOUT
    """Seconds one call may run before it is cut off (the answer is then ``No result.``)."""
    limits: MathLimits = Field(default_factory=MathLimits)
    """Caps on input length, nesting, integer and factorial size, powers, unknowns and solutions."""
    prestart: bool = True
    """Start the shared math worker when the tool is created, so that the first call does not wait for sympy."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        if not self.timeout > 0:
            name = type(self).__name__
            raise ValueError(f"{name} timeout must be a positive number of seconds, got {self.timeout!r}")
        if self.prestart:
            shared_worker().start()
        return self
