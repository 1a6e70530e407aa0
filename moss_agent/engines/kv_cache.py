"""The model side of the transformers engine: forward steps over a preallocated KV cache, and the kept prefix cache.

Written for transformers 5.x (the cache keyword is ``cache=``) and 4.x (``past_key_values=``); the keyword
is picked from the model's signature, so no deprecation warning is triggered either way.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from moss_agent.engines.codegen_step import lean_step, supports_lean_step
from moss_agent.engines.decoding import common_prefix

if TYPE_CHECKING:
    import torch

__all__ = ["ModelRunner", "preallocated_cache", "reserve"]


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
        self._lean: bool | None = None if supports_lean_step(model) else False  # None: checked at first use

    @property
    def device(self) -> torch.device:
        """Where input ids go: where the token embedding runs (the first block's device under a device map)."""
        return _runs_on(self.model.get_input_embeddings())

    @property
    def output_device(self) -> torch.device:
        """Where the logits come out (the last block's device under a device map)."""
        return _runs_on(self.model.get_output_embeddings() or self.model.get_input_embeddings())

    def new_cache(self, room: int = 0) -> Any:
        """An empty cache for this model with room for ``room`` tokens (see :func:`preallocated_cache`)."""
        return preallocated_cache(self.model.config, room)

    def forward(
        self, ids: torch.Tensor, positions: torch.Tensor, cache: Any, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run ``ids`` (batch, n) after what ``cache`` holds, updating it; the last position's logits.

        One token of one sequence goes through :func:`~moss_agent.engines.codegen_step.lean_step` once a probe
        (at the first such call) has shown that it gives the model's own logits, bit for bit.
        """
        if self._lean is None and mask is None and ids.shape == (1, 1):
            self._lean = self._lean_matches(ids.device)
        if self._lean and mask is None and ids.shape == (1, 1):
            return lean_step(self.model, ids, positions, cache)
        return self._model_forward(ids, positions, cache, mask)

    def _lean_matches(self, device: torch.device) -> bool:
        """Whether the lean step gives the model's logits bit for bit (a 3-token probe, then one step each)."""
        import torch

        ids, positions = torch.tensor([[0, 1, 2]], device=device), torch.arange(3, device=device).unsqueeze(0)
        token, position = torch.tensor([[3]], device=device), torch.tensor([[3]], device=device)
        lean, full = self.new_cache(4), self.new_cache(4)
        for cache in (lean, full):
            self._model_forward(ids, positions, cache, None)
        want = self._model_forward(token, position, full, None)
        return bool(lean_step(self.model, token, position, lean).equal(want))

    def _model_forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: Any, mask: Any) -> torch.Tensor:
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

    def checkout(self, ids: Sequence[int], room: int = 0) -> tuple[Any, int]:
        """Take the kept cache for a prompt, cropped to the prefix it shares with ``ids``.

        Args:
            ids: The prompt's token ids.
            room: Tokens the cache will hold by the end of the generation (prompt plus new tokens).

        Returns:
            The cache and how many prompt tokens it holds; always fewer than ``len(ids)``, since the last
            prompt token must be run to get the logits of the first new token.
        """
        cache, cached_ids = self._cache, self.cached_ids
        self._cache, self.cached_ids = None, []
        reuse = min(common_prefix(cached_ids, ids), len(ids) - 1) if cache is not None else 0
        if reuse <= 0:
            return self.new_cache(room), 0
        if len(cached_ids) > reuse:
            # A negative count removes that many tokens, in transformers 4.x and 5.x alike.
            cache.crop(reuse - len(cached_ids))
        reserve(cache, room)
        return cache, reuse

    def checkin(self, cache: Any, ids: list[int]) -> None:
        """Keep ``cache`` (holding exactly ``ids``) for the next prompt."""
        self._cache, self.cached_ids = cache, ids

    def reset(self) -> None:
        """Drop the kept cache."""
        self._cache, self.cached_ids = None, []


def preallocated_cache(config: Any, reserve: int = 0) -> Any:
    """A ``DynamicCache`` whose layers write into buffers with room for ``reserve`` tokens (see :func:`reserve`).

    ``DynamicLayer.update`` grows keys and values with ``torch.cat``: every decode step copies the whole cache
    of every layer (at 1,900 tokens that was a fifth of a step on a CPU). These layers write the new tokens
    into the free end of a buffer instead and hand attention a view of the filled part; a buffer grows (doubling)
    only when a prompt needs more than reserved. Under transformers 4.x, whose cache has no layer objects, a
    plain ``DynamicCache``.
    """
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=config)
    except TypeError:  # transformers 4.x
        return DynamicCache()
    layer = _preallocated_layer()
    if layer is None:
        return cache
    # Only plain full-attention layers are replaced (MOSS has no others); a cache built without layers stays as is.
    cache.layers = [layer(reserve) if type(old) is _DYNAMIC_LAYER[0] else old for old in cache.layers]
    return cache


def reserve(cache: Any, tokens: int) -> None:
    """Make every preallocated layer of ``cache`` allocate room for ``tokens`` tokens at its next growth."""
    for layer in getattr(cache, "layers", ()):
        if hasattr(layer, "reserve"):
            layer.reserve = max(layer.reserve, tokens)


_DYNAMIC_LAYER: list[Any] = []
_LAYER: list[Any] = []


def _preallocated_layer() -> Any:
    """The preallocated layer class, built once on first use (transformers is imported at call time)."""
    if _LAYER:
        return _LAYER[0]
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # transformers before 4.56
        return None

    class PreallocatedLayer(DynamicLayer):  # type: ignore[misc, valid-type]
        """A ``DynamicLayer`` whose ``keys`` / ``values`` are views of the first tokens of larger buffers.

        Whatever replaces ``keys`` with a tensor of its own (an inherited batch operation, a reset) is noticed
        at the next update, which copies it into a new buffer: the views stay correct whatever ran in between.
        """

        def __init__(self, reserve: int = 0) -> None:
            super().__init__()
            self.reserve = reserve
            self._kbuf: torch.Tensor | None = None
            self._vbuf: torch.Tensor | None = None

        def _fits(self, end: int, new: torch.Tensor | None = None) -> bool:
            """Whether ``keys`` is still a view of the buffer, which has room up to ``end`` (for ``new``'s rows)."""
            buf = self._kbuf
            return (
                buf is not None
                and self.keys is not None
                and (self.keys.numel() == 0 or self.keys.data_ptr() == buf.data_ptr())
                and (new is None or buf.shape[:2] == new.shape[:2])
                and buf.shape[-2] >= end
            )

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            start = self.get_seq_length()
            end = start + key_states.shape[-2]
            if not self._fits(end, key_states):
                # Past its reservation a buffer doubles, so that growing one token at a time stays linear.
                grown = end if self._kbuf is None else 2 * end
                self._allocate(key_states, value_states, start, self.reserve if self.reserve >= end else grown)
            assert self._kbuf is not None and self._vbuf is not None
            self._kbuf[:, :, start:end].copy_(key_states)
            self._vbuf[:, :, start:end].copy_(value_states)
            self.keys, self.values = self._kbuf[:, :, :end], self._vbuf[:, :, :end]
            return self.keys, self.values

        def _allocate(self, keys: torch.Tensor, values: torch.Tensor, filled: int, size: int) -> None:
            kbuf = keys.new_empty((*keys.shape[:2], size, keys.shape[-1]))
            vbuf = values.new_empty((*values.shape[:2], size, values.shape[-1]))
            if filled:
                assert self.keys is not None and self.values is not None
                kbuf[:, :, :filled].copy_(self.keys)
                vbuf[:, :, :filled].copy_(self.values)
            self._kbuf, self._vbuf = kbuf, vbuf

        def batch_repeat_interleave(self, repeats: int) -> None:
            n = self.get_seq_length()
            if not (n and self._fits(n)):
                super().batch_repeat_interleave(repeats)
                return
            assert self._kbuf is not None and self._vbuf is not None
            size = max(self._kbuf.shape[-2], self.reserve)
            bufs = []
            for old in (self._kbuf, self._vbuf):  # one copy straight into buffers of the reserved size
                b, h, _, d = old.shape
                new = old.new_empty((b * repeats, h, size, d))
                new.view(b, repeats, h, size, d)[:, :, :, :n].copy_(old[:, None, :, :n])
                bufs.append(new)
            self._kbuf, self._vbuf = bufs
            self.keys, self.values = self._kbuf[:, :, :n], self._vbuf[:, :, :n]

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            n = self.get_seq_length()
            if n and self._fits(n):
                assert self._kbuf is not None and self._vbuf is not None
                self._kbuf, self._vbuf = self._kbuf[indices, ...], self._vbuf[indices, ...]
                self.keys, self.values = self._kbuf[:, :, :n], self._vbuf[:, :, :n]
            else:
                super().batch_select_indices(indices)

    _DYNAMIC_LAYER.append(DynamicLayer)
    _LAYER.append(PreallocatedLayer)
    return PreallocatedLayer


def _runs_on(module: Any) -> torch.device:
    """The device a module computes on; accelerate's offload hook knows it for weights kept on CPU or disk."""
    import torch

    device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    return torch.device(device) if device is not None else module.weight.device  # type: ignore[no-any-return]
