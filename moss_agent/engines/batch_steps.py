"""StepBatchable: what an engine offers so that a loop outside it can batch generations step by step.

The server's continuous batching (:class:`~moss_agent.server.batching.BatchingEngine`) runs many generations
as rows of one batch: it prefills the rows' prompts, feeds one token of every row per forward step and lets
rows join and leave between steps. It needs more of an engine than the :class:`~moss_agent.engines.base.Engine`
protocol gives: the model runner, the model lock, the prefix cache to start rows from, and how the engine
reads prompts and tokens. :class:`StepBatchable` names those few members;
:class:`~moss_agent.engines.transformers.TransformersEngine` has them, and a loop picks batching by
``isinstance(engine, StepBatchable)``.
"""

from __future__ import annotations

import threading
from collections.abc import Set
from typing import Any, Protocol, runtime_checkable

from moss_agent.engines.base import Engine, SamplingParams
from moss_agent.engines.kv_cache import ModelRunner

__all__ = ["StepBatchable"]


@runtime_checkable
class StepBatchable(Engine, Protocol):
    """An :class:`~moss_agent.engines.base.Engine` whose model a batching loop may drive one step at a time.

    The loop holds :attr:`lock` (and ``torch.inference_mode``) around every model call it makes, through
    :attr:`runner` or :meth:`shared_cache`; :meth:`prepare` and :meth:`decode` need no lock.
    """

    @property
    def runner(self) -> ModelRunner:
        """The model behind forward steps (``device``, ``output_device``, ``forward``, ``seen``)."""
        ...

    @property
    def lock(self) -> threading.Lock:
        """Held around every model call: one at a time, the engine's own generations included."""
        ...

    @property
    def pad_id(self) -> int:
        """The token id that fills left padding (masked out, so any id would do)."""
        ...

    @property
    def vocab_limit(self) -> int:
        """Token ids at or past this are never picked (embedding rows beyond the tokenizer)."""
        ...

    @property
    def eos_ids(self) -> Set[int]:
        """End-of-sequence token ids: a row that picks one ends with ``stop_reason`` ``"eos"``."""
        ...

    def prepare(self, prompt: str, params: SamplingParams) -> tuple[list[int], dict[int, str]]:
        """The prompt's token ids fitted to the context window, and the stop token ids (id -> end token).

        Raises:
            ContextWindowExceededError: When the prompt does not fit and may not be truncated.
            ValueError: For a stop token that is not one token, an empty prompt, or ``max_new_tokens`` < 1.
        """
        ...

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids``, end tokens included."""
        ...

    def shared_cache(self, head: list[int], n: int, room: int) -> tuple[Any, int]:
        """A KV cache holding ``head[:-1]`` (the rows' shared prefix) for ``n`` rows; the caller holds the lock.

        Args:
            head: The shared prefix plus one token (the first row's next); only ``head[:-1]`` is prefilled.
            n: Rows in the batch.
            room: Tokens each row's cache has room for (prompt and output).

        Returns:
            The cache, and how many prefix tokens came from the engine's kept prefix cache.
        """
        ...
