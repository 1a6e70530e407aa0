"""ChatMoss: MOSS as a LangChain chat model, with MOSS's plugin protocol as tool calling.

A turn with tools bound runs MOSS's two passes: pass 1 writes inner thoughts and ``<|Commands|>`` (stopping at
``<eoc>``); commands become ``tool_calls``. Once the caller sends the ``ToolMessage`` answers, pass 2 writes
the reply after ``<|Results|>`` (stopping at ``<eom>``). When MOSS calls no tool, pass 2 follows at once, and
the engine's prefix cache makes it cost only the new tokens.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from moss_agent import format as fmt
from moss_agent import parser
from moss_agent.engine import Delta, Engine, Generation, SamplingParams
from moss_agent.messages import RAW_COMMANDS, REASONING, PendingTurn, RenderedChat, render_messages
from moss_agent.tool_binding import BoundTool, bind_tools, to_tool_call

__all__ = ["ChatMoss", "EngineHolder", "MossSettings"]


_Run = Callable[[str, SamplingParams], Iterator[Delta]]
"""Runs one generation pass, yielding deltas (one whole delta when not streaming)."""


@dataclass
class _Step:
    """One generation pass and what it contributes to the message."""

    kind: Literal["reply"]
    text: str = ""
    generation: Generation | None = None


@dataclass
class _Outcome:
    """The parsed result of a whole ChatMoss call."""

    reply: str = ""
    thoughts: str | None = None
    commands: str | None = None
    tool_calls: list[Any] = field(default_factory=list)
    invalid: list[Any] = field(default_factory=list)
    generations: list[Generation] = field(default_factory=list)


class EngineHolder:
    """Lazily builds one engine and shares it among faces (ChatMoss, MossLLM, MossAgent)."""

    def __init__(self, factory: Callable[[], Engine]) -> None:
        self._factory = factory
        self._engine: Engine | None = None
        self._lock = threading.Lock()

    def get(self) -> Engine:
        """The engine, built on first use."""
        with self._lock:
            if self._engine is None:
                self._engine = self._factory()
            return self._engine


class MossSettings(BaseModel):
    """Fields and engine handling shared by the MOSS faces (ChatMoss, MossLLM)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True)

    model: str | None = None
    """A MOSS checkpoint: local directory or hub id (``fnlp/moss-moon-003-sft-plugin``)."""
    engine: Any = Field(default=None, exclude=True)
    """A ready :class:`~moss_agent.engine.Engine` to share instead of loading ``model``."""
    precision: str = "auto"
    """``auto``, ``fp32``, ``bf16``, ``fp16``, ``int8`` or ``int4``."""
    device_map: Any = "auto"
    """Where the layers go: ``auto``, ``cpu``, ``cuda:0`` or an explicit accelerate device map."""
    max_memory: dict[Any, Any] | None = None
    """Per-device memory limits for the device map, e.g. ``{0: "20GiB", "cpu": "30GiB"}``."""
    offload_folder: str | None = None
    """Folder for weights that fit nowhere else."""
    max_new_tokens: int = 256
    """Upper bound on generated tokens per pass."""
    temperature: float = 0.7
    """Sampling temperature; 0 is greedy."""
    top_p: float = 0.8
    """Nucleus sampling mass."""
    top_k: int = 40
    """Top-k sampling."""
    repetition_penalty: float = 1.02
    """Repetition penalty of the release."""
    do_sample: bool = True
    """False for greedy decoding."""
    seed: int | None = None
    """Seed for reproducible sampling."""
    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    """Extra stop strings."""
    switch_style: fmt.SwitchStyle = "trained"
    """Form of the switch block: ``trained``, ``readme``, ``production`` or ``none``."""

    _holder: EngineHolder | None = PrivateAttr(default=None)

    def _engine(self) -> Engine:
        if self.engine is not None:
            return self.engine
        if self._holder is None:
            if not self.model:
                raise ValueError("ChatMoss needs a model (a MOSS checkpoint path or hub id) or an engine")
            model, kwargs = self.model, self._load_kwargs()

            def build() -> Engine:
                from moss_agent.engine import TransformersEngine

                return TransformersEngine.from_pretrained(model, **kwargs)

            self._holder = EngineHolder(build)
        return self._holder.get()

    def _load_kwargs(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "device_map": self.device_map,
            "max_memory": self.max_memory,
            "offload_folder": self.offload_folder,
        }

    def _params(self, stop: Sequence[str] | None, stop_tokens: tuple[str, ...], **overrides: Any) -> SamplingParams:
        stops = tuple(self.stop or ()) + tuple(stop or ())
        params = SamplingParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            do_sample=self.do_sample,
            seed=self.seed,
            stop_tokens=stop_tokens,
            stop=stops,
        )
        return params.with_(**overrides) if overrides else params

    @property
    def _model_name(self) -> str:
        if self.engine is not None:
            return str(getattr(self.engine, "model_name", "moss"))
        return self.model or "moss"

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids under the MOSS tokenizer (no download: the model's own tokenizer)."""
        return self._engine().token_ids(text)


class ChatMoss(MossSettings, BaseChatModel):
    """MOSS as a LangChain chat model.

    Example:
        .. code-block:: python

            from moss_agent import ChatMoss
            from moss_agent.tools import CalculatorTool

            chat = ChatMoss(model="fnlp/moss-moon-003-sft-plugin")
            reply = chat.bind_tools([CalculatorTool()]).invoke("What is 3.14 * 12^2?")
            reply.tool_calls  # [{"name": "Calculate", "args": {"expression": "3.14*12^2"}, ...}]
    """

    @property
    def _llm_type(self) -> str:
        return "moss"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self._model_name, "temperature": self.temperature, "top_p": self.top_p}

    def bind_tools(
        self,
        tools: Sequence[Any],
        *,
        tool_choice: str | dict[str, Any] | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools: MOSS's four plugins are recognised by name, others get a switch line of the same shape.

        Args:
            tools: LangChain tools, functions, pydantic models or OpenAI tool dicts.
            tool_choice: ``None``/``"auto"`` lets MOSS choose; ``"none"`` disables tools for the call; a tool
                name (or ``{"function": {"name": ...}}``), ``"any"``, ``"required"`` or ``True`` force a call,
                by writing the start of the command into the commands segment.
            **kwargs: Passed on to ``bind``.
        """
        from langchain_core.utils.function_calling import convert_to_openai_tool

        formatted = [convert_to_openai_tool(t) for t in tools]
        bind_tools(formatted)  # validate now rather than on the first call
        return super().bind(tools=formatted, tool_choice=tool_choice, **kwargs)

    # ------------------------------------------------------------------ the protocol

    def _prepare(
        self, messages: list[BaseMessage], kwargs: dict[str, Any]
    ) -> tuple[RenderedChat, list[BoundTool], str | None]:
        tools = bind_tools(kwargs.get("tools") or [])
        choice = _forced_tool(kwargs.get("tool_choice"), tools)
        if kwargs.get("tool_choice") == "none":
            tools = []
        rendered = render_messages(messages, tools, style=self.switch_style)
        if rendered.pending is None:
            raise ValueError(
                "the last message is already MOSS's reply; end the messages with a HumanMessage or ToolMessage"
            )
        return rendered, tools, choice

    def _steps(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None,
        kwargs: dict[str, Any],
        run: _Run,
    ) -> Iterator[_Step | _Outcome]:
        """The passes of one call; ``run`` generates (streaming or not) and yields deltas.

        Yields partial steps as text arrives, and finally the outcome.
        """
        rendered, tools, forced = self._prepare(messages, kwargs)
        pending = rendered.pending
        assert pending is not None
        outcome = _Outcome(thoughts=pending.inner_thoughts, commands=pending.commands)
        history = rendered.history

        if pending.results is not None or not tools:
            if pending.results is not None:
                prompt = history + _pass2_prefix(pending) + fmt.MOSS + ":"
            else:
                prompt = fmt.chat_prompt(rendered.system, rendered.turns, pending.human)
            yield from self._reply(prompt, stop, run, outcome)
            yield outcome
            return

        pass1 = fmt.plugin_pass1_prompt(rendered.system, rendered.turns, pending.human)
        if forced is None:
            generated = self._collect(pass1, self._params(stop, (fmt.EOC, fmt.EOM)), run)
            parsed = parser.parse_pass1(generated.text, generated.stop_reason)
        else:
            # Forced choice: let MOSS think, then write the start of the command for it.
            thought = self._collect(pass1, self._params(stop, (fmt.EOT, fmt.EOC, fmt.EOM)), run)
            head = parser.parse_pass1(thought.text, thought.stop_reason).inner_thoughts
            opened = f' {head}{fmt.EOT}\n{fmt.COMMANDS}: {forced}("'
            generated = self._collect(pass1 + opened, self._params(stop, (fmt.EOC, fmt.EOM)), run)
            outcome.generations.append(thought)
            parsed = parser.parse_pass1(opened + generated.text, generated.stop_reason)
        outcome.generations.append(generated)
        outcome.thoughts = parsed.inner_thoughts
        outcome.commands = parsed.commands_text
        for command in parsed.commands:
            call = to_tool_call(command, tools)
            (outcome.tool_calls if call.get("type") == "tool_call" else outcome.invalid).append(call)
        outcome.invalid.extend(_invalid_from_parser(bad) for bad in parsed.invalid)
        if outcome.tool_calls or outcome.invalid:
            yield outcome
            return
        if parsed.reply:  # MOSS skipped the results and answered in pass 1
            outcome.reply = parsed.reply
            yield _Step("reply", parsed.reply)
            yield outcome
            return
        # No command: MOSS answers straight away (results None), continuing from the cached prefix.
        prompt = pass1 + parsed.repaired + fmt.segment(fmt.RESULTS, "\nNone\n") + fmt.MOSS + ":"
        yield from self._reply(prompt, stop, run, outcome)
        yield outcome

    def _reply(self, prompt: str, stop: list[str] | None, run: _Run, outcome: _Outcome) -> Iterator[_Step]:
        """Generate a reply, yielding its text as it comes (never part of an end token or role tag)."""
        stream = parser.StreamParser("reply")
        final: Generation | None = None
        for delta in run(prompt, self._params(stop, (fmt.EOM,))):
            for event in stream.feed(delta.text):
                yield _Step("reply", event.text)
            final = delta.generation or final
        assert final is not None, "the engine ended without a Generation"
        for event in stream.finish(final.stop_reason):
            yield _Step("reply", event.text)
        outcome.generations.append(final)
        outcome.reply = stream.reply.text if stream.reply else ""

    @staticmethod
    def _collect(prompt: str, params: SamplingParams, run: _Run) -> Generation:
        """Generate pass 1 whole (it is delivered as tool calls, not as text)."""
        final: Generation | None = None
        for delta in run(prompt, params):
            final = delta.generation or final
        assert final is not None, "the engine ended without a Generation"
        return final

    # ------------------------------------------------------------------ LangChain entry points

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        engine = self._engine()

        def run(prompt: str, params: SamplingParams) -> Iterator[Delta]:
            generation = engine.generate(prompt, params)
            yield Delta(generation.text, generation)

        outcome = _last(self._steps(messages, stop, kwargs, run))
        message = self._message(outcome)
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        engine = self._engine()

        def run(prompt: str, params: SamplingParams) -> Iterator[Delta]:
            return engine.stream(prompt, params)

        for item in self._steps(messages, stop, kwargs, run):
            if isinstance(item, _Step):
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=item.text))
                if run_manager:
                    run_manager.on_llm_new_token(item.text, chunk=chunk)
                yield chunk
            else:
                yield ChatGenerationChunk(message=self._final_chunk(item))

    # ------------------------------------------------------------------ building messages

    def _metadata(self, outcome: _Outcome) -> tuple[dict[str, Any], dict[str, Any], UsageMetadata]:
        extra: dict[str, Any] = {}
        if outcome.thoughts and outcome.thoughts != fmt.NONE:
            extra[REASONING] = outcome.thoughts
        if outcome.commands is not None:
            extra[RAW_COMMANDS] = outcome.commands
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
        return AIMessage(
            content=outcome.reply,
            tool_calls=outcome.tool_calls,
            invalid_tool_calls=outcome.invalid,
            additional_kwargs=extra,
            response_metadata=meta,
            usage_metadata=usage,
        )

    def _final_chunk(self, outcome: _Outcome) -> AIMessageChunk:
        extra, meta, usage = self._metadata(outcome)
        chunks = [
            {"name": c["name"], "args": json.dumps(c["args"], ensure_ascii=False), "id": c["id"], "index": i}
            for i, c in enumerate(outcome.tool_calls)
        ]
        chunks += [
            {"name": c.get("name"), "args": c.get("args"), "id": c.get("id"), "index": len(chunks) + i}
            for i, c in enumerate(outcome.invalid)
        ]
        return AIMessageChunk(
            content="",
            tool_call_chunks=chunks,
            additional_kwargs=extra,
            response_metadata=meta,
            usage_metadata=usage,
            chunk_position="last",
        )


def _pass2_prefix(pending: PendingTurn) -> str:
    """The pending turn up to ``<|MOSS|>:`` once its tools have answered."""
    return (
        fmt.segment(fmt.HUMAN, pending.human)
        + fmt.segment(fmt.THOUGHTS, pending.inner_thoughts or fmt.NONE)
        + fmt.segment(fmt.COMMANDS, pending.commands or fmt.NONE)
        + fmt.segment(fmt.RESULTS, pending.results or "\nNone\n")
    )


def _forced_tool(choice: Any, tools: Sequence[BoundTool]) -> str | None:
    """The command to prefill for a forced ``tool_choice``, or None when MOSS chooses."""
    if choice in (None, "auto", "none", False) or not tools:
        return None
    if isinstance(choice, dict):
        choice = (choice.get("function") or {}).get("name") or choice.get("name")
    if choice in ("any", "required", True):
        if len(tools) == 1:
            return tools[0].command
        return None
    match = next((t for t in tools if choice in (t.name, t.command)), None)
    if match is None:
        raise ValueError(f"tool_choice {choice!r} names no bound tool ({', '.join(t.name for t in tools)})")
    return match.command


def _invalid_from_parser(bad: Any) -> Any:
    from langchain_core.messages.tool import invalid_tool_call

    from moss_agent.tool_binding import new_call_id

    return invalid_tool_call(name=None, args=bad.text, id=new_call_id(), error=bad.error)


def _usage(generations: Sequence[Generation]) -> UsageMetadata:
    """Token usage over the passes: every prompt token the model was given once, every generated token."""
    seen_input = 0
    output = 0
    cached = 0
    previous_total = 0
    for g in generations:
        # A later pass re-reads the previous prompt and output; count only what is new to it.
        seen_input += max(g.prompt_tokens - previous_total, 0) if previous_total else g.prompt_tokens
        output += g.completion_tokens
        cached += g.cached_tokens
        previous_total = g.prompt_tokens + g.completion_tokens
    usage = UsageMetadata(input_tokens=seen_input, output_tokens=output, total_tokens=seen_input + output)
    if cached:
        usage["input_token_details"] = {"cache_read": cached}
    return usage


def _last(items: Iterator[Any]) -> Any:
    result = None
    for result in items:  # noqa: B007 - the last item is the outcome
        pass
    return result
