r"""MOSS turns as LangChain messages and back, and the prompt for the next generation.

A ``HumanMessage`` opens a turn; an ``AIMessage`` with ``tool_calls`` gives its inner thoughts (as
``reasoning_content``) and commands; the ``ToolMessage`` answers give its results; an ``AIMessage`` with text
closes it with the reply. Consecutive messages of one role are joined by a newline. :func:`to_messages` and
:func:`from_messages` convert whole conversations; when a recorded segment cannot be rebuilt from the messages
(the data's odd commands or results), its raw text travels in ``additional_kwargs`` (:data:`RAW_COMMANDS`,
:data:`RAW_RESULTS`) and wins on the way back, so ``from_messages(to_messages(c)).to_text() == c.to_text()``.
:func:`render_messages` does the same for a conversation still in progress: what is left open at the end (a
question, or a question with tool answers) is the pending turn the model answers next.
"""

from __future__ import annotations

import ast
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
from moss_agent.tool_binding import BoundTool, command_for_tool_call

__all__ = [
    "CATEGORY",
    "CONVERSATION_ID",
    "RAW_COMMANDS",
    "RAW_RESULTS",
    "REASONING",
    "VERBATIM",
    "PendingTurn",
    "RenderedChat",
    "from_messages",
    "message_text",
    "render_messages",
    "results_from_outputs",
    "system_text",
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

# ---------------------------------------------------------------- results from tool outputs

_HIT_LINE = re.compile(r"^<\|\d+\|>: ", re.MULTILINE)
_LETTER_TAG = re.compile(r"<\|([A-Za-z][^|<>\n]{0,39})\|>")
_END_TOKEN = re.compile("|".join(re.escape(t) for t in fmt.END_TOKENS))


def _scrub_output(text: str) -> str:
    """Scrub a tool output but keep the ``<|N|>`` hit numbers of search results."""
    return _LETTER_TAG.sub(r"<\1>", _END_TOKEN.sub(" ", text))


def _quoted(value: str) -> bool:
    """Whether ``value`` is already a string written as Python's repr writes it."""
    try:
        parsed = ast.literal_eval(value) if value[:1] in ("'", '"') else None
    except (ValueError, SyntaxError):
        return False
    return isinstance(parsed, str) and repr(parsed) == value


def results_from_outputs(calls: Sequence[tuple[Command, str]], *, scrub_untrusted: bool = True) -> str:
    r"""The raw results body for commands and their tool outputs, as the data writes it.

    Entries follow the release's execution order (Search, Calculate, Solve, Text2Image, then others); Search
    hits are numbered on across the turn; a plain-text search output becomes one quoted hit; a Calculate
    value is quoted; a lone successful Text2Image gives the bare ``Image generated successfully.``.

    Args:
        calls: Each command with the text its tool returned (``ToolMessage.content``).
        scrub_untrusted: Neutralise end tokens and role tags in the outputs.

    Returns:
        The body between ``<|Results|>:`` and ``<eor>`` (``"\nNone\n"`` when there are no calls).
    """
    order = {api: i for i, api in enumerate(_plugins.EXECUTION_ORDER)}
    rows = sorted(calls, key=lambda row: order.get(row[0].name, len(order)))
    if len(rows) == 1 and _plugins.by_api(rows[0][0].name) is _plugins.TEXT_TO_IMAGE:
        if rows[0][1].strip() in ("", _plugins.TEXT2IMAGE_DONE):
            return fmt.results_body([_plugins.TEXT2IMAGE_DONE])
    entries, next_hit = [], 1
    for command, output in rows:
        output = _scrub_output(output) if scrub_untrusted else output
        plugin = _plugins.by_api(command.name)
        layout = plugin.layout if plugin else "inline"
        if plugin is _plugins.WEB_SEARCH:
            if _HIT_LINE.search(output):
                output, next_hit = _plugins.renumber_search_hits(output, next_hit)
            else:
                snippets = [] if output.strip() in ("", _plugins.NO_RESULT) else [output]
                output = _plugins.format_search_hits(snippets, start=next_hit)
                next_hit += len(snippets)
        elif plugin is _plugins.CALCULATOR and not _quoted(output):
            output = _plugins.format_calculate(output)
        entries.append(_plugins.format_result_entry(str(command), output, layout))
    return fmt.results_body(entries)


def _split_results(body: str, commands: Sequence[Command]) -> list[str]:
    """Each command's output (what follows ``=>``) in a recorded results body; ``""`` when it has none."""
    outputs = [""] * len(commands)
    if body.strip() == _plugins.TEXT2IMAGE_DONE and len(commands) == 1:
        return [_plugins.TEXT2IMAGE_DONE]
    starts: list[tuple[int, int, int]] = []  # (entry start, output start, command index)
    taken: set[int] = set()
    for index, command in enumerate(commands):
        header = f"\n{command} =>"
        at = body.find(header)
        while at >= 0 and at in taken:
            at = body.find(header, at + 1)
        if at >= 0:
            taken.add(at)
            starts.append((at, at + len(header), index))
    starts.sort()
    ends = [start for start, _, _ in starts[1:]] + [len(body)]
    for (_, begin, index), nxt in zip(starts, ends, strict=False):
        chunk = body[begin:nxt]
        outputs[index] = chunk[1:] if chunk.startswith((" ", "\n")) else chunk
        outputs[index] = outputs[index].removesuffix("\n")
    return outputs


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
        outputs = _split_results(turn.results, commands)
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
        turn.outputs[message.tool_call_id] = _scrub_output(output) if scrub_untrusted else output
        return
    if kind != "ai":
        raise ValueError(f"MOSS has no place for a {type(message).__name__}; use System, Human, AI or Tool messages")
    assert isinstance(message, AIMessage)
    turn.has_ai = True
    turn.raw_commands = kwargs.get(RAW_COMMANDS, turn.raw_commands)
    turn.raw_results = kwargs.get(RAW_RESULTS, turn.raw_results)
    reasoning = kwargs.get(REASONING)
    for bad in message.invalid_tool_calls:
        if bad.get("id"):  # answered by an error ToolMessage (LangChain agents do so): shown as a result
            turn.invalid[str(bad["id"])] = str(bad.get("args") or bad.get("name") or "")
    if message.tool_calls:
        thoughts = reasoning if isinstance(reasoning, str) else message_text(message).strip()
        if thoughts:
            turn.thoughts.append(thoughts)
        for number, call in enumerate(message.tool_calls):
            call_id = call.get("id") or f"call_{len(turn.calls)}_{number}"
            turn.calls.append((call_id, command_for(call)))
        return
    if isinstance(reasoning, str) and not turn.thoughts:
        turn.thoughts.append(reasoning)
    if message.invalid_tool_calls and not message_text(message):
        return  # only malformed commands: the turn waits for their error results
    turn.reply.append(message_text(message))


def _calls_tools(message: BaseMessage) -> bool:
    return bool(isinstance(message, AIMessage) and (message.tool_calls or message.invalid_tool_calls))


def _build_turn(turn: _Open, plugins_on: bool) -> MossTurn:
    commands = [command for _, command in turn.calls]
    if turn.raw_results is not None:
        results = turn.raw_results
    elif commands:
        pairs = [(command, turn.outputs.get(call_id, _plugins.NO_RESULT)) for call_id, command in turn.calls]
        # Outputs were scrubbed as they were read.
        results = results_from_outputs(pairs, scrub_untrusted=False)
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


# ---------------------------------------------------------------- a conversation in progress -> prompt parts


def system_text(
    custom: str | None,
    tools: Sequence[BoundTool],
    *,
    style: fmt.SwitchStyle = "trained",
) -> str:
    """The system text: meta instruction (with any custom instructions) and the switch block.

    Args:
        custom: Text of the caller's SystemMessage. A full MOSS system text (starting with the meta instruction)
            is used as it is; other text is added as further lines of the meta instruction, before its
            capabilities line.
        tools: Bound tools: MOSS plugins switch on their trained lines, others get lines of the same shape.
        style: The switch block style.
    """
    if custom and custom.startswith(fmt.META_INSTRUCTION.split("\n", 1)[0]):
        return custom if custom.endswith("\n") else custom + "\n"
    meta = fmt.META_INSTRUCTION
    if custom:
        head, capabilities = meta.rsplit("Capabilities", 1)
        lines = "".join(line.rstrip() + "\n" for line in custom.strip().splitlines() if line.strip())
        meta = head + lines + "Capabilities" + capabilities
    trained = [t.plugin for t in tools if t.plugin.trained]
    extra = [t.plugin for t in tools if not t.plugin.trained]
    return meta + fmt.switch_block(trained, style=style, extra=extra)


@dataclass
class PendingTurn:
    """The open turn the model answers next.

    Attributes:
        human: The user's text, scrubbed.
        inner_thoughts: Inner thoughts of the tool-calling AIMessage, if any.
        commands: The commands segment content, if tools were called.
        results: The raw results body, once the tools have answered.
    """

    human: str
    inner_thoughts: str | None = None
    commands: str | None = None
    results: str | None = None


@dataclass
class RenderedChat:
    """Messages rendered for MOSS: the finished turns and the pending one.

    Attributes:
        system: Meta instruction and switch block.
        turns: Finished turns.
        pending: The open turn, or None when the last message is a reply.
    """

    system: str
    turns: list[MossTurn] = field(default_factory=list)
    pending: PendingTurn | None = None

    @property
    def history(self) -> str:
        """System text and finished turns."""
        return self.system + "".join(t.to_text() for t in self.turns)


def render_messages(
    messages: Sequence[BaseMessage],
    tools: Sequence[BoundTool] = (),
    *,
    style: fmt.SwitchStyle = "trained",
    scrub_untrusted: bool = True,
) -> RenderedChat:
    """Group the messages of a conversation in progress into MOSS turns and the pending one.

    Args:
        messages: The conversation; SystemMessages anywhere give the system text.
        tools: The bound tools (decide the switch block and the command names of tool calls).
        style: The switch block style when no full MOSS system text is given.
        scrub_untrusted: Neutralise end tokens and role tags in human text and tool outputs.

    Raises:
        ValueError: On an empty message list, or a message MOSS has no place for.
    """
    if not messages:
        raise ValueError("MOSS needs at least one message")
    systems, _, turns = _group(messages, scrub_untrusted, lambda call: command_for_tool_call(call, tools))
    system = system_text("\n".join(systems) or None, tools, style=style)
    plugins_on = _plugins.INNER_THOUGHTS.switch_line(True) in system
    rendered = RenderedChat(system)
    if turns and not turns[-1].reply:
        last = turns.pop()
        answered = last.raw_results is not None or bool(last.outputs)
        built = _build_turn(last, plugins_on)
        rendered.pending = PendingTurn(
            human=built.human,
            inner_thoughts=built.inner_thoughts if last.thoughts else None,
            commands=built.commands if last.calls or last.raw_commands is not None else None,
            results=built.results if answered else None,
        )
    rendered.turns = [_build_turn(t, plugins_on) for t in turns]
    return rendered
