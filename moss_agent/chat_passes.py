r"""The generation passes of one ChatMoss call: MOSS's plugin protocol, tool round after tool round.

A call with tools bound runs pass 1 (inner thoughts and ``<|Commands|>``, until ``<eoc>``); commands become
``tool_calls``. Once the caller sends the ``ToolMessage`` answers, MOSS may call tools again: a decision pass
re-opens the inner thoughts after the results (see :mod:`moss_agent.rendering` for why this layout), and only
when MOSS writes no new command does it reply, in the merged layout the trained data uses for a turn with
several commands. A forced ``tool_choice`` (``"any"``, a tool name) prefills the start of a command where MOSS
wrote none, which is the one way the trained format offers to make it call something. A ``response_format``
schema is a tool MOSS is made to call instead of replying; its arguments become the reply as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from langchain_core.messages import BaseMessage
from langchain_core.messages.tool import invalid_tool_call

from moss_agent import settings
from moss_agent.engines.base import Delta, Generation, SamplingParams
from moss_agent.faces import MossRequestError
from moss_agent.protocol import format as fmt
from moss_agent.protocol import stream
from moss_agent.protocol.format import Command
from moss_agent.protocol.plugins import format_result_entry
from moss_agent.rendering import RenderedChat, render_messages
from moss_agent.tool_binding import BoundTool, ToolChoice, bind_tools, new_call_id, resolve_tool_choice, to_tool_call

__all__ = ["ChatFace", "Outcome", "Passes", "Piece", "Prepared", "prepare", "response_schema"]


class ChatFace(Protocol):
    """What the passes read of the ChatMoss that runs them (a protocol, so that ChatMoss imports this module)."""

    switch_style: fmt.SwitchStyle
    max_tool_rounds: int
    invalid_commands: Literal["return", "answer"]

    def _check_model(self, kwargs: Mapping[str, Any]) -> None: ...

    def _params(
        self, stop: Sequence[str] | None, stop_tokens: tuple[str, ...], options: Mapping[str, Any] | None = None
    ) -> SamplingParams: ...


Run = Callable[[str, SamplingParams], Iterator[Delta]]
"""Runs one generation pass, yielding deltas (one whole delta when not streaming)."""


@dataclass
class Piece:
    """A piece of streamed text: reply content or inner thoughts."""

    kind: Literal["reply", "thoughts"]
    text: str


@dataclass
class Outcome:
    """The parsed result of a whole ChatMoss call."""

    reply: str = ""
    thoughts: str | None = None
    commands: str | None = None
    results: str | None = None
    tool_calls: list[Any] = field(default_factory=list)
    invalid: list[Any] = field(default_factory=list)
    generations: list[Generation] = field(default_factory=list)
    dropped_turns: int = 0


Steps = Generator[Piece, None, Outcome]


def response_schema(value: Any) -> BoundTool | None:
    """The tool standing for a ``response_format`` (OpenAI ``json_schema`` dict, pydantic class or schema).

    Raises:
        ValueError: For ``{"type": "json_object"}`` (MOSS needs a schema to fill) or a schema it cannot bind.
    """
    if value is None:
        return None
    spec = value
    if isinstance(value, dict) and value.get("type") == "json_object":
        raise MossRequestError(
            "ChatMoss needs a schema for JSON output: use response_format={'type': 'json_schema', ...}"
        )
    if isinstance(value, dict) and value.get("type") == "json_schema":
        inner = value.get("json_schema") or {}
        spec = {
            "type": "function",
            "function": {
                "name": inner.get("name") or "Response",
                "description": inner.get("description") or "Give the final answer in this form.",
                "parameters": inner.get("schema") or {},
            },
        }
    return bind_tools([spec])[0]


@dataclass
class Prepared:
    """A call's messages rendered, with what it binds."""

    rendered: RenderedChat
    choice: ToolChoice
    tools: list[BoundTool]
    schema: BoundTool | None
    rounds: int

    @property
    def decides_again(self) -> bool:
        """Whether the tools have answered and MOSS gets a decision pass before (or instead of) replying."""
        pending = self.rendered.pending
        if pending is None or pending.results is None or not pending.rounds or not self.tools:
            return False
        return self.choice != "auto" or self.schema is not None or len(pending.rounds) < self.rounds


def prepare(chat: ChatFace, messages: Sequence[BaseMessage], kwargs: dict[str, Any]) -> Prepared:
    """Render ``messages`` with the call's tools, tool choice and response format.

    Raises:
        ValueError: When the messages end with MOSS's reply, or with tool calls no ToolMessage answers.
    """
    chat._check_model(kwargs)
    tools = bind_tools(kwargs.get("tools") or [])
    choice = resolve_tool_choice(kwargs.get("tool_choice"), tools)
    if choice == "none":
        tools = []
    schema = response_schema(kwargs.get("response_format"))
    if schema is not None and all(t.command != schema.command for t in tools):
        tools = [*tools, schema]
    rendered = render_messages(messages, tools, style=chat.switch_style)
    pending = rendered.pending
    if pending is None:
        raise MossRequestError(
            "the last message is already MOSS's reply; end the messages with a HumanMessage or ToolMessage"
        )
    if pending.commands not in (None, fmt.NONE) and pending.results is None:
        raise MossRequestError(
            "the last AIMessage has tool calls that no ToolMessage answers; add one ToolMessage per tool call "
            "(with its tool_call_id) before calling the model again"
        )
    rounds = int(kwargs.get("max_tool_rounds", chat.max_tool_rounds))
    return Prepared(rendered, choice, tools, schema, rounds)


class Passes:
    """The passes of one call over ``run``; ``count`` (tokens of a text) is given when turns may be dropped."""

    def __init__(
        self,
        chat: ChatFace,
        run: Run,
        stop: list[str] | None,
        options: dict[str, Any],
        count: Callable[[str], int] | None,
        window: int = settings.CONTEXT_WINDOW,
    ) -> None:
        self.chat, self.run, self.stop, self.options = chat, run, stop, options
        self.count, self.window = count, window

    def _fit(self, rendered: RenderedChat, prompt: str, outcome: Outcome) -> str:
        if self.count is None:
            return prompt
        room = self.window - self.chat._params(self.stop, (), self.options).max_new_tokens
        count = self.count
        prompt = rendered.fit(prompt, lambda text: count(text) <= room)
        outcome.dropped_turns = rendered.dropped
        return prompt

    def steps(self, prepared: Prepared) -> Steps:
        """The passes of one call: yields text pieces as they come, returns the outcome."""
        rendered, tools = prepared.rendered, prepared.tools
        pending = rendered.pending
        assert pending is not None
        outcome = Outcome()
        if pending.results is not None:  # the tools have answered
            if prepared.decides_again:
                prompt = self._fit(rendered, rendered.history + pending.next_round_prefix(), outcome)
                undecided = yield from self._decide(prompt, prepared, outcome, pending.done_commands())
                if undecided is None:
                    return outcome
                outcome.commands = None  # no new round: the reply closes the rounds already in the messages
            prompt = self._fit(rendered, rendered.history + pending.reply_prefix(), outcome)
            yield from self._reply(prompt, outcome)
            return outcome
        if not tools:
            prompt = self._fit(rendered, fmt.chat_prompt(rendered.system, rendered.turns, pending.human), outcome)
            yield from self._reply(prompt, outcome)
            return outcome
        pass1 = self._fit(rendered, fmt.plugin_pass1_prompt(rendered.system, rendered.turns, pending.human), outcome)
        repaired = yield from self._decide(pass1, prepared, outcome, set())
        if repaired is not None:  # no command: MOSS answers at once (results None), continuing from the cached prefix
            yield from self._reply(pass1 + repaired + fmt.segment(fmt.RESULTS, "\nNone\n") + fmt.MOSS + ":", outcome)
        return outcome

    def _decide(
        self, prompt: str, prepared: Prepared, outcome: Outcome, done: set[str]
    ) -> Generator[Piece, None, str | None]:
        """Pass 1 after ``prompt``: tool calls, a reply or JSON go into ``outcome``; returns None then.

        When MOSS wrote no command (and none was forced), returns the repaired pass-1 text instead, for the
        caller to continue with a reply.
        """
        tools, choice, schema = prepared.tools, prepared.choice, prepared.schema
        parsed = yield from self._pass1(prompt, "", outcome)
        pairs = _fresh(parsed, tools, done)
        target = _forced_target(choice, [c for _, c in pairs], [t for t in tools if t is not schema], done)
        if target is None and schema is not None and not _valid(c for _, c in pairs):
            target = schema  # no tool to run: MOSS gives its answer in the schema's form
        if target is not None:  # write the start of the command for it
            opened = f' {parsed.inner_thoughts}{fmt.EOT}\n{fmt.COMMANDS}: {target.command}("'
            parsed = yield from self._pass1(prompt + opened, opened, outcome)
            pairs = _fresh(parsed, tools, done)
        outcome.thoughts = parsed.inner_thoughts
        if schema is not None:
            answer = next((c for _, c in pairs if c["type"] == "tool_call" and c["name"] == schema.name), None)
            pairs = [(command, c) for command, c in pairs if c["name"] != schema.name]
            if answer is not None and not _valid(c for _, c in pairs):
                outcome.reply = json.dumps(answer["args"], ensure_ascii=False)
                yield Piece("reply", outcome.reply)
                return None
        calls = [c for _, c in pairs]
        outcome.commands = parsed.raw_commands if parsed.invalid else fmt.commands_text([c for c, _ in pairs])
        for call in calls:
            (outcome.tool_calls if call["type"] == "tool_call" else outcome.invalid).append(call)
        outcome.invalid.extend(
            invalid_tool_call(name=None, args=bad.text, id=new_call_id(), error=bad.error) for bad in parsed.invalid
        )
        if outcome.tool_calls:
            return None
        if outcome.invalid and done and choice == "auto":
            # A later round: MOSS has results to answer from, so malformed commands are dropped and it replies.
            outcome.invalid = []
            return parsed.repaired
        if outcome.invalid and (self.chat.invalid_commands == "return" or choice != "auto"):
            return None
        if outcome.invalid:  # nothing to run: MOSS reads the errors as its results and answers (as MossAgent does)
            outcome.results = "\n" + "".join(
                format_result_entry(str(c["args"]), str(c["error"]), "inline") for c in outcome.invalid
            )
            written = f" {parsed.inner_thoughts}{fmt.EOT}\n" + fmt.segment(fmt.COMMANDS, outcome.commands)
            yield from self._reply(
                prompt + written + fmt.segment(fmt.RESULTS, outcome.results) + fmt.MOSS + ":", outcome
            )
            return None
        if parsed.reply is not None:  # MOSS skipped the results and answered in pass 1
            outcome.commands = None if done else outcome.commands
            outcome.reply = _cut(parsed.reply, self.chat._params(self.stop, ()).stop)
            yield Piece("reply", outcome.reply)
            return None
        return parsed.repaired

    def _pass1(self, prompt: str, opened: str, outcome: Outcome) -> Generator[Piece, None, stream.Pass1]:
        """Generate pass 1 after ``prompt`` (whose prefilled tail ``opened`` belongs to pass 1's text).

        Yields the inner thoughts as they come (not those of ``opened``, already sent); user stop strings do
        not apply (they would cut the commands).
        """
        parser = stream.StreamParser("pass1")
        parser.feed(opened)
        thoughts = _Thoughts()
        final: Generation | None = None
        for delta in self.run(prompt, self.chat._params((), (fmt.EOC, fmt.EOM), self.options)):
            for event in parser.feed(delta.text):
                if event.kind == "thoughts" and not opened:
                    yield from thoughts.feed(event.text)
            final = delta.generation or final
        assert final is not None, "the engine ended without a Generation"
        for event in parser.finish(final.stop_reason):
            if event.kind == "thoughts" and not opened:
                yield from thoughts.feed(event.text)
        yield from thoughts.finish()
        outcome.generations.append(final)
        assert parser.pass1 is not None
        return parser.pass1

    def _reply(self, prompt: str, outcome: Outcome) -> Iterator[Piece]:
        """Generate a reply, yielding its text as it comes (never part of an end token or role tag)."""
        parser = stream.StreamParser("reply")
        final: Generation | None = None
        for delta in self.run(prompt, self.chat._params(self.stop, (fmt.EOM,), self.options)):
            for event in parser.feed(delta.text):
                yield Piece("reply", event.text)
            final = delta.generation or final
        assert final is not None, "the engine ended without a Generation"
        for event in parser.finish(final.stop_reason):
            yield Piece("reply", event.text)
        outcome.generations.append(final)
        outcome.reply = parser.reply.text if parser.reply else ""


class _Thoughts:
    """Streams inner thoughts, holding back a text that may still be the ``None`` of a turn without any."""

    def __init__(self) -> None:
        self._held: str | None = ""  # None once the thoughts are known not to be "None"

    def feed(self, text: str) -> Iterator[Piece]:
        if self._held is not None:
            self._held += text
            if fmt.NONE.startswith(self._held):
                return
            text, self._held = self._held, None
        yield Piece("thoughts", text)

    def finish(self) -> Iterator[Piece]:
        if self._held and self._held != fmt.NONE:
            yield Piece("thoughts", self._held)
        self._held = None


def _valid(calls: Iterable[Any]) -> bool:
    return any(c["type"] == "tool_call" for c in calls)


def _fresh(parsed: stream.Pass1, tools: Sequence[BoundTool], done: set[str]) -> list[tuple[Command, Any]]:
    """Each command of pass 1 with its tool call, without repeats of commands already run in this turn."""
    return [(c, to_tool_call(c, tools)) for c in parsed.commands if str(c) not in done]


def _forced_target(
    choice: ToolChoice, calls: Sequence[Any], tools: Sequence[BoundTool], done: set[str]
) -> BoundTool | None:
    """The tool whose command to prefill when a forced choice was not met by pass 1, else None.

    For ``"any"``: the tool MOSS tried with bad arguments, else the first tool not yet used in this turn.
    """
    if choice in ("auto", "none") or not tools:
        return None
    valid = [c["name"] for c in calls if c["type"] == "tool_call"]
    if isinstance(choice, BoundTool):
        return None if choice.name in valid else choice
    if valid:
        return None
    tried = [t for c in calls for t in tools if c["name"] == t.name]  # a call to a bound tool with bad args
    used = {d.split("(", 1)[0] for d in done}
    return tried[0] if tried else next((t for t in tools if t.command not in used), tools[0])


def _cut(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first stop string in it."""
    cuts = [i for s in stops if s and (i := text.find(s)) >= 0]
    return text[: min(cuts)].rstrip() if cuts else text
