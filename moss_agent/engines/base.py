"""Generation: the Engine protocol every face talks to, its sampling settings, and the one stop-string cutter.

The engine knows text and tokens, never plugins: callers say which MOSS end tokens stop a generation
(``<eoc>`` for plugin pass 1, ``<eom>`` for replies) and get back the text before the stop and what stopped
it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol, runtime_checkable

from langchain_core.exceptions import ContextOverflowError

from moss_agent import settings

__all__ = [
    "ContextWindowExceededError",
    "Delta",
    "Engine",
    "Generation",
    "SamplingParams",
    "StopCutter",
    "cut_at_stop",
    "fit_context",
    "stop_token_ids",
]


@dataclass(frozen=True)
class SamplingParams:
    """How to generate. Defaults are the MOSS release's.

    Attributes:
        max_new_tokens: Upper bound on generated tokens.
        temperature: Sampling temperature; 0 means greedy.
        top_p: Nucleus sampling mass.
        top_k: Top-k sampling.
        repetition_penalty: The release's mild repetition penalty.
        do_sample: False for greedy decoding.
        seed: Seed for reproducible sampling.
        stop_tokens: MOSS end tokens that end generation (each one token id).
        stop: Further stop strings.
        truncate: What to do when prompt plus ``max_new_tokens`` exceed the context window: ``error`` raises,
            ``left`` drops the oldest prompt tokens.
    """

    max_new_tokens: int = settings.MAX_NEW_TOKENS
    temperature: float = settings.TEMPERATURE
    top_p: float = settings.TOP_P
    top_k: int = settings.TOP_K
    repetition_penalty: float = settings.REPETITION_PENALTY
    do_sample: bool = True
    seed: int | None = None
    stop_tokens: tuple[str, ...] = ("<eom>",)
    stop: tuple[str, ...] = ()
    truncate: Literal["error", "left"] = "error"

    @property
    def greedy(self) -> bool:
        """Whether decoding is greedy."""
        return not self.do_sample or self.temperature <= 0

    def with_(self, **changes: object) -> SamplingParams:
        """A copy with some fields changed."""
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Generation:
    """The result of one generation.

    Attributes:
        text: Generated text, without the stop token or stop string that ended it.
        stop_reason: The end token or stop string that ended it, ``"length"`` at ``max_new_tokens`` or the
            context window, ``"eos"`` at another end-of-sequence token.
        prompt_tokens: Tokens in the prompt.
        completion_tokens: Tokens generated (the stop token included).
        cached_tokens: Prompt tokens whose KV cache was reused rather than prefilled.
    """

    text: str
    stop_reason: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    token_ids: tuple[int, ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class Delta:
    """One streamed piece: new text, and on the last piece the whole :class:`Generation`.

    Streamed text never contains part of a stop token or stop string.
    """

    text: str
    generation: Generation | None = None


@runtime_checkable
class Engine(Protocol):
    """What every face (ChatMoss, MossLLM, MossAgent) needs from a model, local or remote."""

    @property
    def model_name(self) -> str:
        """A name for response metadata."""
        ...

    @property
    def context_window(self) -> int:
        """Prompt plus generated tokens the model can attend to."""
        ...

    def generate(self, prompt: str, params: SamplingParams) -> Generation:
        """Generate a continuation of ``prompt``."""
        ...

    def generate_batch(self, prompts: Sequence[str], params: SamplingParams) -> list[Generation]:
        """Generate continuations of several prompts; under greedy, equal to one by one."""
        ...

    def stream(self, prompt: str, params: SamplingParams) -> Iterator[Delta]:
        """Generate, yielding text as it comes; the last delta carries the :class:`Generation`."""
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text`` under the model's tokenizer."""
        ...

    def token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` under the model's tokenizer."""
        ...


class ContextWindowExceededError(ContextOverflowError, ValueError):
    """The prompt plus ``max_new_tokens`` do not fit the model's context window (LangChain's ContextOverflowError)."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, context_window: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.context_window = context_window
        super().__init__(
            f"the prompt of {prompt_tokens} tokens plus max_new_tokens={max_new_tokens} is "
            f"{prompt_tokens + max_new_tokens} tokens, over the context window of {context_window}: "
            "shorten the prompt (fewer turns of history), lower max_new_tokens, or set truncate='left' on "
            "ChatMoss, MossLLM or MossAgent to drop the oldest whole turns"
        )


def fit_context(ids: list[int], params: SamplingParams, context_window: int) -> list[int]:
    """The prompt ids that fit beside ``params.max_new_tokens``: all, the newest, or an error.

    Shared by the engines so that they agree on the context rules (``truncate="left"`` keeps the newest).

    Raises:
        ValueError: For an empty prompt or ``max_new_tokens`` below 1.
        ContextWindowExceededError: When the prompt does not fit and may not be truncated (or nothing of it
            would be left).
    """
    if not ids:
        raise ValueError("the prompt is empty: an engine continues a prompt of at least one token")
    if params.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {params.max_new_tokens}")
    room = context_window - params.max_new_tokens
    if len(ids) <= room:
        return ids
    if params.truncate == "left" and room >= 1:
        return ids[-room:]
    raise ContextWindowExceededError(len(ids), params.max_new_tokens, context_window)


def _first_stop(text: str, stops: Sequence[str], start: int = 0) -> tuple[int, str] | None:
    found = [(i, s) for s in stops if s and (i := text.find(s, start)) >= 0]
    return min(found, key=lambda f: f[0]) if found else None


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, str | None]:
    """``text`` up to the first stop string in it, and that stop string (None when there is none)."""
    first = _first_stop(text, stops)
    return (text, None) if first is None else (text[: first[0]], first[1])


class StopCutter:
    """Text as it streams in, cut before the first stop string, with any tail that may start one held back.

    The one stop-string rule of every engine (local, remote, scripted): streamed pieces concatenate to exactly
    the final text and never show part of a stop string.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._longest = max((len(s) for s in self.stops), default=0)
        self._emitted = 0
        self.text = ""
        """Text so far (cut before the stop string once one is found)."""
        self.stop: str | None = None
        """The stop string found, if any."""

    def add(self, piece: str) -> None:
        """Append streamed text, looking for a stop string where the new piece could complete one."""
        if self.stop is not None or not piece:
            return
        start = max(0, len(self.text) - self._longest + 1)
        self.text += piece
        first = _first_stop(self.text, self.stops, start)
        if first is not None:
            self.text, self.stop = self.text[: first[0]], first[1]

    def _held(self) -> int:
        """Length of the longest tail not streamed yet that is a proper prefix of some stop string."""
        if self.stop is not None:
            return 0
        held = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text) - self._emitted), held, -1):
                if self.text.endswith(s[:k]):
                    held = k
                    break
        return held

    def ready(self, final: bool = False) -> str:
        """Text not streamed yet that can be streamed now (all of it when ``final``)."""
        end = len(self.text) - (0 if final else self._held())
        piece = self.text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return piece


def stop_token_ids(
    stop_tokens: Sequence[str], token_ids: Callable[[str], list[int]], known: dict[str, int]
) -> dict[int, str]:
    """Token id -> end token for ``stop_tokens``, each looked up once (``known`` caches the lookups).

    Raises:
        ValueError: When a stop token is not one token under the tokenizer.
    """
    for tok in stop_tokens:
        if tok not in known:
            ids = token_ids(tok)
            if len(ids) != 1:
                raise ValueError(
                    f"stop token {tok!r} is {len(ids)} tokens under this tokenizer, not one: pass it in "
                    "SamplingParams.stop (stop strings) instead of stop_tokens"
                )
            known[tok] = ids[0]
    return {known[t]: t for t in stop_tokens}
