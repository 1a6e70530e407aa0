r"""MOSS turns as LangChain messages and back.

A ``HumanMessage`` opens a turn; an ``AIMessage`` with ``tool_calls`` gives its inner thoughts (as
``reasoning_content``) and commands; the ``ToolMessage`` answers give its results; an ``AIMessage`` with text
closes it with the reply. Consecutive messages of one role are joined by a newline. :func:`to_messages` and
:func:`from_messages` convert whole conversations; when a recorded segment cannot be rebuilt from the messages
(the data's odd commands or results), its raw text travels in ``additional_kwargs`` (:data:`RAW_COMMANDS`,
:data:`RAW_RESULTS`) and wins on the way back, so ``from_messages(to_messages(c)).to_text() == c.to_text()``.
A conversation still in progress is rendered by :mod:`moss_agent.rendering`; tool outputs become results in
:mod:`moss_agent.tool_results`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.messages.tool import invalid_tool_call, tool_call

from moss_agent.protocol import format as fmt
from moss_agent.protocol import plugins as _plugins
from moss_agent.protocol.format import Command, MossConversation, MossTurn
from moss_agent.protocol.parser import parse_commands
from moss_agent.tool_results import HIT_LINE, results_from_outputs, scrub_output, split_results

__all__ = [
    "CATEGORY",
    "CONVERSATION_ID",
    "RAW_COMMANDS",
    "RAW_RESULTS",
    "REASONING",
    "VERBATIM",
    "from_messages",
    "message_text",
    "results_from_outputs",
    "to_messages",
]

REASONING = "reasoning_content"
"""``additional_kwargs`` key of an AIMessage holding the turn's inner thoughts."""
RAW_COMMANDS = "moss_commands"
"""``additional_kwargs`` key holding a commands segment that the tool calls cannot rebuild."""
RAW_RESULTS = "moss_results"
"""``additional_kwargs`` key holding a raw results body that the ToolMessages cannot rebuild."""
VERBATIM = "moss_verbatim"
"""``additional_kwargs`` flag of a HumanMessage whose text is trusted data and is not scrubbed."""
CONVERSATION_ID = "moss_conversation_id"
"""``additional_kwargs`` key of the SystemMessage holding the conversation id."""
CATEGORY = "moss_category"
"""``additional_kwargs`` key of the SystemMessage holding the conversation category."""

# ---------------------------------------------------------------- conversations -> messages


def _arg_name(name: str) -> str:
    plugin = _plugins.by_api(name)
    return plugin.arg if plugin and plugin.arg else "input"


def stored_messages(system: str, turns: Sequence[MossTurn]) -> list[BaseMessage]:
    """Stored turns (already scrubbed) as messages that ChatMoss renders back byte for byte.

    ``VERBATIM`` keeps the human text exactly; the raw segments keep odd commands and results as they were.
    """
    messages: list[BaseMessage] = [SystemMessage(system)]
    for turn in turns:
        messages.append(HumanMessage(turn.human, additional_kwargs={VERBATIM: True}))
        raw = {REASONING: turn.inner_thoughts, RAW_COMMANDS: turn.commands, RAW_RESULTS: turn.results}
        messages.append(AIMessage(turn.reply, additional_kwargs=raw))
    return messages


def to_messages(conv: MossConversation) -> list[BaseMessage]:
    """A conversation as LangChain messages (see the module docstring for the mapping).

    Tool-call ids are ``call_{turn}_{k}``. Inner thoughts other than ``None`` go in ``reasoning_content``
    of the turn's first AIMessage. Malformed commands become ``invalid_tool_calls``.
    """
    extra: dict[str, Any] = {}
    if conv.conversation_id is not None:
        extra[CONVERSATION_ID] = conv.conversation_id
    if conv.category is not None:
        extra[CATEGORY] = conv.category
    messages: list[BaseMessage] = [SystemMessage(conv.system, additional_kwargs=extra)]
    for index, turn in enumerate(conv.turns):
        messages.extend(_turn_messages(turn, index, conv.plugins_on))
    return messages


def _turn_messages(turn: MossTurn, index: int, plugins_on: bool) -> list[BaseMessage]:
    human = HumanMessage(turn.human, additional_kwargs={VERBATIM: True} if fmt.scrub(turn.human) != turn.human else {})
    commands, invalid = parse_commands(turn.commands)
    kwargs: dict[str, Any] = {} if turn.inner_thoughts == fmt.NONE else {REASONING: turn.inner_thoughts}
    ids = [f"call_{index}_{k}" for k in range(len(commands) + len(invalid))]
    bad = [
        invalid_tool_call(name=None, args=item.text, id=ids[len(commands) + k], error=item.error)
        for k, item in enumerate(invalid)
    ]
    reply = AIMessage(turn.reply)
    if commands:
        calls = [
            tool_call(name=c.name, args={_arg_name(c.name): c.arg}, id=i) for c, i in zip(commands, ids, strict=False)
        ]
        first = AIMessage("", tool_calls=calls, invalid_tool_calls=bad, additional_kwargs=kwargs)
        outputs = split_results(turn.results, commands)
        tools: list[BaseMessage] = [
            ToolMessage(out, tool_call_id=i, name=c.name) for c, i, out in zip(commands, ids, outputs, strict=False)
        ]
        messages: list[BaseMessage] = [human, first, *tools, reply]
    else:
        first = reply = AIMessage(turn.reply, invalid_tool_calls=bad, additional_kwargs=kwargs)
        messages = [human, reply]
    # Whatever the messages cannot rebuild travels raw on the turn's first AIMessage.
    rebuilt = _build_turn(_collect_turn(messages), plugins_on)
    if rebuilt.commands != turn.commands:
        first.additional_kwargs[RAW_COMMANDS] = turn.commands
    if rebuilt.results != turn.results:
        first.additional_kwargs[RAW_RESULTS] = turn.results
    return messages


# ---------------------------------------------------------------- messages -> conversations


@dataclass
class _Open:
    human: list[str] = field(default_factory=list)
    thoughts: list[str] = field(default_factory=list)
    calls: list[tuple[str, Command]] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    invalid: dict[str, str] = field(default_factory=dict)  # invalid tool call id -> the command as written
    reply: list[str] = field(default_factory=list)
    raw_commands: str | None = None
    raw_results: str | None = None
    has_ai: bool = False
    rounds: list[_Open] = field(default_factory=list)  # each tool-calling AIMessage opens a round of the turn


def message_text(message: BaseMessage) -> str:
    """The text of a message, whatever the shape of its content."""
    return str(message.text)


def _arg_value(name: str, args: Mapping[str, Any]) -> str:
    for key in (_arg_name(name), "input"):
        if key in args:
            value = args[key]
            break
    else:
        value = (
            next(iter(args.values()))
            if len(args) == 1
            else (json.dumps(dict(args), ensure_ascii=False) if args else "")
        )
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _kind(message: BaseMessage) -> str:
    return message.type.removesuffix("MessageChunk").lower()


def from_messages(messages: Sequence[BaseMessage], *, scrub_untrusted: bool = True) -> MossConversation:
    """Rebuild a MOSS conversation from LangChain messages (the inverse of :func:`to_messages`).

    Also reads ordinary message lists: a ``HumanMessage`` opens a turn; an ``AIMessage`` with
    ``tool_calls`` gives the commands (its ``reasoning_content``, else its text, gives the inner thoughts;
    several tool-calling rounds of one turn are merged into one commands segment); ``ToolMessage`` contents
    are the tool outputs (see :func:`results_from_outputs`); an ``AIMessage`` without tool calls is the
    reply. A turn left without a reply gets an empty one. Without a ``SystemMessage`` the system text is the
    meta instruction with the switches of the plugins the tool calls use (unknown tools get switch lines of
    the same shape).

    Args:
        messages: The messages.
        scrub_untrusted: Neutralise end tokens and role tags in human text (unless the message carries
            :data:`VERBATIM`) and in tool outputs.

    Raises:
        ValueError: On a ToolMessage that answers no tool call of its turn, or a message type MOSS has no
            place for.
    """
    systems, meta, turns = _group(messages, scrub_untrusted)
    system = "".join(s if s.endswith("\n") or not s else s + "\n" for s in systems)
    if not systems:
        system = _default_system(turns)
    conv = MossConversation(system=system, turns=[], **_meta(meta))
    conv.turns = [_build_turn(t, conv.plugins_on) for t in turns]
    return conv


CommandFor = Callable[[Mapping[str, Any]], Command]
"""Writes a tool call as a MOSS command (ChatMoss uses the bound tools' command names)."""


def _default_command(call: Mapping[str, Any]) -> Command:
    return Command(call["name"], _arg_value(call["name"], call["args"]))


def _group(
    messages: Sequence[BaseMessage], scrub_untrusted: bool, command_for: CommandFor = _default_command
) -> tuple[list[str], dict[str, Any], list[_Open]]:
    """Split messages into system texts, conversation metadata and turns (the last one possibly open)."""
    systems: list[str] = []
    meta: dict[str, Any] = {}
    turns: list[_Open] = []
    current: _Open | None = None
    for message in messages:
        kind = _kind(message)
        if kind == "system":
            systems.append(message_text(message))
            meta.update({k: v for k, v in message.additional_kwargs.items() if k in (CONVERSATION_ID, CATEGORY)})
            continue
        if kind == "human" and (current is None or current.has_ai):
            current = _Open()
            turns.append(current)
        elif current is None or (kind == "ai" and current.reply and _calls_tools(message)):
            current = _Open()  # a message before any HumanMessage, or a tool-calling AI message after the reply
            turns.append(current)
        _add(current, message, kind, scrub_untrusted, command_for)
    return systems, meta, turns


def _meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    return {"conversation_id": meta.get(CONVERSATION_ID), "category": meta.get(CATEGORY)}


def _add(
    turn: _Open,
    message: BaseMessage,
    kind: str,
    scrub_untrusted: bool,
    command_for: CommandFor = _default_command,
) -> None:
    kwargs = message.additional_kwargs
    if kind == "human":
        text = message_text(message)
        turn.human.append(fmt.scrub(text) if scrub_untrusted and not kwargs.get(VERBATIM) else text)
        return
    if kind == "tool":
        assert isinstance(message, ToolMessage)
        if message.tool_call_id not in {call_id for call_id, _ in turn.calls} | set(turn.invalid):
            raise ValueError(
                f"ToolMessage {message.tool_call_id!r} answers no tool call of its turn; put it after the "
                "AIMessage whose tool_calls carry that id"
            )
        output = message_text(message)
        if scrub_untrusted:  # only Search results keep their <|N|> hit numbers
            names = {call_id: command.name for call_id, command in turn.calls}
            search = _plugins.by_api(names.get(message.tool_call_id, "")) is _plugins.WEB_SEARCH
            output = scrub_output(output) if search else fmt.scrub(output)
        turn.outputs[message.tool_call_id] = output
        for part in turn.rounds:
            if message.tool_call_id in {call_id for call_id, _ in part.calls} | set(part.invalid):
                part.outputs[message.tool_call_id] = output
        return
    if kind != "ai":
        raise ValueError(f"MOSS has no place for a {type(message).__name__}; use System, Human, AI or Tool messages")
    assert isinstance(message, AIMessage)
    opens_round = bool(message.tool_calls) or (bool(message.invalid_tool_calls) and not message_text(message))
    parts = [turn]
    if opens_round:
        turn.rounds.append(_Open(has_ai=True))
        parts.append(turn.rounds[-1])
    for part in parts:
        part.has_ai = True
        part.raw_commands = kwargs.get(RAW_COMMANDS, part.raw_commands)
        part.raw_results = kwargs.get(RAW_RESULTS, part.raw_results)
    reasoning = kwargs.get(REASONING)
    for bad in message.invalid_tool_calls:
        if bad.get("id"):  # answered by an error ToolMessage (LangChain agents do so): shown as a result
            for part in parts:
                part.invalid[str(bad["id"])] = str(bad.get("args") or bad.get("name") or "")
    if message.tool_calls:
        thoughts = reasoning if isinstance(reasoning, str) else message_text(message).strip()
        for number, call in enumerate(message.tool_calls):
            call_id = call.get("id") or f"call_{len(turn.calls)}_{number}"
            command = command_for(call)
            for part in parts:
                part.calls.append((call_id, command))
        if thoughts and thoughts != fmt.NONE:
            for part in parts:
                part.thoughts.append(thoughts)
        return
    if isinstance(reasoning, str) and not turn.thoughts:
        turn.thoughts.append(reasoning)
    if message.invalid_tool_calls and not message_text(message):
        return  # only malformed commands: the turn waits for their error results
    turn.reply.append(message_text(message))


def _calls_tools(message: BaseMessage) -> bool:
    return bool(isinstance(message, AIMessage) and (message.tool_calls or message.invalid_tool_calls))


def _build_turn(turn: _Open, plugins_on: bool, first_hit: int = 1) -> MossTurn:
    """The turn in MOSS's layout; several tool rounds are merged into one commands and one results segment."""
    if len(turn.rounds) > 1:
        return _merge_rounds(turn, plugins_on)
    commands = [command for _, command in turn.calls]
    if turn.raw_results is not None:
        results = turn.raw_results
    elif commands:
        pairs = [(command, turn.outputs.get(call_id, _plugins.NO_RESULT)) for call_id, command in turn.calls]
        # Outputs were scrubbed as they were read.
        results = results_from_outputs(pairs, scrub_untrusted=False, first_hit=first_hit)
    else:
        results = fmt.results_body(None, plugins_on=plugins_on)
    errors = [
        _plugins.format_result_entry(text, turn.outputs[i], "inline")
        for i, text in turn.invalid.items()
        if i in turn.outputs
    ]
    if errors and turn.raw_results is None:
        results = (results if commands and results.startswith("\n") else "\n") + "".join(errors)
    return MossTurn(
        human="\n".join(turn.human),
        reply="\n".join(turn.reply),
        inner_thoughts="\n".join(turn.thoughts) or fmt.NONE,
        commands=turn.raw_commands if turn.raw_commands is not None else fmt.commands_text(commands),
        results=results,
    )


def round_segments(turn: _Open, plugins_on: bool) -> list[MossTurn]:
    """Each tool round of a turn as its own thoughts, commands and results (Search hits numbered on)."""
    built, hits = [], 0
    for part in turn.rounds:
        one = _build_turn(part, plugins_on, first_hit=hits + 1)
        hits += len(HIT_LINE.findall(one.results))
        built.append(one)
    return built


def _merge_rounds(turn: _Open, plugins_on: bool) -> MossTurn:
    """Several tool rounds of one turn as the trained layout writes several commands: one segment each."""
    parts = round_segments(turn, plugins_on)
    commands = ", ".join(p.commands for p in parts if p.commands != fmt.NONE) or fmt.NONE
    if turn.raw_results is not None and not any(r.raw_results for r in turn.rounds):
        results = turn.raw_results  # given on the reply (MossAgent's layout)
    elif any(r.raw_results is not None for r in turn.rounds):
        bodies = [p.results for p in parts if p.results.strip() not in ("", fmt.NONE)]
        results = bodies[0] + "".join(b.removeprefix("\n") for b in bodies[1:]) if bodies else parts[0].results
    else:
        whole = _Open(calls=turn.calls, outputs=turn.outputs, invalid=turn.invalid)
        results = _build_turn(whole, plugins_on).results
    return MossTurn(
        human="\n".join(turn.human),
        reply="\n".join(turn.reply),
        inner_thoughts="\n".join(turn.thoughts) or fmt.NONE,
        commands=commands,
        results=results,
    )


def _collect_turn(messages: Sequence[BaseMessage]) -> _Open:
    turn = _Open()
    for message in messages:
        _add(turn, message, _kind(message), scrub_untrusted=True)
    return turn


def _default_system(turns: Sequence[_Open]) -> str:
    names = list(dict.fromkeys(command.name for turn in turns for _, command in turn.calls))
    trained = [p for p in (_plugins.by_api(n) for n in names) if p is not None]
    extra = [
        _plugins.custom_plugin(n)
        for n in names
        if _plugins.by_api(n) is None and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n)
    ]
    return fmt.system_prompt(trained, extra=extra, inner_thoughts=bool(names) or None)
