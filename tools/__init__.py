"""The four MOSS plugins as LangChain tools (installed as ``moss_agent.tools``).

=================  ==============  ==========================================================
MOSS command       tool            backend
=================  ==============  ==========================================================
``Search``         SearchTool      Tavily, a MOSS WebSearchTool server, a retriever, local BM25
``Calculate``      CalculatorTool  sympy behind an ``ast`` allowlist, time-bounded
``Solve``          EquationSolverTool  sympy solve, same guards
``Text2Image``     TextToImageTool diffusers ``AutoPipelineForText2Image``
=================  ==============  ==========================================================

Each tool returns the text MOSS reads after ``=>`` and its structured result as the ToolMessage artifact.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from moss_agent.protocol import plugins

if TYPE_CHECKING:
    from langchain_core.tools import BaseTool

    from moss_agent.tools.calculator import CalculatorTool
    from moss_agent.tools.equation_solver import EquationSolverTool
    from moss_agent.tools.search import SearchTool
    from moss_agent.tools.text_to_image import TextToImageTool

__all__ = ["CalculatorTool", "EquationSolverTool", "SearchTool", "TextToImageTool", "make_tools"]

# Plugin -> (module, class) of its tool; imported on first use to keep imports light.
_CLASSES = {
    plugins.WEB_SEARCH: ("moss_agent.tools.search", "SearchTool"),
    plugins.CALCULATOR: ("moss_agent.tools.calculator", "CalculatorTool"),
    plugins.EQUATION_SOLVER: ("moss_agent.tools.equation_solver", "EquationSolverTool"),
    plugins.TEXT_TO_IMAGE: ("moss_agent.tools.text_to_image", "TextToImageTool"),
}
_TOOLS = {key: _CLASSES[plugins.by_key(key)] for key in plugins.TOOL_KEYS}
_BY_CLASS = {cls: module for module, cls in _TOOLS.values()}


def __getattr__(name: str) -> Any:
    if name in _BY_CLASS:
        return getattr(importlib.import_module(_BY_CLASS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_tools(keys: Sequence[str] = tuple(_TOOLS), *, output_dir: str | None = None) -> list[BaseTool]:
    """The MOSS plugin tools for the given plugin keys, with default settings.

    Args:
        keys: Any of ``search``, ``calculator``, ``solver``, ``text2image``.
        output_dir: Where Text2Image saves its pictures (its default otherwise).

    Raises:
        ValueError: For an unknown key.
    """
    tools = []
    for key in keys:
        if key not in _TOOLS:
            raise ValueError(f"unknown MOSS plugin {key!r}; choose from {', '.join(_TOOLS)}")
        module, cls = _TOOLS[key]
        kwargs: dict[str, Any] = {}
        if key == "text2image" and output_dir:
            kwargs["output_dir"] = output_dir
        tools.append(getattr(importlib.import_module(module), cls)(**kwargs))
    return tools
