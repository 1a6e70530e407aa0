"""Generation: the Engine protocol every face talks to, and the local transformers engine.

The engine knows text and tokens, never plugins: callers say which MOSS end tokens stop a generation
(``<eoc>`` for plugin pass 1, ``<eom>`` for replies) and get back the text before the stop and what stopped it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol, runtime_checkable

__all__ = [
    "Delta",
    "Engine",
    "Generation",
    "SamplingParams",
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

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 40
    repetition_penalty: float = 1.02
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

    model_name: str
    """A name for response metadata."""

    context_window: int
    """Prompt plus generated tokens the model can attend to."""

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
