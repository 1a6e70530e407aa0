"""LangChain 1.x agents on ChatMoss, and MossAgent on a real (tiny) transformers model.

``langchain.agents.create_agent(ChatMoss(...), tools)`` runs the tool loop with MOSS's two passes as tool calls;
a LangGraph checkpointer keeps the conversation, which must render back into MOSS turns byte for byte, the same
text MossAgent writes for the same model outputs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import BaseTool, tool
from langgraph.checkpoint.memory import InMemorySaver

from moss_agent.agent import MossAgent
from moss_agent.chat_model import ChatMoss
from moss_agent.engines.base import Delta, Engine, Generation, SamplingParams
from moss_agent.messages import from_messages
from moss_agent.protocol import format as fmt
from moss_agent.testing.engines import ScriptedEngine

SYSTEM = (
    fmt.META_INSTRUCTION + "- Inner thoughts: enabled.\n"
    "- Web search: disabled.\n"
    "- Calculator: enabled. API: Calculate(expression)\n"
    "- Equation solver: disabled.\n"
    "- Text-to-image: disabled.\n"
    "- Image edition: disabled.\n"
    "- Text-to-speech: disabled.\n"
    "- Get weather: enabled. API: get_weather(city)\n"
)

SCRIPT = [
    ' Use the calculator.<eot>\n<|Commands|>: Calculate("2+3")<eoc>',
    " 2+3 is 5.<eom>",
    ' Ask the weather tool.<eot>\n<|Commands|>: get_weather("Paris")<eoc>',
    " It is sunny in Paris.<eom>",
    " None<eot>\n<|Commands|>: None<eoc>",
    " You are welcome.<eom>",
]
QUESTIONS = ["what is 2+3?", "weather in Paris?", "thanks!"]


@tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"Sunny in {city}, 21 C"


@pytest.fixture(scope="module")
def tools() -> list[BaseTool]:
    from moss_agent.tools.calculator import CalculatorTool

    return [CalculatorTool(), get_weather]


def expected_prompts() -> list[str]:
    """The six prompts of the three turns, written out: each one extends the one before."""
    p0 = SYSTEM + "<|Human|>: what is 2+3?<eoh>\n<|Inner Thoughts|>:"
    p1 = p0 + (
        ' Use the calculator.<eot>\n<|Commands|>: Calculate("2+3")<eoc>\n'
        "<|Results|>:\nCalculate(\"2+3\") => '5'\n<eor>\n<|MOSS|>:"
    )
    p2 = p1 + " 2+3 is 5.<eom>\n<|Human|>: weather in Paris?<eoh>\n<|Inner Thoughts|>:"
    p3 = p2 + (
        ' Ask the weather tool.<eot>\n<|Commands|>: get_weather("Paris")<eoc>\n'
        '<|Results|>:\nget_weather("Paris") => Sunny in Paris, 21 C\n<eor>\n<|MOSS|>:'
    )
    p4 = p3 + " It is sunny in Paris.<eom>\n<|Human|>: thanks!<eoh>\n<|Inner Thoughts|>:"
    p5 = p4 + " None<eot>\n<|Commands|>: None<eoc>\n<|Results|>:\nNone\n<eor>\n<|MOSS|>:"
    return [p0, p1, p2, p3, p4, p5]


def test_create_agent_runs_the_tool_loop_and_the_checkpointer_keeps_moss_turns(tools: list[BaseTool]) -> None:
    engine = ScriptedEngine(SCRIPT)
    # One tool round a turn, as MossAgent runs it (more rounds: tests/unit/test_chat_model_rounds.py).
    agent = create_agent(ChatMoss(engine=engine, max_tool_rounds=1), tools, checkpointer=InMemorySaver())
    config: Any = {"configurable": {"thread_id": "t1"}}
    replies = []
    for question in QUESTIONS:
        state = agent.invoke({"messages": [{"role": "user", "content": question}]}, config)
        replies.append(state["messages"][-1].content)

    assert replies == ["2+3 is 5.", "It is sunny in Paris.", "You are welcome."]
    assert engine.prompts == expected_prompts()
    messages = state["messages"]
    calls = [m for m in messages if isinstance(m, AIMessage) and m.tool_calls]
    assert [(c.tool_calls[0]["name"], c.tool_calls[0]["args"]) for c in calls] == [
        ("Calculate", {"expression": "2+3"}),
        ("get_weather", {"city": "Paris"}),
    ]
    answers = [m for m in messages if isinstance(m, ToolMessage)]
    assert [a.content for a in answers] == ["'5'", "Sunny in Paris, 21 C"]
    assert answers[0].artifact["value"] == 5

    # The checkpointed messages render back into the same MOSS turns, byte for byte.
    conversation = from_messages(messages)
    full = engine.prompts[-1] + " You are welcome.<eom>\n"
    assert "".join(t.to_text() for t in conversation.turns) == full[len(SYSTEM) :]
    assert [t.inner_thoughts for t in conversation.turns] == ["Use the calculator.", "Ask the weather tool.", "None"]


def test_create_agent_and_moss_agent_write_the_same_text(tools: list[BaseTool]) -> None:
    engine = ScriptedEngine(SCRIPT)
    agent = MossAgent(ChatMoss(engine=engine), tools=tools)
    outputs = [agent.invoke({"input": q})["output"] for q in QUESTIONS]
    assert outputs == ["2+3 is 5.", "It is sunny in Paris.", "You are welcome."]
    assert engine.prompts == expected_prompts()


def test_create_agent_streams_the_steps(tools: list[BaseTool]) -> None:
    engine = ScriptedEngine(SCRIPT[:2])
    agent = create_agent(ChatMoss(engine=engine, max_tool_rounds=1), tools)
    steps = [
        next(iter(update)) for update in agent.stream({"messages": [("user", "what is 2+3?")]}, stream_mode="updates")
    ]
    assert steps == ["model", "tools", "model"]


def test_with_a_rule_based_model_both_agents_write_the_same_conversation(tools: list[BaseTool]) -> None:
    from moss_agent.testing.scripted_rules import RuleBasedEngine

    questions = ["What is the weather in Paris?", "Please calculate 6*7", "Thanks"]
    graph_engine, native_engine = RuleBasedEngine(), RuleBasedEngine()
    graph = create_agent(ChatMoss(engine=graph_engine), tools, checkpointer=InMemorySaver())
    native = MossAgent(ChatMoss(engine=native_engine), tools=tools)
    config: Any = {"configurable": {"thread_id": "rules"}}
    for question in questions:
        state = graph.invoke({"messages": [("user", question)]}, config)
        assert state["messages"][-1].content == native.invoke(question)["output"]
    # create_agent lets MOSS decide on another tool round after the results (the prompt that re-opens the inner
    # thoughts); apart from that decision, both agents send the same prompts.
    decisions = [p for p in graph_engine.prompts if p.endswith(f"{fmt.EOR}\n{fmt.THOUGHTS}:")]
    assert len(decisions) == 2
    assert all(any(p.startswith(d.removesuffix(f"{fmt.THOUGHTS}:")) for p in native_engine.prompts) for d in decisions)
    assert [p for p in graph_engine.prompts if p not in decisions] == native_engine.prompts
    assert len(native_engine.prompts) == 6
    assert 'get_weather("Paris") => Sunny in Paris, 21 C' in native_engine.prompts[-1]
    turns = from_messages(state["messages"]).turns
    assert [t.to_text() for t in turns] == [t.to_text() for t in native.history]


def test_create_agent_tells_moss_about_an_unknown_command(tools: list[BaseTool]) -> None:
    # langchain 1.5's create_agent ends the loop on a message with only invalid_tool_calls; with
    # invalid_commands="answer" ChatMoss lets MOSS read the errors as results and reply in the same call.
    engine = ScriptedEngine([' Hm.<eot>\n<|Commands|>: Foo("x")<eoc>', " I cannot do that.<eom>"])
    agent = create_agent(ChatMoss(engine=engine, invalid_commands="answer"), tools)
    state = agent.invoke({"messages": [("user", "foo?")]})
    assert state["messages"][-1].content == "I cannot do that."
    assert 'Foo("x") => ' in engine.calls[-1].prompt


def test_by_default_create_agent_ends_on_only_invalid_calls(tools: list[BaseTool]) -> None:
    # The default keeps LangChain's convention (invalid_tool_calls returned to the caller); documented in README.
    engine = ScriptedEngine([' Hm.<eot>\n<|Commands|>: Foo("x")<eoc>'])
    state = create_agent(ChatMoss(engine=engine), tools).invoke({"messages": [("user", "foo?")]})
    assert state["messages"][-1].invalid_tool_calls


# ---------------------------------------------------------------- a real transformers engine


class RecordingEngine:
    """Delegates to an engine and keeps every :class:`Generation` (to read ``cached_tokens``)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.model_name = engine.model_name
        self.context_window = engine.context_window
        self.generations: list[Generation] = []

    def generate(self, prompt: str, params: SamplingParams) -> Generation:
        generation = self.engine.generate(prompt, params)
        self.generations.append(generation)
        return generation

    def generate_batch(self, prompts: Sequence[str], params: SamplingParams) -> list[Generation]:
        return [self.generate(p, params) for p in prompts]

    def stream(self, prompt: str, params: SamplingParams) -> Iterator[Delta]:
        for delta in self.engine.stream(prompt, params):
            if delta.generation is not None:
                self.generations.append(delta.generation)
            yield delta

    def count_tokens(self, text: str) -> int:
        return self.engine.count_tokens(text)

    def token_ids(self, text: str) -> list[int]:
        return self.engine.token_ids(text)


@pytest.fixture(scope="module")
def tiny_engine() -> Iterator[Engine]:
    import torch

    from moss_agent.engines.transformers import TransformersEngine
    from moss_agent.testing.checkpoints import tiny_moss_checkpoint

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: more threads only oversubscribe
    yield TransformersEngine.from_pretrained(Path(tiny_moss_checkpoint()), precision="fp32", device_map="cpu")
    torch.set_num_threads(threads)


def test_moss_agent_on_a_real_engine_reuses_the_prefix_cache(tiny_engine: Engine, tools: list[BaseTool]) -> None:
    engine = RecordingEngine(tiny_engine)
    agent = MossAgent(ChatMoss(engine=engine, max_new_tokens=6, do_sample=False), tools=tools)
    first = agent.run_turn("hello")
    second = agent.run_turn("and again")
    # A random tiny model writes no command: each turn is pass 1 then ChatMoss's pass 2 (results None).
    pass1, pass2, turn2 = engine.generations[0], engine.generations[1], engine.generations[2]
    assert pass1.cached_tokens == 0
    assert pass2.cached_tokens >= pass1.prompt_tokens  # pass 2 continues pass 1's prompt
    assert turn2.cached_tokens >= pass2.prompt_tokens  # turn 2 continues turn 1's whole text
    assert first.usage["cache_read"] > 0 and second.usage["cache_read"] > 0
    assert [t.human for t in agent.history] == ["hello", "and again"]
