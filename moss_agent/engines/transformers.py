"""The local engine: a transformers causal LM with MOSS end-token stops, streaming and prefix KV-cache reuse."""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

from moss_agent.engines.base import Delta, Generation, SamplingParams, fit_context, stop_token_ids
from moss_agent.engines.decoding import TextTracker, common_prefix, make_generator, next_tokens
from moss_agent.engines.kv_cache import ModelRunner, reserve
from moss_agent.settings import CONTEXT_WINDOW

__all__ = ["TransformersEngine"]


class TransformersEngine:
    """Generation with a local transformers causal LM (MOSS loads as ``CodeGenForCausalLM``).

    A hand-written decode loop over ``model(...)`` with a preallocated KV cache
    (:func:`~moss_agent.engines.kv_cache.preallocated_cache`: room for the prompt and every new token is
    allocated once, so a step writes one position instead of copying the cache). A generation stops at the MOSS
    end tokens of ``params.stop_tokens`` (ids looked up in the tokenizer; ``stop_reason`` is the token, e.g.
    ``"<eoc>"``), at the model's end-of-sequence token otherwise (``"eos"``), at a stop string
    (``stop_reason`` is the string; the text is cut before it), at ``max_new_tokens`` or the context window
    (``"length"``).

    The KV cache of the last prompt plus output is kept: a prompt that starts with the same token ids (plugin
    pass 2, the next turn of a conversation) only prefills its new suffix. One model call runs at a time and
    :meth:`generate` holds the model until it is done; a stream paused between deltas lets other calls run,
    which then prefill from scratch.

    It is :class:`~moss_agent.engines.batch_steps.StepBatchable`: the server's continuous batching drives its
    model step by step through the attributes below and :meth:`prepare`, :meth:`decode` and
    :meth:`shared_cache`, holding :attr:`lock` around every model call.

    Args:
        model: A causal LM taking ``input_ids``, ``position_ids``, ``attention_mask`` and a cache.
        tokenizer: Its tokenizer (the MOSS byte-level BPE with the end tokens as added tokens).
        model_name: Name for response metadata; by default the model's ``name_or_path``.
        context_window: Prompt plus generated tokens; by default the model's ``n_positions`` (2048 for MOSS).
        prefix_cache: Keep and reuse the KV cache of the last generation.

    Attributes:
        runner: The model behind forward steps, and the kept prefix cache.
        lock: Held around every model call (one at a time).
        eos_ids: End-of-sequence token ids (``stop_reason`` ``"eos"``).
        pad_id: The token id that fills (masked) left padding in a batch.
        vocab_limit: Token ids at or past this are never picked (embedding rows beyond the tokenizer).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        model_name: str | None = None,
        context_window: int | None = None,
        prefix_cache: bool = True,
    ) -> None:
        config = model.config
        positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        if context_window is not None and positions and context_window > positions:
            raise ValueError(f"context_window={context_window} is beyond the model's {positions} positions")
        self.model = model
        self.tokenizer = tokenizer
        self.model_name: str = model_name or getattr(config, "name_or_path", "") or "moss"
        self.context_window: int = context_window or positions or CONTEXT_WINDOW
        self.prefix_cache = prefix_cache
        self.runner = ModelRunner(model)
        self.lock = threading.Lock()
        self._stop_ids: dict[str, int] = {}
        eos = (config.eos_token_id, getattr(tokenizer, "eos_token_id", None))
        self.eos_ids = frozenset(i for e in eos for i in (e if isinstance(e, list) else [e]) if i is not None)
        self.pad_id: int = next(i for i in (tokenizer.pad_token_id, *sorted(self.eos_ids), 0) if i is not None)
        self.vocab_limit: int = len(tokenizer)

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike[str],
        *,
        model_name: str | None = None,
        context_window: int | None = None,
        prefix_cache: bool = True,
        **load_kwargs: Any,
    ) -> TransformersEngine:
        """Load a MOSS checkpoint (directory or hub id) with :func:`moss_agent.checkpoints.loading.load_moss`.

        Args:
            model: Checkpoint directory or hub id.
            model_name: Name for response metadata; by default the directory name or the hub id.
            context_window: See the class.
            prefix_cache: See the class.
            **load_kwargs: Passed to ``load_moss`` (``precision``, ``device_map``, ``max_memory``, ...).
        """
        from moss_agent.checkpoints.loading import load_moss

        loaded = load_moss(model, **load_kwargs)
        name = model_name or (Path(model).name if Path(model).is_dir() else str(model))
        return cls(
            loaded.model,
            loaded.tokenizer,
            model_name=name,
            context_window=context_window,
            prefix_cache=prefix_cache,
        )

    def token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` (no bos: MOSS prompts are encoded without one)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text``."""
        return len(self.token_ids(text))

    def reset_cache(self) -> None:
        """Drop the kept KV cache (frees its memory; the next prompt is prefilled in full)."""
        with self.lock:
            self.runner.reset()

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids``, end tokens included (no clean-up: deltas concatenate to the whole)."""
        return str(self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))

    def prepare(self, prompt: str, params: SamplingParams) -> tuple[list[int], dict[int, str]]:
        """The prompt's ids fitted to the context window, and the stop token ids (id -> token).

        Raises:
            ContextWindowExceededError: As :meth:`generate`.
            ValueError: As :meth:`generate`.
        """
        stop_ids = stop_token_ids(params.stop_tokens, self.token_ids, self._stop_ids)
        return fit_context(self.token_ids(prompt), params, self.context_window), stop_ids

    # ------------------------------------------------------------ one prompt

    def _run(self, prompt: str, params: SamplingParams, keep: list[bool]) -> Generator[Delta, None, None]:
        """The decode loop as deltas; the caller holds the lock and inference mode during each step.

        The cache goes back to the runner before the last delta. A loop abandoned at a delta hands it back
        too, unless the caller cleared ``keep[0]`` (it could not take the lock).
        """
        import torch

        ids, stop_ids = self.prepare(prompt, params)
        runner = self.runner
        room = len(ids) + min(params.max_new_tokens, self.context_window - len(ids))
        cache, reused = runner.checkout(ids, room) if self.prefix_cache else (runner.new_cache(room), 0)
        fed = ids[:reused]  # what the cache holds
        consistent = True  # False while a forward pass may have half-updated the cache
        todo, generated = ids[reused:], []
        text = TextTracker(self.decode, params.stop)
        reason = "length"
        try:
            device = runner.device
            seen = runner.seen([ids])
            generator = make_generator(params, runner.output_device)
            while True:
                consistent = False
                positions = torch.arange(len(fed), len(fed) + len(todo), device=device).unsqueeze(0)
                logits = runner.forward(torch.tensor([todo], device=device), positions, cache)
                fed.extend(todo)
                consistent = True
                token = int(next_tokens(logits, seen, params, generator, self.vocab_limit)[0])
                generated.append(token)
                seen[0, token] = True
                if token in stop_ids or token in self.eos_ids:
                    reason = stop_ids.get(token, "eos")
                    break
                text.push(token)
                if text.stop is not None:
                    break
                if len(generated) >= min(params.max_new_tokens, self.context_window - len(ids)):
                    break
                if piece := text.ready():
                    yield Delta(piece)
                todo = [token]
        except BaseException:  # GeneratorExit at a delta included
            if consistent and keep[0] and self.prefix_cache:
                runner.checkin(cache, fed)
            raise
        if self.prefix_cache:
            runner.checkin(cache, fed)
        text.flush()
        generation = Generation(text.text, text.stop or reason, len(ids), len(generated), reused, tuple(generated))
        yield Delta(text.ready(final=True), generation)

    def generate(self, prompt: str, params: SamplingParams) -> Generation:
        """Generate a continuation of ``prompt`` (see the class for what stops it).

        Raises:
            ContextWindowExceededError: When prompt plus ``max_new_tokens`` exceed the context window and
                ``params.truncate`` is ``"error"``.
            ValueError: For a stop token that is not one token, an empty prompt, or ``max_new_tokens`` < 1.
        """
        import torch

        with self.lock, torch.inference_mode():
            *_, last = self._run(prompt, params, [True])
        assert last.generation is not None, "the decode loop ends with the Generation"
        return last.generation

    def stream(self, prompt: str, params: SamplingParams) -> Iterator[Delta]:
        """Generate, yielding text deltas; the last delta carries the :class:`Generation`.

        Deltas never hold part of a character, of an end token or of a stop string, and they concatenate to
        the final ``Generation.text``. The errors of :meth:`generate` are raised at the first ``next()``.
        """
        import torch

        keep = [True]
        steps = self._run(prompt, params, keep)
        try:
            while True:
                with self.lock, torch.inference_mode():
                    delta = next(steps, None)
                if delta is None:
                    return
                yield delta
        finally:
            # An abandoned stream hands its cache back under the lock. Never wait for the lock here: a
            # garbage-collected stream may be finalised in a thread that holds it; drop the cache instead.
            if self.lock.acquire(blocking=False):
                try:
                    steps.close()
                finally:
                    self.lock.release()
            else:
                keep[0] = False
                steps.close()

    # ------------------------------------------------------------ several prompts

    def generate_batch(self, prompts: Sequence[str], params: SamplingParams) -> list[Generation]:
        """Generate for several prompts at once; under greedy, equal to one by one.

        The rows' longest common token prefix (a shared system prompt) is prefilled once, after what the
        kept prefix cache already holds, and kept for later calls; its cache is then repeated for every row and
        the rows' differing suffixes run together, padded on the left of the suffix part (a masked gap between
        prefix and suffix; positions continue from the prefix). ``cached_tokens`` counts, for the first row,
        what came from the kept cache and, for the others, the shared prefix. Raises as :meth:`generate` does,
        before any model call, for any prompt.
        """
        import torch

        prepared = [self.prepare(p, params) for p in prompts]
        if not prepared:
            return []
        stop_ids, rows = prepared[0][1], [ids for ids, _ in prepared]
        runner, n = self.runner, len(rows)
        # Every row keeps at least one suffix token: its last prompt token gives the first new token's logits.
        shared = min(min(common_prefix(rows[0], r) for r in rows), min(len(r) for r in rows) - 1)
        texts = [TextTracker(self.decode, params.stop) for _ in rows]
        generated: list[list[int]] = [[] for _ in rows]
        reasons: list[str | None] = [None] * n
        with self.lock, torch.inference_mode():
            device = runner.device
            suffixes = [r[shared:] for r in rows]
            width = max(len(s) for s in suffixes)
            cache, reused = self.shared_cache(rows[0][: shared + 1], n, shared + width + params.max_new_tokens)
            ids = torch.tensor([[self.pad_id] * (width - len(s)) + s for s in suffixes], device=device)
            tail = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in suffixes], device=device)
            mask = torch.cat([tail.new_ones(n, shared), tail], dim=-1)
            # Rotary positions count from each row's first real token, as when the row runs alone.
            positions = shared + (tail.cumsum(-1) - 1).clamp(min=0)
            seen = runner.seen(rows)
            generator = make_generator(params, runner.output_device)
            active = list(range(n))  # the rows still generating, in batch order
            while True:
                logits = runner.forward(ids, positions, cache, mask)
                tokens = next_tokens(logits, seen, params, generator, self.vocab_limit).tolist()
                for b, (r, token) in enumerate(zip(active, tokens, strict=True)):
                    generated[r].append(token)
                    seen[b, token] = True
                    if token in stop_ids or token in self.eos_ids:
                        reasons[r] = stop_ids.get(token, "eos")
                        continue
                    texts[r].push(token)
                    limit = min(params.max_new_tokens, self.context_window - len(rows[r]))
                    if texts[r].stop is not None or len(generated[r]) >= limit:
                        reasons[r] = "length"
                keep = [b for b, r in enumerate(active) if reasons[r] is None]
                if not keep:
                    break
                if len(keep) < len(active):  # finished rows leave the batch: no more compute for them
                    index = torch.tensor(keep)  # on the CPU: it indexes tensors on any device (device maps)
                    cache.batch_select_indices(index)
                    mask, positions, seen = mask[index], positions[index], seen[index]
                    active, tokens = [active[b] for b in keep], [tokens[b] for b in keep]
                ids = torch.tensor(tokens, device=device).unsqueeze(-1)
                mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=-1)
                positions = positions[:, -1:] + 1
        out = []
        for r, text in enumerate(texts):
            text.flush()
            reason = text.stop or reasons[r] or "length"
            cached = reused if r == 0 else shared
            out.append(Generation(text.text, reason, len(rows[r]), len(generated[r]), cached, tuple(generated[r])))
        return out

    def shared_cache(self, head: list[int], n: int, room: int) -> tuple[Any, int]:
        """A cache holding ``head[:-1]`` (the rows' shared prefix) for ``n`` rows; the caller holds the lock.

        The prefix is prefilled once, after what the kept cache holds of it, and kept (batch 1) for later
        prompts. Used by :meth:`generate_batch` and by the server's continuous batching.

        Args:
            head: The shared prefix plus one token (the first row's next); only ``head[:-1]`` is prefilled.
            n: Rows in the batch.
            room: Tokens each row's cache has room for (prompt and output).

        Returns:
            The cache, and how many prefix tokens came from the kept cache.
        """
        import torch

        runner, prefix = self.runner, head[:-1]
        if not prefix:
            return runner.new_cache(room), 0
        cache, reused = runner.checkout(head, len(prefix)) if self.prefix_cache else (runner.new_cache(room), 0)
        if reused < len(prefix):
            positions = torch.arange(reused, len(prefix), device=runner.device).unsqueeze(0)
            runner.forward(torch.tensor([prefix[reused:]], device=runner.device), positions, cache)
        batch = copy.deepcopy(cache) if self.prefix_cache else cache
        if self.prefix_cache:
            runner.checkin(cache, prefix)
        reserve(batch, room)  # before repeating: the rows' buffers are then allocated once, at full size
        batch.batch_repeat_interleave(n)
        return batch, reused
