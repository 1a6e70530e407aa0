"""ChatMoss: MOSS as a LangChain chat model, with MOSS's plugin protocol as tool calling.

A turn with tools bound runs MOSS's two passes: pass 1 writes inner thoughts and ``<|Commands|>`` (stopping at
``<eoc>``); commands become ``tool_calls``. Once the caller sends the ``ToolMessage`` answers, pass 2 writes
the reply after ``<|Results|>`` (stopping at ``<eom>``). When MOSS calls no tool, pass 2 follows at once, and
the engine's prefix cache makes it cost only the new tokens.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import invalid_tool_call
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import run_in_executor

from moss_agent.engines.base import Delta, Generation, SamplingParams, cut_at_stop
from moss_agent.llm import EngineHolder, MossSettings
from moss_agent.messages import RAW_COMMANDS, RAW_RESULTS, REASONING, PendingTurn, RenderedChat, render_messages
from moss_agent.protocol import format as fmt
from moss_agent.protocol import stream as moss_stream
from moss_agent.protocol.plugins import format_result_entry
from moss_agent.settings import CALL_OPTIONS
from moss_agent.tool_binding import BoundTool, ToolChoice, bind_tools, new_call_id, resolve_tool_choice, to_tool_call

__all__ = ["ChatMoss", "EngineHolder", "MossSettings"]

_Run = Callable[[str, SamplingParams], Iterator[Delta]]
"""Runs one generation pass, yielding deltas (one whole delta when not streaming)."""


@dataclass
class _Piece:
    """A piece of streamed text: reply content or inner thoughts."""

    kind: Literal["reply", "thoughts"]
    text: str


@dataclass
class _Outcome:
    """The parsed result of a whole ChatMoss call."""

    reply: str = ""
    thoughts: str | None = None
    commands: str | None = None
    results: str | None = None
    tool_calls: list[Any] = field(default_factory=list)
    invalid: list[Any] = field(default_factory=list)
    generations: list[Generation] = field(default_factory=list)


_Steps = Generator[_Piece, None, _Outcome]

_Key = tuple[str, SamplingParams]
_BATCHED: ContextVar[dict[_Key, list[Generation]] | None] = ContextVar("moss_batched", default=None)
"""Generations that ``ChatMoss.batch`` computed in one engine batch, by prompt, for ``_generate`` to take."""


class _Captured(Exception):  # a control-flow signal, not an error
    """Stops ``_steps`` at its first engine call, carrying the prompt and parameters."""

    def __init__(self, key: _Key) -> None:
        self.key = key


class ChatMoss(MossSettings, BaseChatModel):
    """MOSS as a LangChain chat model.

    Messages render to MOSS's trained layout (see :mod:`moss_agent.messages`). The reply's inner thoughts are
    in ``additional_kwargs["reasoning_content"]`` and its commands segment in ``additional_kwargs
    ["moss_commands"]``. Malformed or unknown commands become ``invalid_tool_calls``; nothing the model writes
    raises (see ``invalid_commands``). ``with_structured_output`` works through tool calling (every ``method``
    does).

    Example:
        .. code-block:: python

            from moss_agent import ChatMoss
            from moss_agent.tools import CalculatorTool

            chat = ChatMoss(model="fnlp/moss-moon-003-sft-plugin")
            reply = chat.bind_tools([CalculatorTool()]).invoke("What is 3.14 * 12^2?")
            reply.tool_calls  # [{"name": "Calculate", "args": {"expression": "3.14*12^2"}, ...}]
    """

    streaming: bool = False
    """Generate token by token inside ``invoke`` too (callbacks then see each token)."""
    invalid_commands: Literal["return", "answer"] = "return"
    """When every command MOSS writes is malformed or unknown (tool choice ``auto``): ``return`` the message
    with only ``invalid_tool_calls``; ``answer``: MOSS reads the errors as its results and replies in the same
    call, for agent loops that end on a message without valid tool calls (langchain's ``create_agent``)."""

    @property
    def _llm_type(self) -> str:
        return "moss"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self._model_name, "temperature": self.temperature, "top_p": self.top_p}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        self._ls_params(params, stop, kwargs)
        return params

    def bind_tools(
        self,
        tools: Sequence[Any],
        *,
        tool_choice: str | dict[str, Any] | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools: MOSS's four plugins are recognised by name, others get a switch line of the same shape.

        MOSS was trained on its four plugins only (``Search``, ``Calculate``, ``Solve``, ``Text2Image``); it
        calls other tools less reliably.

        Args:
            tools: LangChain tools, functions, pydantic models or OpenAI tool dicts.
            tool_choice: ``None``/``"auto"`` lets MOSS choose; ``"none"`` disables tools for the call; a tool
                name (or ``{"function": {"name": ...}}``), ``"any"``, ``"required"`` or ``True`` force a call:
                when MOSS's pass 1 calls no fitting tool, the commands segment is prefilled with the start of the
                command (the named tool; for ``"any"``, the tool MOSS tried, else the first one).
            **kwargs: Passed on to ``bind``.

        Raises:
            ValueError: For tools that cannot be written as commands, or a ``tool_choice`` naming no tool.
        """
        from langchain_core.utils.function_calling import convert_to_openai_tool

        formatted = [convert_to_openai_tool(t) for t in tools]
        resolve_tool_choice(tool_choice, bind_tools(formatted))  # validate now rather than on the first call
        return super().bind(tools=formatted, tool_choice=tool_choice, **kwargs)

    # ------------------------------------------------------------------ the protocol

    def _prepare(
        self, messages: list[BaseMessage], kwargs: dict[str, Any]
    ) -> tuple[RenderedChat, ToolChoice, list[BoundTool]]:
        self._check_model(kwargs)
        tools = bind_tools(kwargs.get("tools") or [])
        choice = resolve_tool_choice(kwargs.get("tool_choice"), tools)
        if choice == "none":
            tools = []
        rendered = render_messages(messages, tools, style=self.switch_style)
        pending = rendered.pending
        if pending is None:
            raise ValueError(
                "the last message is already MOSS's reply; end the messages with a HumanMessage or ToolMessage"
            )
        if pending.commands not in (None, fmt.NONE) and pending.results is None:
            raise ValueError(
                "the last AIMessage has tool calls that no ToolMessage answers; add one ToolMessage per tool call "
                "(with its tool_call_id) before calling the model again"
            )
        return rendered, choice, tools

    def _steps(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any], run: _Run) -> _Steps:
        """The passes of one call: yields text pieces as they come, returns the outcome."""
        rendered, choice, tools = self._prepare(messages, kwargs)
        options = {k: v for k, v in kwargs.items() if k in CALL_OPTIONS}
        pending = rendered.pending
        assert pending is not None
        outcome = _Outcome()
        if pending.results is not None:  # the tools have answered: pass 2
            prompt = rendered.history + _pass2_prefix(pending) + fmt.MOSS + ":"
            yield from self._reply(prompt, stop, options, run, outcome)
            return outcome
        if not tools:
            prompt = fmt.chat_prompt(rendered.system, rendered.turns, pending.human)
            yield from self._reply(prompt, stop, options, run, outcome)
            return outcome

        pass1 = fmt.plugin_pass1_prompt(rendered.system, rendered.turns, pending.human)
        parsed = yield from self._pass1(pass1, "", options, run, outcome)
        calls = [to_tool_call(c, tools) for c in parsed.commands]
        target = _forced_target(choice, calls, tools)
        if target is not None:  # a forced choice MOSS did not make: write the start of the command for it
            opened = f' {parsed.inner_thoughts}{fmt.EOT}\n{fmt.COMMANDS}: {target.command}("'
            parsed = yield from self._pass1(pass1 + opened, opened, options, run, outcome)
            calls = [to_tool_call(c, tools) for c in parsed.commands]
        outcome.thoughts = parsed.inner_thoughts
        outcome.commands = parsed.raw_commands if parsed.invalid else parsed.commands_text
        for call in calls:
            (outcome.tool_calls if call["type"] == "tool_call" else outcome.invalid).append(call)
        outcome.invalid.extend(
            invalid_tool_call(name=None, args=bad.text, id=new_call_id(), error=bad.error) for bad in parsed.invalid
        )
        if outcome.tool_calls:
            return outcome
        if outcome.invalid and (self.invalid_commands == "return" or choice != "auto"):
            return outcome
        if outcome.invalid:  # nothing to run: MOSS reads the errors as its results and answers (as MossAgent does)
            outcome.results = "\n" + "".join(
                format_result_entry(str(c["args"]), str(c["error"]), "inline") for c in outcome.invalid
            )
            written = f" {parsed.inner_thoughts}{fmt.EOT}\n" + fmt.segment(fmt.COMMANDS, outcome.commands)
            prompt = pass1 + written + fmt.segment(fmt.RESULTS, outcome.results) + fmt.MOSS + ":"
            yield from self._reply(prompt, stop, options, run, outcome)
            return outcome
        if parsed.reply is not None:  # MOSS skipped the results and answered in pass 1
            outcome.reply = _cut(parsed.reply, self._params(stop, ()).stop)
            yield _Piece("reply", outcome.reply)
            return outcome
        # No command: MOSS answers straight away (results None), continuing from the cached prefix.
        prompt = pass1 + parsed.repaired + fmt.segment(fmt.RESULTS, "\nNone\n") + fmt.MOSS + ":"
        yield from self._reply(prompt, stop, options, run, outcome)
        return outcome

    def _pass1(
        self, prompt: str, opened: str, options: dict[str, Any], run: _Run, outcome: _Outcome
    ) -> Generator[_Piece, None, moss_stream.Pass1]:
        """Generate pass 1 after ``prompt`` (whose prefilled tail ``opened`` belongs to pass 1's text).

        Yields the inner thoughts as they come (not those of ``opened``, already sent); user stop strings do
        not apply (they would cut the commands).
        """
        stream = moss_stream.StreamParser("pass1")
        stream.feed(opened)
        thoughts = _Thoughts()
        final: Generation | None = None
        for delta in run(prompt, self._params((), (fmt.EOC, fmt.EOM), options)):
            for event in stream.feed(delta.text):
                if event.kind == "thoughts" and not opened:
                    yield from thoughts.feed(event.text)
            final = delta.generation or final
        assert final is not None, "the engine ended without a Generation"
        for event in stream.finish(final.stop_reason):
            if event.kind == "thoughts" and not opened:
                yield from thoughts.feed(event.text)
        yield from thoughts.finish()
        outcome.generations.append(final)
        assert stream.pass1 is not None
        return stream.pass1

    def _reply(
        self, prompt: str, stop: list[str] | None, options: dict[str, Any], run: _Run, outcome: _Outcome
    ) -> Iterator[_Piece]:
        """Generate a reply, yielding its text as it comes (never part of an end token or role tag)."""
        stream = moss_stream.StreamParser("reply")
        final: Generation | None = None
        for delta in run(prompt, self._params(stop, (fmt.EOM,), options)):
            for event in stream.feed(delta.text):
                yield _Piece("reply", event.text)
            final = delta.generation or final
        assert final is not None, "the engine ended without a Generation"
        for event in stream.finish(final.stop_reason):
            yield _Piece("reply", event.text)
        outcome.generations.append(final)
        outcome.reply = stream.reply.text if stream.reply else ""

    # ------------------------------------------------------------------ LangChain entry points

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        engine = self.get_engine()
        batched = _BATCHED.get()

        def run(prompt: str, params: SamplingParams) -> Iterator[Delta]:
            ready = batched.get((prompt, params)) if batched else None
            generation = ready.pop() if ready else engine.generate(prompt, params)
            yield Delta(generation.text, generation)

        steps = self._steps(messages, stop, kwargs, run)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                outcome: _Outcome = done.value
                break
        return ChatResult(generations=[ChatGeneration(message=self._message(outcome))])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        engine = self.get_engine()
        steps = self._steps(messages, stop, kwargs, engine.stream)
        while True:
            try:
                piece = next(steps)
            except StopIteration as done:
                yield ChatGenerationChunk(message=self._final_chunk(done.value))
                return
            if piece.kind == "thoughts":
                message = AIMessageChunk(content="", additional_kwargs={REASONING: piece.text})
            else:
                message = AIMessageChunk(content=piece.text)
            chunk = ChatGenerationChunk(message=message)
            if run_manager and piece.kind == "reply":
                run_manager.on_llm_new_token(piece.text, chunk=chunk)
            yield chunk

    def batch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[AIMessage]:
        """Answer several inputs; single-pass ones share one ``engine.generate_batch`` call.

        When every input needs one generation known up front (no tools, or the tools have answered), the
        prompts are rendered as ``invoke`` renders them and generated in one engine batch; each input then
        runs the usual ``invoke`` path (callbacks included), which takes its generation instead of calling the
        engine. Otherwise (tools to choose, streaming, seeded sampling, an LLM cache) this is LangChain's
        thread-pool batch of ``invoke``.
        """
        plan = self._batch_plan(inputs, kwargs)
        ready = self._batch_generate(plan) if plan else None
        token = _BATCHED.set(ready)
        try:
            return super().batch(inputs, config, return_exceptions=return_exceptions, **kwargs)  # type: ignore[return-value]
        finally:
            _BATCHED.reset(token)

    async def abatch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[AIMessage]:
        """As :meth:`batch`; the engine batch runs in an executor thread."""
        plan = self._batch_plan(inputs, kwargs)
        ready = await run_in_executor(None, self._batch_generate, plan) if plan else None
        token = _BATCHED.set(ready)
        try:
            return await super().abatch(inputs, config, return_exceptions=return_exceptions, **kwargs)  # type: ignore[return-value]
        finally:
            _BATCHED.reset(token)

    def _batch_plan(self, inputs: Sequence[LanguageModelInput], kwargs: dict[str, Any]) -> list[_Key] | None:
        """The one prompt and parameters of each input, or None when some input is not single-pass."""
        from langchain_core.caches import BaseCache
        from langchain_core.globals import get_llm_cache

        if len(inputs) < 2 or self.streaming or isinstance(self.cache, BaseCache) or self.cache is True:
            return None
        if self.cache is None and get_llm_cache() is not None:
            return None  # cached answers would leave batched generations unused
        stop, rest = kwargs.get("stop"), {k: v for k, v in kwargs.items() if k != "stop"}

        def capture(prompt: str, params: SamplingParams) -> Iterator[Delta]:
            raise _Captured((prompt, params))

        plan = []
        for value in inputs:
            try:
                messages = self._convert_input(value).to_messages()
                rendered, _, tools = self._prepare(messages, rest)
                if tools and rendered.pending is not None and rendered.pending.results is None:
                    return None  # pass 1 decides what follows
                next(self._steps(messages, stop, rest, capture))
            except _Captured as captured:
                if not captured.key[1].greedy and captured.key[1].seed is not None:
                    return None  # seeded sampling: each invoke replays the seed, one batch would not
                plan.append(captured.key)
            except Exception:  # invoke raises it for this input, as the default batch does
                return None
        return plan

    def _batch_generate(self, plan: Sequence[_Key]) -> dict[_Key, list[Generation]] | None:
        """Generate the planned prompts, one engine batch per distinct parameters; None if the engine raises."""
        engine = self.get_engine()
        ready: dict[_Key, list[Generation]] = {}
        for params in dict.fromkeys(p for _, p in plan):
            prompts = [prompt for prompt, p in plan if p == params]
            try:
                generations = engine.generate_batch(prompts, params)
            except Exception:  # each invoke meets the same error and reports it for its input
                return None
            for prompt, generation in zip(prompts, generations, strict=True):
                ready.setdefault((prompt, params), []).insert(0, generation)
        return ready

    # ------------------------------------------------------------------ building messages

    def _metadata(self, outcome: _Outcome) -> tuple[dict[str, Any], dict[str, Any], UsageMetadata]:
        extra: dict[str, Any] = {}
        if outcome.commands is not None:
            extra[RAW_COMMANDS] = outcome.commands
        if outcome.results is not None:
            extra[RAW_RESULTS] = outcome.results
        last = outcome.generations[-1] if outcome.generations else None
        if outcome.tool_calls:
            finish = "tool_calls"
        elif last is not None and last.stop_reason == "length":
            finish = "length"
        else:
            finish = "stop"
        meta = {
            "model_name": self._model_name,
            "finish_reason": finish,
            "stop_reason": last.stop_reason if last else None,
        }
        return extra, meta, _usage(outcome.generations)

    def _message(self, outcome: _Outcome) -> AIMessage:
        extra, meta, usage = self._metadata(outcome)
        if outcome.thoughts and outcome.thoughts != fmt.NONE:
            extra = {REASONING: outcome.thoughts, **extra}
        return AIMessage(
            content=outcome.reply,
            tool_calls=outcome.tool_calls,
            invalid_tool_calls=outcome.invalid,
            additional_kwargs=extra,
            response_metadata=meta,
            usage_metadata=usage,
        )

    def _final_chunk(self, outcome: _Outcome) -> AIMessageChunk:
        """The last chunk: the tool calls (all at once, as pass 1 ended at ``<eoc>``), metadata and usage."""
        extra, meta, usage = self._metadata(outcome)
        calls = [(c["name"], json.dumps(c["args"], ensure_ascii=False), c["id"]) for c in outcome.tool_calls]
        calls += [(c.get("name"), c.get("args"), c.get("id")) for c in outcome.invalid]
        return AIMessageChunk(
            content="",
            tool_call_chunks=[
                {"name": name, "args": args, "id": call_id, "index": i} for i, (name, args, call_id) in enumerate(calls)
            ],
            additional_kwargs=extra,
            response_metadata=meta,
            usage_metadata=usage,
            chunk_position="last",
        )


class _Thoughts:
    """Streams inner thoughts, holding back a text that may still be the ``None`` of a turn without any."""

    def __init__(self) -> None:
        self._held: str | None = ""  # None once the thoughts are known not to be "None"

    def feed(self, text: str) -> Iterator[_Piece]:
        if self._held is not None:
            self._held += text
            if fmt.NONE.startswith(self._held):
                return
            text, self._held = self._held, None
        yield _Piece("thoughts", text)

    def finish(self) -> Iterator[_Piece]:
        if self._held and self._held != fmt.NONE:
            yield _Piece("thoughts", self._held)
        self._held = None


def _pass2_prefix(pending: PendingTurn) -> str:
    """The pending turn up to ``<|MOSS|>:`` once its tools have answered."""
    return (
        fmt.segment(fmt.HUMAN, pending.human)
        + fmt.segment(fmt.THOUGHTS, pending.inner_thoughts or fmt.NONE)
        + fmt.segment(fmt.COMMANDS, pending.commands or fmt.NONE)
        + fmt.segment(fmt.RESULTS, pending.results or "\nNone\n")
    )


def _forced_target(choice: ToolChoice, calls: Sequence[Any], tools: Sequence[BoundTool]) -> BoundTool | None:
    """The tool whose command to prefill when a forced choice was not met by pass 1, else None."""
    if choice in ("auto", "none"):
        return None
    valid = [c["name"] for c in calls if c["type"] == "tool_call"]
    if isinstance(choice, BoundTool):
        return None if choice.name in valid else choice
    if valid:
        return None
    tried = [t for c in calls for t in tools if c["name"] == t.name]  # a call to a bound tool with bad args
    return tried[0] if tried else tools[0]


def _cut(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first stop string in it (trailing blanks before the stop dropped)."""
    cut, stop = cut_at_stop(text, stops)
    return cut.rstrip() if stop is not None else text


def _usage(generations: Sequence[Generation]) -> UsageMetadata:
    """Token usage summed over the passes; ``cache_read`` counts prompt tokens served from the KV cache."""
    input_tokens = sum(g.prompt_tokens for g in generations)
    output_tokens = sum(g.completion_tokens for g in generations)
    usage = UsageMetadata(
        input_tokens=input_tokens, output_tokens=output_tokens, total_tokens=input_tokens + output_tokens
    )
    cached = sum(g.cached_tokens for g in generations)
    if cached:
        usage["input_token_details"] = {"cache_read": cached}
    return usage
