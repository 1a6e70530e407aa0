"""The model side of the transformers engine: forward steps over a ``DynamicCache`` and the kept prefix cache.

Written for transformers 5.x (the cache keyword is ``cache=``) and 4.x (``past_key_values=``); the keyword
is picked from the model's signature, so no deprecation warning is triggered either way.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from moss_agent.engines.decoding import common_prefix

if TYPE_CHECKING:
    import torch

__all__ = ["ModelRunner"]


class ModelRunner:
    """A causal LM behind the few calls the decode loop needs, plus the KV cache of the last generation.

    The kept cache always holds exactly the tokens in ``cached_ids``. A generation takes it (:meth:`checkout`)
    and gives it back when done (:meth:`checkin`); meanwhile another generation finds none and starts afresh,
    so two generations never write into one cache.

    Args:
        model: A causal LM taking ``input_ids``, ``position_ids``, ``attention_mask`` and a cache.
    """

    def __init__(self, model: Any) -> None:
        self.model = model.eval()
        self.vocab_size: int = model.config.vocab_size
        accepted = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in accepted else "past_key_values"  # renamed in transformers 5.x
        self._extra: dict[str, Any] = {"use_cache": True}
        if "logits_to_keep" in accepted:  # only the last position: a 107k-wide row per prompt token adds up
            self._extra["logits_to_keep"] = 1
        self._cache: Any = None
        self.cached_ids: list[int] = []

    @property
    def device(self) -> torch.device:
        """Where input ids go: where the token embedding runs (the first block's device under a device map)."""
        return _runs_on(self.model.get_input_embeddings())

    @property
    def output_device(self) -> torch.device:
        """Where the logits come out (the last block's device under a device map)."""
        return _runs_on(self.model.get_output_embeddings() or self.model.get_input_embeddings())

    def new_cache(self) -> Any:
        """An empty ``DynamicCache`` for this model."""
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # transformers 4.x
            return DynamicCache()

    def forward(
        self, ids: torch.Tensor, positions: torch.Tensor, cache: Any, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run ``ids`` (batch, n) after what ``cache`` holds, updating it; the last position's logits."""
        out = self.model(
            input_ids=ids,
            position_ids=positions,
            attention_mask=mask,
            **{self._cache_kw: cache},
            **self._extra,
        )
        return out.logits[:, -1, :]  # type: ignore[no-any-return]

    def seen(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """A (batch, vocab) boolean matrix, True at each row's token ids (for the repetition penalty)."""
        import torch

        device = self.output_device
        seen = torch.zeros(len(rows), self.vocab_size, dtype=torch.bool, device=device)
        for r, ids in enumerate(rows):
            seen[r, torch.tensor(list(ids), dtype=torch.long, device=device)] = True
        return seen

    def checkout(self, ids: Sequence[int]) -> tuple[Any, int]:
        """Take the kept cache for a prompt, cropped to the prefix it shares with ``ids``.

        Returns:
            The cache and how many prompt tokens it holds; always fewer than ``len(ids)``, since the last
            prompt token must be run to get the logits of the first new token.
        """
        cache, cached_ids = self._cache, self.cached_ids
        self._cache, self.cached_ids = None, []
        reuse = min(common_prefix(cached_ids, ids), len(ids) - 1) if cache is not None else 0
        if reuse <= 0:
            return self.new_cache(), 0
        if len(cached_ids) > reuse:
            # A negative count removes that many tokens, in transformers 4.x and 5.x alike.
            cache.crop(reuse - len(cached_ids))
        return cache, reuse

    def checkin(self, cache: Any, ids: list[int]) -> None:
        """Keep ``cache`` (holding exactly ``ids``) for the next prompt."""
        self._cache, self.cached_ids = cache, ids

    def reset(self) -> None:
        """Drop the kept cache."""
        self._cache, self.cached_ids = None, []


def _runs_on(module: Any) -> torch.device:
    """The device a module computes on; accelerate's offload hook knows it for weights kept on CPU or disk."""
    import torch

    device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    return torch.device(device) if device is not None else module.weight.device  # type: ignore[no-any-return]
