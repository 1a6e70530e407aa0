r"""MossAgent: MOSS's native two-pass plugin loop as a LangChain Runnable.

One turn, as the release's backend ran it:

1. pass 1, prompt ending ``<|Inner Thoughts|>:``, until ``<eoc>``: inner thoughts and commands;
2. the commands whose plugin is enabled, at most four, in the order Search, Calculate, Solve, Text2Image, run
   concurrently; anything else (unknown or malformed commands, tool failures) becomes a result text the model reads;
3. pass 2 continues from the cached prefix, after ``<|Results|>:...<eor>\\n<|MOSS|>:``, until ``<eom>``.

The turn goes into memory in MOSS's layout, so the next turn's prompt extends this one and the engine's prefix
cache serves it.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.runnables import RunnableConfig, RunnableSerializable, ensure_config
from langchain_core.runnables.config import run_in_executor
from langchain_core.tools import BaseTool
from pydantic import ConfigDict, Field

from moss_agent import format as fmt
from moss_agent import plugins as _plugins
from moss_agent.chat_model import ChatMoss
from moss_agent.engine import Engine
from moss_agent.format import Command
from moss_agent.messages import (
    RAW_COMMANDS,
    RAW_RESULTS,
    REASONING,
    VERBATIM,
    message_text,
    results_from_outputs,
    system_text,
)
from moss_agent.tool_binding import bind_tools, command_for_tool_call

__all__ = ["AgentEvent", "CommandRun", "MossAgent", "TurnResult"]

_OVER_LIMIT = f"Not run: at most {_plugins.MAX_COMMANDS} commands run in one turn."


@dataclass
class CommandRun:
    """One command of a turn and what came of it.

    Attributes:
        text: The command as MOSS wrote it, e.g. ``Search("x")``.
        command: The parsed command; None when MOSS wrote something unreadable.
        tool: The LangChain tool that ran it; None when no tool answers it.
        args: The tool's arguments.
        output: The result text MOSS reads.
        artifact: The tool's structured result (image path, search hits ...), if any.
        error: Why the command did not run or failed, if it did.
    """

    text: str
    command: Command | None = None
    tool: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    output: str = _plugins.NO_RESULT
    artifact: Any = None
    error: str | None = None


@dataclass
class TurnResult:
    """Everything one agent turn produced.

    Attributes:
        input: The user's text.
        output: MOSS's reply.
        inner_thoughts: The inner thoughts (``None`` as MOSS writes it when there are none).
        commands: The commands segment as MOSS wrote it.
        results: The results body as MOSS read it.
        runs: The commands, their results and artifacts.
        turn: The turn in MOSS's layout, as stored in memory.
        usage: Token usage over both passes.
    """

    input: str
    output: str
    inner_thoughts: str
    commands: str
    results: str
    runs: list[CommandRun]
    turn: fmt.MossTurn
    usage: dict[str, Any] = field(default_factory=dict)

    @property
    def artifacts(self) -> list[Any]:
        """The artifacts of the turn's tools (image paths, search hits ...)."""
        return [r.artifact for r in self.runs if r.artifact is not None]

    def to_dict(self) -> dict[str, Any]:
        """A plain dict, the Runnable's output."""
        data = asdict(self)
        data["artifacts"] = self.artifacts
        return data


@dataclass
class AgentEvent:
    """A streamed agent event.

    Attributes:
        type: ``thoughts``, ``command``, ``result``, ``reply`` (a text delta) or ``turn`` (the end).
        data: The text, the CommandRun, or the TurnResult.
    """

    type: str
    data: Any


class MossAgent(RunnableSerializable[dict[str, Any] | str, dict[str, Any]]):
    """MOSS with its plugins, turn after turn, as the release ran it.

    Example:
        .. code-block:: python

            from moss_agent import MossAgent
            from moss_agent.tools import CalculatorTool, SearchTool

            agent = MossAgent("fnlp/moss-moon-003-sft-plugin", tools=[SearchTool(), CalculatorTool()])
            agent.invoke({"input": "What is 2^10?"})["output"]
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    chat: ChatMoss
    """The chat model (and engine) the agent drives."""
    tools: list[BaseTool] = Field(default_factory=list)
    """The tools; MOSS's four plugins map to their trained names, others get a switch line of the same shape."""
    memory: Any = None
    """A :mod:`moss_agent.memory` memory; without one the agent keeps all turns in a plain list."""
    max_commands: int = _plugins.MAX_COMMANDS
    """Most commands run per turn (the release ran four)."""
    system: str | None = None
    """Extra instructions for the meta instruction, or a whole MOSS system text."""
    history: list[fmt.MossTurn] = Field(default_factory=list)
    """Turns so far, when no memory is given."""

    def __init__(self, model: ChatMoss | Engine | str | None = None, **kwargs: Any) -> None:
        if model is not None and "chat" not in kwargs:
            if isinstance(model, ChatMoss):
                kwargs["chat"] = model
            elif isinstance(model, str):
                kwargs["chat"] = ChatMoss(model=model)
            else:
                kwargs["chat"] = ChatMoss(engine=model)
        super().__init__(**kwargs)

    # ------------------------------------------------------------------ state

    def _turns(self) -> list[fmt.MossTurn]:
        return list(self.memory.turns()) if self.memory is not None else list(self.history)

    def _remember(self, turn: fmt.MossTurn, artifacts: list[Any]) -> None:
        if self.memory is not None:
            self.memory.add_turn(turn, artifacts=artifacts or None)
        else:
            self.history.append(turn)

    def _messages(self, human: str) -> list[BaseMessage]:
        """System text, the turns memory shows, and the new question, as ChatMoss messages."""
        system = system_text(self.system, bind_tools(self.tools), style=self.chat.switch_style)
        if self.memory is not None:
            if self.memory.system != system:
                self.memory.system = system  # counted by token budgets and saved with the session
            self.memory.fit(fmt.segment(fmt.HUMAN, human) + fmt.THOUGHTS + ":")
        messages: list[BaseMessage] = [SystemMessage(system)]
        for turn in self._turns():
            messages.append(HumanMessage(turn.human, additional_kwargs={VERBATIM: True}))
            messages.append(
                AIMessage(
                    turn.reply,
                    additional_kwargs={
                        REASONING: turn.inner_thoughts,
                        RAW_COMMANDS: turn.commands,
                        RAW_RESULTS: turn.results,
                    },
                )
            )
        messages.append(HumanMessage(human, additional_kwargs={VERBATIM: True}))  # scrubbed by _turn
        return messages

    # ------------------------------------------------------------------ one turn

    def _run_commands(self, ai: AIMessage, config: RunnableConfig) -> list[CommandRun]:
        """Run the turn's commands: at most ``max_commands``, in release order, concurrently."""
        by_name = {t.name: t for t in self.tools}
        bound = bind_tools(self.tools)
        order = {api: i for i, api in enumerate(_plugins.EXECUTION_ORDER)}
        calls = sorted(ai.tool_calls, key=lambda c: order.get(command_for_tool_call(c, bound).name, len(order)))
        skipped: list[CommandRun] = []
        for bad in ai.invalid_tool_calls:
            name, text = bad.get("name"), str(bad.get("args") or "")
            error = bad.get("error") or "invalid command"
            command = Command(name, text) if name else None  # an unknown command, or unreadable text
            skipped.append(CommandRun(str(command) if command else text, command, error=error, output=error))
        for extra in calls[self.max_commands :]:
            command = command_for_tool_call(extra, bound)
            skipped.append(
                CommandRun(str(command), command, extra["name"], extra["args"], _OVER_LIMIT, error=_OVER_LIMIT)
            )

        def call(tc: Any) -> CommandRun:
            command = command_for_tool_call(tc, bound)
            run = CommandRun(str(command), command, tc["name"], tc["args"])
            try:
                message = by_name[tc["name"]].invoke(tc, config=config)
            except Exception as err:  # a failing tool is a result the model reads, never a crash
                run.error = f"{type(err).__name__}: {err}"
                return run
            run.output = message_text(message) if isinstance(message, ToolMessage) else str(message)
            run.artifact = getattr(message, "artifact", None)
            return run

        todo = calls[: self.max_commands]
        if len(todo) > 1:
            with concurrent.futures.ThreadPoolExecutor(max_workers=len(todo)) as pool:
                return list(pool.map(call, todo)) + skipped
        return [call(tc) for tc in todo] + skipped

    @staticmethod
    def _results_body(runs: Sequence[CommandRun]) -> str:
        """The results block MOSS reads: every command's output in release order, then unreadable text."""
        body = results_from_outputs([(r.command, r.output) for r in runs if r.command is not None])
        unreadable = [
            _plugins.format_result_entry(r.text, fmt.scrub(r.output), "inline") for r in runs if r.command is None
        ]
        if unreadable and body.startswith("\n"):  # not the bare Text2Image sentence
            body = ("\n" if body == "\nNone\n" else body) + "".join(unreadable)
        return body

    def _turn(self, human: str, config: RunnableConfig) -> Iterator[AgentEvent]:
        human = fmt.scrub(human)
        messages = self._messages(human)
        chat = self.chat.bind_tools(self.tools) if self.tools else self.chat
        first = chat.invoke(messages, config=config)
        thoughts = first.additional_kwargs.get(REASONING) or fmt.NONE
        commands = first.additional_kwargs.get(RAW_COMMANDS) or fmt.NONE
        yield AgentEvent("thoughts", thoughts)
        if not (first.tool_calls or first.invalid_tool_calls):
            reply, usage = message_text(first), dict(first.usage_metadata or {})
            results = "\nNone\n" if self.tools else " None"
            yield AgentEvent("reply", reply)
            runs: list[CommandRun] = []
        else:
            runs = self._run_commands(first, config)
            for run in runs:
                yield AgentEvent("command", run)
            results = self._results_body(runs)
            for run in runs:
                yield AgentEvent("result", run)
            calls = [
                {"name": r.tool, "args": r.args, "id": f"call_{i}"} for i, r in enumerate(runs) if r.tool is not None
            ]
            ai = AIMessage(
                "",
                tool_calls=calls,
                additional_kwargs={REASONING: thoughts, RAW_COMMANDS: commands, RAW_RESULTS: results},
            )
            tool_messages = [ToolMessage("", tool_call_id=c["id"]) for c in calls]
            reply_parts = []
            final = None
            for chunk in chat.stream([*messages, ai, *tool_messages], config=config):
                if chunk.content:
                    reply_parts.append(message_text(chunk))
                    yield AgentEvent("reply", message_text(chunk))
                final = chunk if final is None else final + chunk
            reply = "".join(reply_parts)
            usage = _add_usage(first.usage_metadata, final.usage_metadata if final is not None else None)
        turn = fmt.MossTurn(human, reply, thoughts, commands, results)
        self._remember(turn, [r.artifact for r in runs if r.artifact is not None])
        yield AgentEvent("turn", TurnResult(human, reply, thoughts, commands, results, runs, turn, usage))

    # ------------------------------------------------------------------ Runnable

    def invoke(
        self, input: dict[str, Any] | str, config: RunnableConfig | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """Run one turn; returns the reply (``output``) with the turn's thoughts, commands, results, artifacts."""
        result = self.run_turn(_input_text(input), config)
        return result.to_dict()

    def run_turn(self, text: str, config: RunnableConfig | None = None) -> TurnResult:
        """Run one turn and return it as a :class:`TurnResult`."""
        for event in self._turn(text, ensure_config(config)):
            if event.type == "turn":
                return event.data  # type: ignore[no-any-return]
        raise RuntimeError("the agent turn ended without a result")  # pragma: no cover

    def stream_events_of_turn(self, text: str, config: RunnableConfig | None = None) -> Iterator[AgentEvent]:
        """Run one turn, yielding typed events: thoughts, each command and result, reply deltas, the turn."""
        yield from self._turn(text, ensure_config(config))

    def stream(
        self, input: dict[str, Any] | str, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[dict[str, Any]]:
        """Stream the turn as dicts ``{"type": ..., "data": ...}``; the last one has type ``turn``."""
        for event in self.stream_events_of_turn(_input_text(input), config):
            data = event.data.to_dict() if isinstance(event.data, TurnResult) else event.data
            yield {"type": event.type, "data": asdict(data) if isinstance(data, CommandRun) else data}

    async def ainvoke(
        self, input: dict[str, Any] | str, config: RunnableConfig | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """Async :meth:`invoke` (runs in an executor: generation is CPU/GPU bound)."""
        return await run_in_executor(config, self.invoke, input, config)

    async def astream(
        self, input: dict[str, Any] | str, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[dict[str, Any]]:
        """Async :meth:`stream`."""
        iterator = self.stream(input, config)
        sentinel = object()
        while True:
            item = await run_in_executor(config, next, iterator, sentinel)
            if item is sentinel:
                return
            yield item  # type: ignore[misc]

    def reset(self) -> None:
        """Forget the conversation."""
        if self.memory is not None:
            self.memory.clear()
        self.history.clear()


def _input_text(input: dict[str, Any] | str) -> str:
    if isinstance(input, str):
        return input
    for key in ("input", "question", "query", "text"):
        if key in input:
            return str(input[key])
    raise ValueError(f"MossAgent input needs an 'input' key; got keys {sorted(input)}")


def _add_usage(*usages: Any) -> dict[str, Any]:
    total: dict[str, Any] = {}
    for usage in usages:
        for key in ("input_tokens", "output_tokens", "total_tokens"):
            total[key] = total.get(key, 0) + int((usage or {}).get(key, 0))
    return total
