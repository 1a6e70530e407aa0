"""Teaching a new tool: plugin_dataset + finetune make a tiny model call it on questions it never saw."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
from langchain_core.tools import tool

from moss_agent.finetune import finetune, load_samples, plugin_dataset, write_jsonl
from moss_agent.finetune.data import sample_from_conversation
from moss_agent.finetune.plugin_data import ToolExample
from moss_agent.protocol import format as fmt
from moss_agent.testing.checkpoints import tiny_moss_checkpoint

pytest.importorskip("peft")

CITIES = ["Paris", "Tokyo", "Berlin", "Rome", "Madrid", "Cairo", "Lima", "Oslo", "Delhi", "Seoul"]
ASK = [
    "What is the weather in {}?",
    "How is the weather in {} today?",
    "Is it sunny in {}?",
    "Tell me the weather for {}.",
]


@tool
def get_weather(city: str) -> str:
    """Today's weather in a city."""
    return f"Sunny in {city}."


def _examples() -> tuple[list[ToolExample], list[str]]:
    """Training examples, and questions held out of them (a city never asked with that phrasing)."""
    pairs = list(itertools.product(ASK, CITIES))
    random.Random(0).shuffle(pairs)
    train = [ToolExample(a.format(c), c, f"Sunny, 21 C in {c}.", f"It is sunny in {c} today.") for a, c in pairs[:30]]
    return train, [a.format(c) for a, c in pairs[30:36]]


def test_plugin_dataset_renders_what_chatmoss_prompts(tmp_path: Path) -> None:
    from moss_agent.rendering import system_text
    from moss_agent.tool_binding import bind_tools

    shared = _calculator_data(tmp_path)
    examples = [
        ("Weather in Paris?", "Paris", "Sunny.", "It is sunny."),
        {"question": "Hi!", "args": None, "reply": "Hello!"},
    ]
    samples = plugin_dataset(get_weather, examples, mix=shared, mix_ratio=1.0, seed=1)
    assert len(samples) == 4
    ours = [s for s in samples if s.source.startswith("example")]
    system = system_text(None, bind_tools([get_weather]))
    assert all(s.meta_instruction == system for s in ours)
    assert "- Inner thoughts: enabled.\n" in system and "get_weather" in system
    call = next(s for s in ours if "Paris" in s.to_text())
    turn = dict(call.turns[0])
    assert turn["Commands"] == '<|Commands|>: get_weather("Paris")<eoc>\n'
    assert (
        turn["Tool Responses"].startswith('<|Results|>:\nget_weather("Paris") =>')
        and "Sunny." in turn["Tool Responses"]
    )
    chat = dict(next(s for s in ours if "Hi!" in s.to_text()).turns[0])
    assert chat["Commands"] == "<|Commands|>: None<eoc>\n"
    write_jsonl(samples, tmp_path / "mixed.jsonl")
    assert [s.to_text() for s in load_samples(tmp_path / "mixed.jsonl")[0]] == [s.to_text() for s in samples]
    with pytest.raises(ValueError, match="at least one example"):
        plugin_dataset(get_weather, [])


def _calculator_data(folder: Path, n: int = 2) -> list:
    """``n`` short calculator conversations standing in for the shared MOSS data."""
    turns = [fmt.MossTurn(f"What is {i} times 7?", f"It is {7 * i}.", "I should calculate it.", f'Calculate("{i}*7")',
                          f"\nCalculate(\"{i}*7\") => '{7 * i}'\n") for i in range(2, 2 + n)]  # fmt: skip
    conversations = [fmt.MossConversation(fmt.system_prompt(["Calculate"]), [t]) for t in turns]
    return [sample_from_conversation(c, f"shared {i}") for i, c in enumerate(conversations)]


@pytest.mark.slow
def test_a_tiny_model_learns_to_call_a_new_tool(tmp_path: Path) -> None:
    from moss_agent.chat_model import ChatMoss

    train, unseen = _examples()
    write_jsonl(plugin_dataset(get_weather, train, mix=_calculator_data(tmp_path), mix_ratio=0.1), tmp_path / "w.jsonl")
    ckpt = tiny_moss_checkpoint()
    out = tmp_path / "tuned"
    # every weight of the tiny random model trains: its frozen random lm_head would hold LoRA back (see test_finetune)
    result = finetune(ckpt, tmp_path / "w.jsonl", out, method="full", steps=120, lr=5e-3, batch_size=4,
                      precision="fp32", progress=False)  # fmt: skip
    assert result.loss_last < 0.3 * result.loss_first
    options = {"precision": "fp32", "device_map": "cpu", "temperature": 0, "max_tokens": 48}
    before = ChatMoss(model=str(ckpt), **options).bind_tools([get_weather])
    after = ChatMoss(model=str(out), **options).bind_tools([get_weather])

    def names(model: object, question: str) -> list[str]:
        message = model.invoke(question)  # type: ignore[attr-defined]
        calls = [c["name"] for c in message.tool_calls]
        return calls + [c["name"] or str(c["args"]).split("(")[0] for c in message.invalid_tool_calls]

    # The tool's command is what it learned; a model this small often miscopies the city (copying a name takes far
    # more steps than a test affords), which ChatMoss reports as an invalid call whose text starts with the tool.
    calls = [names(after, q) for q in unseen]
    assert sum(c[:1] == ["get_weather"] for c in calls) >= 5, list(zip(unseen, calls, strict=True))
    assert not any(names(before, q) for q in unseen[:2])  # the untrained model does not call it
    assert json.loads((out / "config.json").read_text())["model_type"] == "moss"  # the released layout
