"""Training data that teaches MOSS a new tool: ``plugin_dataset(tool, examples)``.

MOSS was trained on four plugins. A LangChain tool of your own is shown to it as one more switch line of the same
shape (``- Weather: enabled. API: GetWeather(city)``, see :mod:`moss_agent.tool_binding`); this module writes
MOSS-format conversations in which that line is enabled and MOSS calls the tool: the same system text, command
and results text that :class:`~moss_agent.chat_model.ChatMoss` renders when the tool is bound, so what is trained
is what is prompted. Conversations from the shared MOSS data can be mixed in, so that the four trained plugins are
not forgotten.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moss_agent.finetune.data import Sample, load_samples, sample_from_conversation
from moss_agent.protocol import format as fmt
from moss_agent.protocol import plugins as _plugins

__all__ = ["ToolExample", "plugin_dataset"]


@dataclass(frozen=True)
class ToolExample:
    """One question and how MOSS should answer it with the tool.

    Attributes:
        question: The user's question.
        args: The arguments of the expected call (a dict, or the single argument as text); None when the
            question needs no tool.
        result: What the tool returns for that call.
        reply: MOSS's final answer, written from the result.
        thoughts: MOSS's inner thoughts; a plain default when None.
    """

    question: str
    args: Mapping[str, Any] | str | None
    result: str = ""
    reply: str = ""
    thoughts: str | None = None


def _example(item: ToolExample | Mapping[str, Any] | Sequence[Any]) -> ToolExample:
    if isinstance(item, ToolExample):
        return item
    if isinstance(item, Mapping):
        return ToolExample(**item)
    return ToolExample(*item)


def _turn(example: ToolExample, bound: Any) -> fmt.MossTurn:
    from moss_agent.tool_binding import command_for_tool_call
    from moss_agent.tool_results import results_from_outputs

    if example.args is None:
        thoughts = example.thoughts or "No tool is needed to answer this."
        return fmt.MossTurn(example.question, example.reply, thoughts, fmt.NONE, fmt.results_body(None))
    args = dict(example.args) if isinstance(example.args, Mapping) else {bound.arg_names[0]: example.args}
    command = command_for_tool_call({"name": bound.name, "args": args, "id": "example"}, [bound])
    thoughts = example.thoughts or f"To answer this I need to use {bound.name}."
    results = results_from_outputs([(command, example.result)])
    return fmt.MossTurn(example.question, example.reply, thoughts, fmt.commands_text([command]), results)


def _shared(mix: str | Path | Sequence[str | Path] | Sequence[Sample]) -> list[Sample]:
    if isinstance(mix, (str, Path)):
        return load_samples(mix)[0]
    items = list(mix)
    if items and all(isinstance(s, Sample) for s in items):
        return items  # type: ignore[return-value]
    return load_samples(items)[0]  # type: ignore[arg-type]


def plugin_dataset(
    tool: Any,
    examples: Sequence[ToolExample | Mapping[str, Any] | Sequence[Any]],
    *,
    mix: str | Path | Sequence[str | Path] | Sequence[Sample] | None = None,
    mix_ratio: float = 1.0,
    seed: int = 0,
) -> list[Sample]:
    """MOSS-format conversations that teach ``tool``, optionally mixed with shared MOSS data.

    Args:
        tool: A LangChain tool (or anything ``bind_tools`` accepts: a function, a pydantic model, an OpenAI dict).
        examples: One conversation each: :class:`ToolExample`, or a dict / tuple of its fields
            (``question, args, result, reply[, thoughts]``).
        mix: Shared MOSS conversations to mix in (``../shared/moss_data/conversations``, files, or samples);
            plugin conversations are preferred, so that Search, Calculate, Solve and Text2Image stay known.
        mix_ratio: Shared conversations per example conversation.
        seed: Seed of the choice of shared conversations and of the order.

    Returns:
        The conversations in a seeded order; write them with :func:`moss_agent.finetune.data.write_jsonl` for
        ``moss-agent finetune``, or pass them to the trainer's data loader as JSONL.

    Raises:
        ValueError: Without examples, or for a tool that cannot be bound.
    """
    from moss_agent.rendering import system_text
    from moss_agent.tool_binding import bind_tools

    if not examples:
        raise ValueError("plugin_dataset needs at least one example question")
    bound = bind_tools([tool])[0]
    system = system_text(None, [bound])
    out = [
        sample_from_conversation(fmt.MossConversation(system, [_turn(_example(e), bound)]), f"example {i}")
        for i, e in enumerate(examples, 1)
    ]
    rng = random.Random(seed)
    if mix is not None and mix_ratio > 0:
        pool = _shared(mix)
        on = _plugins.INNER_THOUGHTS.switch_line(True)
        plugin_pool = [s for s in pool if on in s.meta_instruction] or pool
        count = min(len(plugin_pool), round(mix_ratio * len(out)))
        out += rng.sample(plugin_pool, count)
    rng.shuffle(out)
    return out
