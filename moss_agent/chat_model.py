"""ChatMoss: MOSS as a LangChain chat model, with MOSS's plugin protocol as tool calling.

A turn with tools bound runs MOSS's two passes: pass 1 writes inner thoughts and ``<|Commands|>`` (stopping at
``<eoc>``); commands become ``tool_calls``. Once the caller sends the ``ToolMessage`` answers, MOSS may call
tools again (up to ``max_tool_rounds`` rounds a turn) or writes the reply after ``<|Results|>`` (stopping at
``<eom>``). When MOSS calls no tool, the reply follows at once, and the engine's prefix cache makes it cost
only the new tokens. The passes themselves are in :mod:`moss_agent.chat_passes`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from typing import Any, Literal

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.language_models.model_profile import ModelProfile
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import run_in_executor

from moss_agent import settings
from moss_agent.chat_passes import Outcome, Passes, Run, prepare
from moss_agent.engines.base import Delta, Engine, Generation, SamplingParams
from moss_agent.faces import MossSettings
from moss_agent.messages import RAW_COMMANDS, RAW_RESULTS, REASONING
from moss_agent.protocol import format as fmt
from moss_agent.tool_binding import bind_tools, resolve_tool_choice

__all__ = ["PROVIDER", "ChatMoss", "MossSettings"]

PROVIDER = "moss"
"""``response_metadata["model_provider"]`` and ``ls_provider`` of every MOSS face."""

_Key = tuple[str, SamplingParams]
_BATCHED: ContextVar[dict[_Key, list[Generation]] | None] = ContextVar("moss_batched", default=None)
"""Generations that ``ChatMoss.batch`` computed in one engine batch, by prompt, for ``_generate`` to take."""


class _Captured(Exception):  # a control-flow signal, not an error
    """Stops the passes at their first engine call, carrying the prompt and parameters."""

    def __init__(self, key: _Key) -> None:
        self.key = key


class ChatMoss(MossSettings, BaseChatModel):
    """MOSS as a LangChain chat model.

    Messages render to MOSS's trained layout (see :mod:`moss_agent.messages`). The reply's inner thoughts are
    in ``additional_kwargs["reasoning_content"]`` and its commands segment in ``additional_kwargs
    ["moss_commands"]``. Malformed or unknown commands become ``invalid_tool_calls``; nothing the model writes
    raises (see ``invalid_commands``). ``with_structured_output`` works through tool calling (every ``method``
    does); ``response_format`` (OpenAI ``json_schema``) makes the reply JSON through a forced schema command.
    After tool results MOSS may call tools again, up to ``max_tool_rounds`` rounds a turn (see
    :mod:`moss_agent.rendering` for the layout). ``profile`` gives MOSS's 2,048-token window for LangChain's
    middleware; ``truncate="left"`` drops the oldest whole turns of a conversation that outgrows it.

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
    max_tool_rounds: int = 3
    """Tool rounds MOSS may run in one turn (1: reply right after the first results, as the release did);
    also a per-call option. A forced ``tool_choice`` or a ``response_format`` still gets its call."""

    def _resolve_model_profile(self) -> ModelProfile | None:
        return ModelProfile(
            name="MOSS (moss-moon-003)",
            open_weights=True,
            max_input_tokens=settings.CONTEXT_WINDOW,
            max_output_tokens=settings.CONTEXT_WINDOW - 1,
            text_inputs=True,
            image_inputs=False,
            audio_inputs=False,
            pdf_inputs=False,
            video_inputs=False,
            text_outputs=True,
            image_outputs=False,
            tool_calling=True,
            tool_choice=True,
            tool_call_streaming=True,
            structured_output=True,
            reasoning_output=True,
            temperature=True,
        )

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
                command (the named tool; for ``"any"``, the tool MOSS tried, else the first one not yet used in
                this turn). This holds after tool results too: a forced choice always gets a tool call.
            **kwargs: Passed on to ``bind``.

        Raises:
            ValueError: For tools that cannot be written as commands, or a ``tool_choice`` naming no tool.
        """
        from langchain_core.utils.function_calling import convert_to_openai_tool

        formatted = [convert_to_openai_tool(t) for t in tools]
        resolve_tool_choice(tool_choice, bind_tools(formatted))  # validate now rather than on the first call
        return super().bind(tools=formatted, tool_choice=tool_choice, **kwargs)

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

        steps = self._steps(messages, stop, kwargs, run, engine)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                outcome: Outcome = done.value
                break
        return ChatResult(generations=[ChatGeneration(message=self._message(outcome))])

    def _steps(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any], run: Run, engine: Engine
    ) -> Iterator[Any]:
        """The passes of one call (see :class:`~moss_agent.chat_passes.Passes`)."""
        prepared = prepare(self, messages, kwargs)
        options = {k: v for k, v in kwargs.items() if k in settings.CALL_OPTIONS}
        truncate = kwargs.get("truncate", self.truncate)
        count = engine.count_tokens if truncate == "left" else None
        window = int(getattr(engine, "context_window", settings.CONTEXT_WINDOW))
        return Passes(self, run, stop, options, count, window).steps(prepared)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        engine = self.get_engine()
        steps = self._steps(messages, stop, kwargs, engine.stream, engine)
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

        engine = self.get_engine()
        plan = []
        for value in inputs:
            try:
                messages = self._convert_input(value).to_messages()
                prepared = prepare(self, messages, rest)
                pending = prepared.rendered.pending
                if prepared.tools and pending is not None and (pending.results is None or prepared.decides_again):
                    return None  # a pass 1 decides what follows
                next(self._steps(messages, stop, rest, capture, engine))
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

    def _metadata(self, outcome: Outcome) -> tuple[dict[str, Any], dict[str, Any], UsageMetadata]:
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
        meta: dict[str, Any] = {
            "model_provider": PROVIDER,
            "model_name": self._model_name,
            "finish_reason": finish,
            "stop_reason": last.stop_reason if last else None,
        }
        if outcome.dropped_turns:
            meta["dropped_turns"] = outcome.dropped_turns
        return extra, meta, _usage(outcome.generations)

    def _message(self, outcome: Outcome) -> AIMessage:
        extra, meta, usage = self._metadata(outcome)
        if outcome.thoughts is not None:  # a pass 1 ran: "" when MOSS's thoughts were "None"
            extra = {REASONING: "" if outcome.thoughts == fmt.NONE else outcome.thoughts, **extra}
        return AIMessage(
            content=outcome.reply,
            tool_calls=outcome.tool_calls,
            invalid_tool_calls=outcome.invalid,
            additional_kwargs=extra,
            response_metadata=meta,
            usage_metadata=usage,
        )

    def _final_chunk(self, outcome: Outcome) -> AIMessageChunk:
        """The last chunk: the tool calls (all at once, as pass 1 ended at ``<eoc>``), metadata and usage."""
        extra, meta, usage = self._metadata(outcome)
        if outcome.thoughts == fmt.NONE:  # streamed thoughts arrived as chunks; "None" ones never did
            extra = {REASONING: "", **extra}
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
