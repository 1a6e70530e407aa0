"""Token-level helpers of the transformers engine: logits processing, sampling and incremental text.

Kept apart from :mod:`moss_agent.engines.transformers`, which holds the decode loop.
Imports torch at call time only (the type names are for annotations).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from moss_agent.engines.base import SamplingParams, StopCutter

if TYPE_CHECKING:
    import torch

__all__ = ["TextTracker", "common_prefix", "make_generator", "next_tokens"]

_REPLACEMENT = "\ufffd"


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token id sequences."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """As transformers' ``RepetitionPenaltyLogitsProcessor``, on a boolean (batch, vocab) ``seen`` matrix.

    A matrix rather than the id sequence so that left padding never penalises the pad token of a row.
    """
    if penalty == 1.0:
        return logits
    import torch

    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def _top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    import torch

    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def _top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering as transformers' ``TopPLogitsWarper`` (the most likely token always stays)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1 - p)
    drop_sorted[..., -1] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A generator seeded with ``params.seed`` for reproducible sampling; None when greedy or unseeded."""
    import torch

    if params.greedy or params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


def next_tokens(
    logits: torch.Tensor,
    seen: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    vocab_limit: int,
) -> torch.Tensor:
    """Pick the next token of every row.

    The order is transformers' (repetition penalty, then temperature, top-k, top-p); the penalty applies under
    greedy decoding too, as in ``model.generate``.

    Args:
        logits: (batch, vocab) scores of the last position.
        seen: (batch, vocab) booleans, True for every token already in a row's prompt or output.
        params: Sampling parameters.
        generator: Seeded generator for reproducible sampling, or None for torch's global one.
        vocab_limit: Ids at or above it (padding rows of the embedding with no token) are never picked.

    Returns:
        A (batch,) tensor of token ids.
    """
    import torch

    scores = logits.float()
    if vocab_limit < scores.shape[-1]:
        scores[..., vocab_limit:] = float("-inf")
    scores = _repetition_penalty(scores, seen, params.repetition_penalty)
    if params.greedy:
        return scores.argmax(dim=-1)
    scores = _top_p(_top_k(scores / params.temperature, params.top_k), params.top_p)
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(-1)


class TextTracker(StopCutter):
    """Turns generated token ids into text, incrementally, and watches for stop strings.

    Text grows only on whole UTF-8 characters (a token that ends inside a character waits for the next one);
    stop strings are cut and held back by :class:`~moss_agent.engines.base.StopCutter`.
    """

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str]) -> None:
        super().__init__(stops)
        self._decode = decode
        self._pending: list[int] = []

    def push(self, token_id: int) -> None:
        """Add one generated token."""
        self._pending.append(token_id)
        piece = self._decode(self._pending)
        if piece.endswith(_REPLACEMENT):
            return  # likely a character split across tokens: wait for its remaining bytes
        self._pending.clear()
        self.add(piece)

    def flush(self) -> None:
        """Decode whatever is pending (at the end of generation), incomplete characters included."""
        if self._pending:
            piece = self._decode(self._pending)
            self._pending.clear()
            self.add(piece)
