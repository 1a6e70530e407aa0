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
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.runnables import RunnableConfig, RunnableSerializable, ensure_config
from langchain_core.runnables.config import get_callback_manager_for_config as callback_manager_for
from langchain_core.runnables.config import get_config_list, patch_config, run_in_executor
from langchain_core.tools import BaseTool
from pydantic import ConfigDict, Field, PrivateAttr

from moss_agent.chat_model import ChatMoss
from moss_agent.engines.base import Engine
from moss_agent.messages import (
    RAW_COMMANDS,
    RAW_RESULTS,
    REASONING,
    VERBATIM,
    message_text,
    results_from_outputs,
    stored_messages,
)
from moss_agent.protocol import format as fmt
from moss_agent.protocol import parser
from moss_agent.protocol import plugins as _plugins
from moss_agent.protocol.format import Command
from moss_agent.rendering import system_text
from moss_agent.sessions import AgentInput, Session, Sessions, parse_input, session_id
from moss_agent.tool_binding import BoundTool, bind_tools, command_for_tool_call, to_tool_call

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
        ran: Whether its tool was called (a failing tool too); False for commands that could not run.
    """

    text: str
    command: Command | None = None
    tool: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    output: str = _plugins.NO_RESULT
    artifact: Any = None
    error: str | None = None
    ran: bool = False


@dataclass
class TurnResult:
    """Everything one agent turn produced.

    Attributes:
        input: The user's text (scrubbed).
        output: MOSS's reply.
        inner_thoughts: The inner thoughts (``None`` as MOSS writes it when there are none).
        commands: The commands segment as recorded.
        results: The results body as MOSS read it.
        runs: The commands, their results and artifacts, in release order.
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
        type: ``thoughts``, ``command`` (a CommandRun about to run), ``result`` (the CommandRun done),
            ``reply`` (a text delta) or ``turn`` (the TurnResult, always last).
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

    Inputs: a string, ``{"input": ...}``, a HumanMessage, a list of messages, a PromptValue or
    ``{"messages": [...]}`` (see :mod:`moss_agent.sessions`). Without a session id the agent holds one
    conversation; ``config={"configurable": {"session_id": "..."}}`` picks another (``memory_factory`` builds
    its memory), and ``batch`` runs each session's inputs in order while different sessions run side by side.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    chat: ChatMoss
    """The chat model (and engine) the agent drives."""
    tools: list[BaseTool] = Field(default_factory=list)
    """The tools; MOSS's four plugins map to their trained names, others get a switch line of the same shape."""
    memory: Any = None
    """A :mod:`moss_agent.memory.turns` memory; without one the agent keeps all turns in a plain list."""
    max_commands: int = _plugins.MAX_COMMANDS
    """Most commands run per turn (the release ran four)."""
    system: str | None = None
    """Extra instructions for the meta instruction, or a whole MOSS system text."""
    history: list[fmt.MossTurn] = Field(default_factory=list)
    """Turns so far, when no memory is given."""
    memory_factory: Callable[[str], Any] | None = None
    """Builds the memory of a session id (e.g. a SQLite-backed one); sessions without it keep a plain list."""
    truncate: Literal["error", "left"] | None = None
    """Overrides the chat model's ``truncate``: ``left`` drops the oldest whole turns that do not fit."""

    _sessions: Sessions | None = PrivateAttr(default=None)

    def __init__(self, model: ChatMoss | Engine | str | None = None, **kwargs: Any) -> None:
        """Build the agent on a ChatMoss, an engine, or a checkpoint path / hub id (loaded on first use)."""
        if model is not None and "chat" not in kwargs:
            if isinstance(model, ChatMoss):
                kwargs["chat"] = model
            elif isinstance(model, str):
                kwargs["chat"] = ChatMoss(model=model)
            else:
                kwargs["chat"] = ChatMoss(engine=model)
        super().__init__(**kwargs)

    # ------------------------------------------------------------------ state

    def session(self, session_id: str | None = None) -> Session:
        """The conversation of ``session_id`` (the agent's own one for None)."""
        if self._sessions is None:
            self._sessions = Sessions(Session(self.memory, self.history), self.memory_factory)
        return self._sessions.get(session_id)

    def _messages(
        self, human: str, bound: Sequence[BoundTool], session: Session, extra: str | None
    ) -> list[BaseMessage]:
        """System text, the turns memory shows, and the new question, as ChatMoss messages."""
        custom = "\n".join(t for t in (self.system, extra) if t) or None
        system = system_text(custom, bound, style=self.chat.switch_style)
        memory = session.memory
        if memory is not None:
            if memory.system != system:
                memory.system = system  # counted by token budgets and saved with the session
            memory.fit(fmt.segment(fmt.HUMAN, human) + fmt.THOUGHTS + ":")
        messages = stored_messages(system, session.turns())
        messages.append(HumanMessage(human, additional_kwargs={VERBATIM: True}))  # scrubbed by _turn
        return messages

    # ------------------------------------------------------------------ commands

    def _plan(self, first: AIMessage, bound: Sequence[BoundTool]) -> tuple[list[Any], list[CommandRun]]:
        """The tool calls to run (at most ``max_commands``, release order) and the runs that will not run."""
        by_name = {t.name for t in self.tools}
        order = {api: i for i, api in enumerate(_plugins.EXECUTION_ORDER)}
        calls = [c for c in first.tool_calls if c["name"] in by_name]
        calls.sort(key=lambda c: order.get(command_for_tool_call(c, bound).name, len(order)))
        # A streamed message rebuilds invalid calls without their error; anything not runnable is invalid.
        invalid = [*first.invalid_tool_calls, *(c for c in first.tool_calls if c["name"] not in by_name)]
        skipped = [_invalid_run(bad, bound) for bad in invalid]
        for extra in calls[self.max_commands :]:
            command = command_for_tool_call(extra, bound)
            skipped.append(
                CommandRun(str(command), command, extra["name"], extra["args"], _OVER_LIMIT, error=_OVER_LIMIT)
            )
        return calls[: self.max_commands], skipped

    def _run_tool(self, call: Any, bound: Sequence[BoundTool], config: RunnableConfig) -> CommandRun:
        command = command_for_tool_call(call, bound)
        run = CommandRun(str(command), command, call["name"], call["args"], ran=True)
        tool = next(t for t in self.tools if t.name == call["name"])
        try:
            message = tool.invoke(call, config=config)
        except Exception as err:  # a failing tool is a result the model reads, never a crash
            run.error = f"{type(err).__name__}: {err}"
            return run
        run.output = message_text(message) if isinstance(message, ToolMessage) else str(message)
        run.artifact = getattr(message, "artifact", None)
        return run

    @staticmethod
    def _results_body(runs: Sequence[CommandRun]) -> str:
        """The results block MOSS reads: the tools' outputs in release order, then why the others did not run."""
        ran = [(r.command, r.output) for r in runs if r.ran and r.command is not None]
        body = results_from_outputs(ran) if ran else "\n"
        errors = [
            _plugins.format_result_entry(fmt.scrub(r.text), fmt.scrub(r.output), "inline") for r in runs if not r.ran
        ]
        if not errors:
            return body
        if not body.startswith("\n"):  # a lone Text2Image's bare sentence: written as an entry among others
            body = "\n" + _plugins.format_result_entry(str(ran[0][0]), body.strip(), "sentence")
        return body + "".join(errors)

    # ------------------------------------------------------------------ one turn

    def _turn(self, request: AgentInput, session: Session, config: RunnableConfig) -> Iterator[AgentEvent]:
        human = fmt.scrub(request.text)
        bound = bind_tools(self.tools)
        session.seed(request.earlier)
        messages = self._messages(human, bound, session, request.system)
        # One tool round a turn, as the release ran it; the agent's truncate, if set, wins over the chat's.
        options: dict[str, Any] = {"max_tool_rounds": 1, **({"truncate": self.truncate} if self.truncate else {})}
        chat = self.chat.bind_tools(self.tools, **options) if self.tools else self.chat.bind(**options)
        # Pass 1. Without a command ChatMoss answers at once (pass 2 from its cached prefix): stream that reply.
        first = yield from _streamed(chat, messages, config, with_thoughts=True)
        thoughts = first.additional_kwargs.get(REASONING) or fmt.NONE
        commands = first.additional_kwargs.get(RAW_COMMANDS) or fmt.NONE
        runs: list[CommandRun] = []
        usage = [first.usage_metadata]
        if not (first.tool_calls or first.invalid_tool_calls):
            reply = message_text(first)
            results = fmt.results_body(None, plugins_on=bool(self.tools))
        else:
            todo, skipped = self._plan(first, bound)
            for call in todo:
                yield AgentEvent("command", CommandRun(str(command_for_tool_call(call, bound)), tool=call["name"]))
            with concurrent.futures.ThreadPoolExecutor(max_workers=max(len(todo), 1)) as pool:
                runs = list(pool.map(lambda c: self._run_tool(c, bound, config), todo)) + skipped
            for run in runs:
                yield AgentEvent("result", run)
            results = self._results_body(runs)
            # Pass 2: the raw segments make ChatMoss continue exactly the text pass 1 produced.
            calls = [{"name": r.tool or "invalid", "args": r.args, "id": f"call_{i}"} for i, r in enumerate(runs)]
            raw = {REASONING: thoughts, RAW_COMMANDS: commands, RAW_RESULTS: results}
            answers = [ToolMessage(r.output, tool_call_id=c["id"]) for r, c in zip(runs, calls, strict=True)]
            asked = AIMessage("", tool_calls=calls, additional_kwargs=raw)
            second = yield from _streamed(chat, [*messages, asked, *answers], config)
            reply = message_text(second)
            usage.append(second.usage_metadata)
        turn = fmt.MossTurn(human, reply, thoughts, commands, results)
        session.remember(turn, [r.artifact for r in runs if r.artifact is not None])
        yield AgentEvent("turn", TurnResult(human, reply, thoughts, commands, results, runs, turn, _add_usage(*usage)))

    # ------------------------------------------------------------------ Runnable

    def stream_events_of_turn(self, text: Any, config: RunnableConfig | None = None) -> Iterator[AgentEvent]:
        """Run one turn, yielding typed :class:`AgentEvent` s: reply deltas, thoughts, commands, results, turn.

        A turn with commands yields thoughts, each command, each result, then the reply deltas; a turn without
        yields the reply deltas as ChatMoss streams them, then the thoughts. The ``turn`` event is always last.
        The turn is one chain run for callbacks, with the model passes and the tools as its children.
        """
        config = ensure_config(config)
        request = parse_input(text)
        manager = callback_manager_for(config).on_chain_start(
            None,
            {"input": request.text},
            name=config.get("run_name") or self.get_name(),
            run_id=config.pop("run_id", None),
        )
        result: TurnResult | None = None
        try:
            with self.session(session_id(config)).turn() as session:
                for event in self._turn(request, session, patch_config(config, callbacks=manager.get_child())):
                    if event.type == "turn":
                        result = event.data
                    yield event
        except BaseException as err:
            manager.on_chain_error(err)
            raise
        manager.on_chain_end(result.to_dict() if result is not None else {})

    def run_turn(self, text: Any, config: RunnableConfig | None = None) -> TurnResult:
        """Run one turn and return it as a :class:`TurnResult`."""
        result: TurnResult | None = None
        for event in self.stream_events_of_turn(text, config):
            if event.type == "turn":
                result = event.data
        assert result is not None, "an agent turn always ends with its result"
        return result

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> dict[str, Any]:
        """Run one turn; returns the reply (``output``) with the turn's thoughts, commands, results, artifacts."""
        return self.run_turn(input, config).to_dict()

    def batch(
        self,
        inputs: list[Any],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Any]:
        """Run several turns: each session's inputs in their order, different sessions side by side."""
        configs = get_config_list(config, len(inputs))
        groups: dict[str | None, list[int]] = {}
        for index, one in enumerate(configs):
            groups.setdefault(session_id(one), []).append(index)
        outputs: list[Any] = [None] * len(inputs)

        def run(indices: list[int]) -> None:
            for i in indices:
                try:
                    outputs[i] = self.invoke(inputs[i], configs[i])
                except Exception as err:
                    if not return_exceptions:
                        raise
                    outputs[i] = err

        workers = min(len(groups), configs[0].get("max_concurrency") or len(groups)) if groups else 1
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
            for future in [pool.submit(run, indices) for indices in groups.values()]:
                future.result()
        return outputs

    async def abatch(
        self,
        inputs: list[Any],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Any]:
        """Async :meth:`batch` (runs in an executor)."""
        return await run_in_executor(None, self.batch, inputs, config, return_exceptions=return_exceptions)

    def stream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[dict[str, Any]]:
        """Stream the turn as dicts ``{"type": ..., "data": ...}``; the last one has type ``turn``."""
        for event in self.stream_events_of_turn(input, config):
            data = event.data
            if isinstance(data, TurnResult):
                data = data.to_dict()
            elif isinstance(data, CommandRun):
                data = asdict(data)
            yield {"type": event.type, "data": data}

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> dict[str, Any]:
        """Async :meth:`invoke` (runs in an executor: generation is CPU/GPU bound)."""
        return await run_in_executor(config, self.invoke, input, config)

    async def astream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[dict[str, Any]]:
        """Async :meth:`stream`: each step of the sync stream runs in an executor."""
        iterator = self.stream(input, config)
        done = object()
        while (item := await run_in_executor(config, next, iterator, done)) is not done:
            yield item  # type: ignore[misc]

    def reset(self, session_id: str | None = None) -> None:
        """Forget the conversation (of ``session_id``; the agent's own one for None)."""
        session = self.session(session_id)
        if session.memory is not None:
            session.memory.clear()
        session.history.clear()


def _streamed(
    chat: Any, messages: list[BaseMessage], config: RunnableConfig, *, with_thoughts: bool = False
) -> Generator[AgentEvent, None, AIMessage]:
    """Stream one ChatMoss call: yield its reply text as ``reply`` events, return the whole message.

    With ``with_thoughts``, the inner thoughts come first as a ``thoughts`` event: before the first reply text
    (ChatMoss streams them ahead of it), or at the end when there is no reply text (a turn with commands).
    """
    whole: Any = None
    thoughts_sent = not with_thoughts
    for chunk in chat.stream(messages, config=config):
        whole = chunk if whole is None else whole + chunk
        if chunk.content:
            if not thoughts_sent:
                thoughts_sent = True
                yield AgentEvent("thoughts", whole.additional_kwargs.get(REASONING) or fmt.NONE)
            yield AgentEvent("reply", message_text(chunk))
    assert isinstance(whole, AIMessage), "ChatMoss streamed no message"
    if not thoughts_sent:
        yield AgentEvent("thoughts", whole.additional_kwargs.get(REASONING) or fmt.NONE)
    return whole


def _invalid_run(bad: Any, bound: Sequence[BoundTool]) -> CommandRun:
    """A command that cannot run, with the error text the model reads.

    ChatMoss keeps the command as MOSS wrote it in ``args``; a streamed message loses the ``error``, so it is
    worked out again the way ChatMoss found it.
    """
    args = bad.get("args")
    text = args if isinstance(args, str) else str(Command(bad.get("name") or "", str(args or "")))
    found, unreadable = parser.parse_commands(text)
    command = found[0] if len(found) == 1 and not unreadable else None
    error = bad.get("error")
    if not error and command is not None:
        error = to_tool_call(command, bound).get("error")
    if not error and unreadable:
        error = unreadable[0].error
    error = error or "Not a command this agent can run."
    return CommandRun(str(command) if command else text, command, error=error, output=error)


def _add_usage(*usages: Any) -> dict[str, Any]:
    total: dict[str, Any] = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0, "cache_read": 0}
    for usage in usages:
        usage = usage or {}
        for key in ("input_tokens", "output_tokens", "total_tokens"):
            total[key] += int(usage.get(key, 0))
        total["cache_read"] += int((usage.get("input_token_details") or {}).get("cache_read", 0))
    return total
