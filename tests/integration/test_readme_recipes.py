"""Every "LangChain recipe" of the README runs as written, on ChatMoss with a rule-based stand-in model."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import pytest

from moss_agent.chat_model import ChatMoss
from moss_agent.protocol import format as fmt
from moss_agent.testing.scripted_rules import RuleBasedEngine

README = Path(__file__).resolve().parents[2] / "README.md"
_BLOCK = re.compile(r"```python\n# recipe: (?P<name>[\w-]+)\n(?P<code>.*?)```", re.DOTALL)


def recipes() -> dict[str, str]:
    return {m["name"]: m["code"] for m in _BLOCK.finditer(README.read_text(encoding="utf-8"))}


def run(name: str, namespace: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one recipe (and those before it, which it may build on) with ``chat`` on a rule-based engine."""
    engine = RuleBasedEngine()
    scope: dict[str, Any] = {"chat": ChatMoss(engine=engine), "engine": engine, **(namespace or {})}
    names = list(recipes())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # RunnableWithMessageHistory is deprecated in core
        for earlier in names[: names.index(name) + 1]:
            exec(compile(recipes()[earlier], f"README:{earlier}", "exec"), scope)
    return scope


def test_the_readme_has_the_five_recipes() -> None:
    assert list(recipes()) == [
        "create_agent-memory",
        "structured-output",
        "summarization",
        "message-history",
        "agent-in-lcel",
    ]


def test_create_agent_keeps_the_conversation_in_the_checkpointer() -> None:
    scope = run("create_agent-memory")
    assert "42" in scope["state"]["messages"][-1].content
    assert f"{fmt.HUMAN}: Hi, I am Ann.{fmt.EOH}" in scope["engine"].prompts[-1]


def test_structured_output_after_a_tool_round() -> None:
    scope = run("structured-output")
    result = scope["result"]
    assert result["structured_response"] == scope["Answer"](value=6.0)
    assert next(m.name for m in result["messages"] if m.type == "tool") == "Calculate"


def test_summarization_middleware_summarizes_past_half_the_window() -> None:
    scope = run("summarization")
    messages = scope["state"]["messages"]
    assert "summary" in messages[0].text.lower()  # the older turns became one summary message
    assert "6" in messages[-1].content
    assert scope["chat"].profile["max_input_tokens"] == 2048


def test_runnable_with_message_history_remembers() -> None:
    scope = run("message-history")
    assert len(scope["histories"]["ann"].messages) == 4
    assert f"{fmt.HUMAN}: Hi, I am Ann.{fmt.EOH}" in scope["engine"].prompts[-1]


def test_moss_agent_inside_lcel_and_batch_by_session() -> None:
    scope = run("agent-in-lcel")
    agent = scope["agent"]
    assert [t.human for t in agent.session("x").turns()] == ["Hi, I am X.", "What is 2*3?"]
    assert [t.human for t in agent.session("y").turns()] == ["Hi, I am Y."]
    assert "42" in agent.history[-1].reply


@pytest.mark.parametrize("name", ["create_agent-memory"])
def test_recipes_print_nothing_unexpected(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    run(name)
    assert "42" in capsys.readouterr().out
