"""Continuous batching: the server's concurrent generations share every forward pass of the one model.

A :class:`BatchingEngine` wraps the server's engine. Each turn thread calls ``stream``/``generate`` as with any
engine; the call becomes a row of the batch that one batching thread runs step by step:

* Rows join between steps (continuous batching). The rows that join together have their longest common token
  prefix (the system text) prefilled once, after what the engine's kept prefix cache already holds; their
  differing suffixes are left-padded and prefilled together, and their cache is merged into the running one
  (left-padded to a common length, the padding masked out; rotary positions count per row).
* Every step feeds one token of every row; rows with different sampling settings share the forward pass and
  only pick their tokens apart (a seeded row alone, with its own generator).
* A row leaves when it stops or when its caller goes away (a closed stream: a cancelled request), so a
  client that disconnects stops costing compute after at most one step.

Only a :class:`~moss_agent.engines.batch_steps.StepBatchable` engine is batched, such as
:class:`~moss_agent.engines.transformers.TransformersEngine`: the loop drives its model runner and prefix cache
through that protocol's public members only. A :class:`~moss_agent.engines.remote.RemoteEngine` gets concurrent
calls side by side (its server batches them); any other engine runs one generation at a time behind a lock.
Under greedy decoding a batched row gives the tokens it gives alone (masked padding contributes nothing).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from moss_agent.engines.base import Delta, Generation, SamplingParams
from moss_agent.engines.batch_steps import StepBatchable
from moss_agent.engines.decoding import TextTracker, common_prefix, make_generator, next_tokens

__all__ = ["BatchingEngine"]

logger = logging.getLogger(__name__)

_TRIM = 64
"""Leading cache columns that every row masks out are cut off once there are at least this many."""


@dataclass(eq=False)
class _Row:
    """One generation in the batch."""

    ids: list[int]
    stop_ids: dict[int, str]
    params: SamplingParams
    text: TextTracker
    limit: int
    out: queue.SimpleQueue[Delta | BaseException] = field(default_factory=queue.SimpleQueue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    cached: int = 0
    position: int = 0  # the position of the token fed next
    pending: int = -1  # the token fed next
    generator: Any = None

    def key(self) -> tuple[Any, ...]:
        """Rows with equal keys pick their tokens together."""
        p = self.params
        if p.greedy:
            return ("greedy", p.repetition_penalty)
        if p.seed is not None:
            return ("seeded", id(self))
        return ("sample", p.temperature, p.top_p, p.top_k, p.repetition_penalty)


@dataclass
class BatchStats:
    """What the batching thread has done (for tests and the benchmark)."""

    steps: int = 0
    row_steps: int = 0
    peak_batch: int = 0
    prefills: int = 0

    @property
    def mean_batch(self) -> float:
        """Rows per forward step, on average."""
        return self.row_steps / self.steps if self.steps else 0.0


class BatchingEngine:
    """An engine whose concurrent calls run as one continuously batched generation.

    Args:
        engine: The engine to wrap (batched when it is :class:`~moss_agent.engines.batch_steps.StepBatchable`,
            as a TransformersEngine is; else one call at a time).
        max_batch: Most rows in one forward step; further calls wait for a row to leave.
    """

    def __init__(self, engine: Any, *, max_batch: int = 8) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.engine = engine
        self.max_batch = max_batch
        self._steps: StepBatchable | None = engine if isinstance(engine, StepBatchable) else None
        self.batched = self._steps is not None
        # A remote server (vLLM ...) batches concurrent requests itself: they go to it side by side.
        self.parallel = getattr(engine, "batches_concurrent_calls", False) is True
        self.stats = BatchStats()
        self._tokenizer = threading.RLock()  # a fast tokenizer must not be entered by two threads at once
        self._serial = threading.Lock()
        self._cond = threading.Condition()
        self._waiting: list[_Row] = []
        self._thread: threading.Thread | None = None
        self._closed = False

    # ------------------------------------------------------------------ the Engine protocol

    @property
    def model_name(self) -> str:
        """The wrapped engine's."""
        return str(self.engine.model_name)

    @property
    def context_window(self) -> int:
        """The wrapped engine's."""
        return int(self.engine.context_window)

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text``."""
        with self._tokenizer:
            return int(self.engine.count_tokens(text))

    def token_ids(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        with self._tokenizer:
            return list(self.engine.token_ids(text))

    def generate(self, prompt: str, params: SamplingParams) -> Generation:
        """Generate (as one row of the running batch)."""
        (last,) = collections.deque(self.stream(prompt, params), maxlen=1)
        assert last.generation is not None, "a stream ends with its Generation"
        return last.generation

    def generate_batch(self, prompts: Sequence[str], params: SamplingParams) -> list[Generation]:
        """Generate for several prompts; they join the batch together."""
        if self.parallel:
            return list(self.engine.generate_batch(prompts, params))
        if not self.batched:
            return [self.generate(p, params) for p in prompts]
        rows = [self._submit(p, params) for p in prompts]
        out = []
        for row in rows:
            *_, last = self._consume(row)
            assert last.generation is not None
            out.append(last.generation)
        return out

    def stream(self, prompt: str, params: SamplingParams) -> Iterator[Delta]:
        """Generate, yielding text deltas; closing the stream takes the row out of the batch."""
        if self.parallel:
            yield from self.engine.stream(prompt, params)
            return
        if not self.batched:
            with self._serial:
                yield from self.engine.stream(prompt, params)
            return
        yield from self._consume(self._submit(prompt, params))

    def close(self) -> None:
        """Stop the batching thread; waiting and running calls fail."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # ------------------------------------------------------------------ the callers' side

    @property
    def _model(self) -> StepBatchable:
        """The wrapped engine, as the batching thread drives it."""
        assert self._steps is not None, "only a StepBatchable engine is batched"
        return self._steps

    def _submit(self, prompt: str, params: SamplingParams) -> _Row:
        engine = self._model
        with self._tokenizer:
            ids, stop_ids = engine.prepare(prompt, params)  # raises for a prompt that does not fit

        def decode(tokens: list[int]) -> str:
            with self._tokenizer:
                return engine.decode(tokens)

        limit = min(params.max_new_tokens, self.context_window - len(ids))
        row = _Row(ids, stop_ids, params, TextTracker(decode, params.stop), limit)
        with self._cond:
            if self._closed:
                raise RuntimeError("the batching engine is closed")
            self._waiting.append(row)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="moss-batch", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return row

    def _consume(self, row: _Row) -> Iterator[Delta]:
        try:
            while True:
                try:
                    item = row.out.get(timeout=1.0)
                except queue.Empty:
                    if self._thread is None or not self._thread.is_alive():
                        raise RuntimeError("the batching thread stopped") from None
                    continue
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.generation is not None:
                    return
        finally:
            row.cancelled.set()  # a stream closed early leaves the batch at the next step

    # ------------------------------------------------------------------ the batching thread

    def _loop(self) -> None:
        import torch

        active: list[_Row] = []
        state: tuple[Any, Any, Any] | None = None  # cache, attention mask, seen-token matrix of the active rows
        while True:
            with self._cond:
                while not self._waiting and not active and not self._closed:
                    self._cond.wait()
                if self._closed:
                    for row in [*active, *self._waiting]:
                        row.out.put(RuntimeError("the server is shutting down"))
                    self._waiting.clear()
                    return
                room = self.max_batch - len(active)
                admit, self._waiting = self._waiting[:room], self._waiting[room:]
            admit = [r for r in admit if not r.cancelled.is_set()]
            try:
                with self._model.lock, torch.inference_mode():
                    if admit:
                        self.stats.prefills += 1
                        active, state = self._merge(active, state, *self._prefill(admit))
                    active, state = self._drop(active, state)
                    if active:
                        assert state is not None
                        active, state = self._step(active, state)
            except BaseException as err:  # every row of the batch gets the error; the thread lives on
                logger.error("a batched generation failed", exc_info=err)
                for row in {*active, *admit}:
                    row.out.put(err)
                active, state = [], None

    def _prefill(self, rows: list[_Row]) -> tuple[list[_Row], Any]:
        """Run the new rows' prompts (shared prefix once) and pick their first tokens."""
        import torch

        engine = self._model
        runner, n = engine.runner, len(rows)
        seqs = [r.ids for r in rows]
        shared = min(min(common_prefix(seqs[0], s) for s in seqs), min(len(s) for s in seqs) - 1)
        # The engine preallocates cache buffers: room for the longest row's prompt and output.
        room = shared + max(len(s) - shared + r.limit for s, r in zip(seqs, rows, strict=True))
        cache, reused = engine.shared_cache(seqs[0][: shared + 1], n, room)
        suffixes = [s[shared:] for s in seqs]
        width = max(len(s) for s in suffixes)
        device = runner.device
        ids = torch.tensor([[engine.pad_id] * (width - len(s)) + s for s in suffixes], device=device)
        tail = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in suffixes], device=device)
        mask = torch.cat([tail.new_ones(n, shared), tail], dim=-1)
        positions = shared + (tail.cumsum(-1) - 1).clamp(min=0)
        logits = runner.forward(ids, positions, cache, mask)
        seen = runner.seen(seqs)
        for i, row in enumerate(rows):
            row.position = len(row.ids)
            row.cached = reused if i == 0 else shared
            row.generator = make_generator(row.params, runner.output_device)
        self._accept(rows, self._pick(logits, seen, rows), seen)
        return rows, (cache, mask, seen)

    def _step(self, rows: list[_Row], state: tuple[Any, Any, Any]) -> tuple[list[_Row], Any]:
        """Feed every row its pending token and pick the next."""
        import torch

        cache, mask, seen = state
        runner = self._model.runner
        device = runner.device
        ids = torch.tensor([[r.pending] for r in rows], device=device)
        positions = torch.tensor([[r.position] for r in rows], device=device)
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=-1)
        logits = runner.forward(ids, positions, cache, mask)
        self.stats.steps += 1
        self.stats.row_steps += len(rows)
        self.stats.peak_batch = max(self.stats.peak_batch, len(rows))
        for row in rows:
            row.position += 1
        self._accept(rows, self._pick(logits, seen, rows), seen)
        return self._drop(rows, (cache, mask, seen))

    def _pick(self, logits: Any, seen: Any, rows: list[_Row]) -> list[int]:
        """Each row's next token; rows with equal sampling settings pick together."""
        import torch

        groups: dict[tuple[Any, ...], list[int]] = {}
        for b, row in enumerate(rows):
            groups.setdefault(row.key(), []).append(b)
        tokens = [0] * len(rows)
        limit = self._model.vocab_limit
        for members in groups.values():
            index = torch.tensor(members, device=logits.device)
            first = rows[members[0]]
            picked = next_tokens(logits[index], seen[index], first.params, first.generator, limit).tolist()
            for b, token in zip(members, picked, strict=True):
                tokens[b] = int(token)
        return tokens

    def _accept(self, rows: list[_Row], tokens: list[int], seen: Any) -> None:
        """Record each row's new token: finish the row, or send its text and keep the token to feed."""
        eos = self._model.eos_ids
        for b, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            row.generated.append(token)
            seen[b, token] = True
            if token in row.stop_ids or token in eos:
                self._finish(row, row.stop_ids.get(token, "eos"))
                continue
            row.text.push(token)
            if row.text.stop is not None or len(row.generated) >= row.limit:
                self._finish(row, "length")
                continue
            if piece := row.text.ready():
                row.out.put(Delta(piece))
            row.pending = token

    @staticmethod
    def _finish(row: _Row, reason: str) -> None:
        row.text.flush()
        generation = Generation(
            row.text.text,
            row.text.stop or reason,
            len(row.ids),
            len(row.generated),
            row.cached,
            tuple(row.generated),
        )
        row.pending = -1
        row.out.put(Delta(row.text.ready(final=True), generation))

    # ------------------------------------------------------------------ the batch cache

    def _drop(self, rows: list[_Row], state: Any) -> tuple[list[_Row], Any]:
        """Take finished and cancelled rows out of the batch; trim the padding every row masks."""
        import torch

        if state is None:
            return rows, None
        keep = [b for b, r in enumerate(rows) if r.pending >= 0 and not r.cancelled.is_set()]
        if not keep:
            return [], None
        cache, mask, seen = state
        if len(keep) < len(rows):
            index = torch.tensor(keep)  # on the CPU: it indexes tensors on any device
            cache.batch_select_indices(index)
            mask, seen = mask[index.to(mask.device)], seen[index.to(seen.device)]
            rows = [rows[b] for b in keep]
        used = mask.any(dim=0)
        first = int(used.int().argmax())
        if first >= _TRIM:
            _map_layers(cache, lambda t: t[..., first:, :].contiguous())
            mask = mask[:, first:]
        return rows, (cache, mask, seen)

    @staticmethod
    def _merge(active: list[_Row], state: Any, new: list[_Row], new_state: Any) -> tuple[list[_Row], Any]:
        """The running batch and newly prefilled rows as one batch (caches left-padded to one length)."""
        import torch

        if state is None:
            return new, new_state
        (cache, mask, seen), (new_cache, new_mask, new_seen) = state, new_state
        width = max(mask.shape[1], new_mask.shape[1])

        def pad(t: Any, length: int) -> Any:
            return torch.nn.functional.pad(t, (0, 0, width - length, 0)) if width > length else t

        old_len, new_len = mask.shape[1], new_mask.shape[1]
        new_layers = _layer_tensors(new_cache)
        merged = iter(
            torch.cat([pad(a, old_len), pad(b.to(a.device), new_len)], dim=0)
            for a, b in zip(_layer_tensors(cache), new_layers, strict=True)
        )
        _map_layers(cache, lambda _: next(merged))
        mask = torch.cat(
            [
                torch.nn.functional.pad(mask, (width - old_len, 0)),
                torch.nn.functional.pad(new_mask.to(mask.device), (width - new_len, 0)),
            ]
        )
        return [*active, *new], (cache, mask, torch.cat([seen, new_seen.to(seen.device)]))


def _layer_tensors(cache: Any) -> list[Any]:
    """Every key and value tensor of a DynamicCache, in order (transformers 5.x layers or 4.x lists)."""
    if hasattr(cache, "layers"):
        return [t for layer in cache.layers for t in (layer.keys, layer.values)]
    return [t for pair in zip(cache.key_cache, cache.value_cache, strict=True) for t in pair]


def _map_layers(cache: Any, change: Callable[[Any], Any]) -> None:
    """Replace every key and value tensor of a DynamicCache by ``change(tensor)``, in the order above."""
    if hasattr(cache, "layers"):
        for layer in cache.layers:
            layer.keys = change(layer.keys)
            layer.values = change(layer.values)
        return
    for i in range(len(cache.key_cache)):
        cache.key_cache[i] = change(cache.key_cache[i])
        cache.value_cache[i] = change(cache.value_cache[i])
