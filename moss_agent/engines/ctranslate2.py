"""MOSS on CTranslate2: conversion (``moss-agent convert --format ctranslate2``) and :class:`CTranslate2Engine`.

CTranslate2 runs CodeGen with its own C++ kernels: on a CPU it decodes faster than transformers and its int8
weights take a quarter of fp32's memory (a 16B MOSS in about 17 GB of RAM). The engine speaks the same
:class:`~moss_agent.engines.base.Engine` protocol as the transformers engine (end tokens, stop strings,
streaming, batches) and keeps the KV state of the meta instruction as CTranslate2's *static prompt*, so a
prompt that starts with it prefills only the rest.

Two differences from :class:`~moss_agent.engines.transformers.TransformersEngine`, both CTranslate2's:

- its repetition penalty covers the generated tokens only, not the prompt's (transformers' covers both), so
  with the release's mild 1.02 the two can pick different tokens where two scores are within 2 %;
- there is no prefix cache beyond the static prompt: every other prompt token is prefilled on every call;
- ``SamplingParams.seed`` is not honoured: CTranslate2 samples in its own worker threads, whose random
  generators a seed set from Python does not reach.

Imports ``ctranslate2`` (the ``ctranslate2`` extra) and transformers' tokenizer at call time only.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from moss_agent.engines.base import Delta, Generation, SamplingParams, fit_context, stop_token_ids
from moss_agent.engines.decoding import TextTracker
from moss_agent.settings import CONTEXT_WINDOW

__all__ = ["QUANTIZATIONS", "CTranslate2Engine", "convert_ctranslate2"]

QUANTIZATIONS = ("int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16", "float16", "bfloat16", "float32")
"""Weight types CTranslate2's converter writes (``--quantization``); int8 is the fast one on a CPU."""

MANIFEST = "moss_agent.json"
"""Written beside CTranslate2's files: the context window and the conversion settings."""

_LIVE: weakref.WeakSet[CTranslate2Engine] = weakref.WeakSet()


@atexit.register
def _release_generators() -> None:
    # A Generator that ran a Python callback from a thread other than the main one aborts the process when it is
    # destroyed during interpreter shutdown (ctranslate2 4.8.5, its own generate_tokens included); freed here,
    # before shutdown, it is destroyed cleanly.
    for engine in list(_LIVE):
        engine.close()


def _require_ctranslate2() -> Any:
    try:
        import ctranslate2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "CTranslate2 is not installed: pip install 'moss-agent[ctranslate2]' (a CPU wheel; CUDA wheels too)"
        ) from exc
    return ctranslate2


def convert_ctranslate2(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    quantization: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a MOSS checkpoint into a CTranslate2 model directory.

    The MOSS checkpoint is first written as a standard CodeGen checkpoint (``convert --format codegen``, into a
    temporary directory beside ``dst``), which CTranslate2's own ``TransformersConverter`` then converts. The
    converter loads the whole model into memory (about 32 GB for the 16B in fp16).

    Args:
        src: A MOSS checkpoint directory or hub id (fp16 / fp32; not GPTQ).
        dst: The directory to write.
        quantization: One of :data:`QUANTIZATIONS`; None keeps the source's weight type.
        overwrite: Replace ``dst`` if it exists.

    Returns:
        ``dst``.

    Raises:
        ConversionError: For a bad quantization, an existing ``dst`` or a source the CodeGen conversion refuses.
    """
    from moss_agent.checkpoints.convert import ConversionError, convert
    from moss_agent.checkpoints.files import TOKENIZER_FILES_WITH_FAST, resolve_checkpoint, write_json

    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ConversionError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    target = Path(dst).expanduser()
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise ConversionError(f"{target} exists and is not empty: choose another directory or pass overwrite=True")
    converters = _require_ctranslate2().converters
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}-", dir=target.parent) as tmp:
        codegen = Path(tmp) / "codegen"
        convert(src, codegen, format="codegen")
        config = json.loads((codegen / "config.json").read_text(encoding="utf-8"))
        out = Path(tmp) / "ct2"
        converters.TransformersConverter(str(codegen)).convert(str(out), quantization=quantization)
        # The source's own tokenizer files: the engine then tokenises exactly as the transformers engine does
        # on the source (the release's added-token rules included); the ids are the same.
        source = resolve_checkpoint(src, weights=False)
        for name in TOKENIZER_FILES_WITH_FAST:
            if (source / name).is_file():
                shutil.copy2(source / name, out / name)
        positions = config.get("n_positions", CONTEXT_WINDOW)
        manifest = {"source": str(src), "quantization": quantization, "n_positions": positions}
        write_json(out / MANIFEST, manifest)
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(out), target)
    return target


class CTranslate2Engine:
    """Generation with a CTranslate2 ``Generator`` over a converted MOSS (see :func:`convert_ctranslate2`).

    Stops as the transformers engine does: at the MOSS end tokens of ``params.stop_tokens`` (``stop_reason``
    is the token), at the end-of-sequence token otherwise (``"eos"``), at a stop string (the text is cut
    before it) and at ``max_new_tokens`` or the context window (``"length"``). Calls may run concurrently
    (CTranslate2 queues them; ``inter_threads`` of the generator run at once).

    Args:
        generator: A ``ctranslate2.Generator``.
        tokenizer: The MOSS tokenizer of the converted model (same ids as its ``vocabulary.json``).
        vocabulary: Token strings by id, as CTranslate2 reads its input.
        model_name: Name for response metadata.
        context_window: Prompt plus generated tokens (2048 for MOSS).
        static_prompt: Text whose KV state CTranslate2 keeps and reuses for every prompt that starts with it
            (by default MOSS's meta instruction); None for none.
    """

    def __init__(
        self,
        generator: Any,
        tokenizer: Any,
        vocabulary: Sequence[str],
        *,
        model_name: str = "moss-ctranslate2",
        context_window: int = CONTEXT_WINDOW,
        static_prompt: str | None = None,
    ) -> None:
        self._generator: Any = generator
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.context_window = context_window
        self._vocab = list(vocabulary)
        self._static = self.token_ids(static_prompt) if static_prompt else []
        eos = getattr(tokenizer, "eos_token_id", None)
        self._eos_ids = {eos} if eos is not None else set()
        self._stop_ids: dict[str, int] = {}
        _LIVE.add(self)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        device: str = "cpu",
        compute_type: str = "default",
        threads: int = 0,
        inter_threads: int = 1,
        model_name: str | None = None,
        static_prompt: str | bool | None = True,
    ) -> CTranslate2Engine:
        """Load a directory written by :func:`convert_ctranslate2`.

        Args:
            path: The converted model directory.
            device: ``cpu``, ``cuda`` or ``auto``.
            compute_type: CTranslate2's compute type (``default`` keeps the converted weight type, ``int8``
                quantises fp32 weights on load).
            threads: Intra-op threads per generation (0: CTranslate2's default).
            inter_threads: Generations that may run at once.
            model_name: Name for response metadata; by default the directory name.
            static_prompt: True for MOSS's meta instruction, a string for another, False or None for none.
        """
        from moss_agent.checkpoints.files import load_tokenizer
        from moss_agent.protocol.format import META_INSTRUCTION

        ct2 = _require_ctranslate2()
        folder = Path(path).expanduser()
        if not (folder / "model.bin").is_file():
            raise ValueError(
                f"{folder} is not a CTranslate2 model (no model.bin): convert one with "
                "'moss-agent convert SRC DST --format ctranslate2'"
            )
        manifest_file = folder / MANIFEST
        manifest = json.loads(manifest_file.read_text(encoding="utf-8")) if manifest_file.is_file() else {}
        vocabulary = json.loads((folder / "vocabulary.json").read_text(encoding="utf-8"))
        tokenizer, _ = load_tokenizer(folder)
        generator = ct2.Generator(
            str(folder), device=device, compute_type=compute_type, intra_threads=threads, inter_threads=inter_threads
        )
        prompt = META_INSTRUCTION if static_prompt is True else (static_prompt or None)
        return cls(
            generator,
            tokenizer,
            vocabulary,
            model_name=model_name or folder.name,
            context_window=int(manifest.get("n_positions", CONTEXT_WINDOW)),
            static_prompt=prompt,
        )

    def close(self) -> None:
        """Free the generator (the engine cannot generate afterwards)."""
        self._generator = None

    def token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` (no bos: MOSS prompts are encoded without one)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text``."""
        return len(self.token_ids(text))

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids``, end tokens included (no clean-up: deltas concatenate to the whole)."""
        return str(self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))

    # ------------------------------------------------------------ requests

    def _end_ids(self, params: SamplingParams) -> dict[int, str]:
        """Stop token id -> token for ``params`` (each must be one token)."""
        return stop_token_ids(params.stop_tokens, self.token_ids, self._stop_ids)

    def _options(self, params: SamplingParams, stops: dict[int, str], rows: list[list[int]]) -> dict[str, Any]:
        """``generate_batch`` keywords for ``params`` (the rows' ids already fitted to the context window)."""
        if self._generator is None:
            raise RuntimeError("this CTranslate2Engine is closed")
        n = len(self._static)
        static = n > 0 and all(len(r) > n and r[:n] == self._static for r in rows)
        options: dict[str, Any] = {
            "max_length": min(params.max_new_tokens, self.context_window - max(map(len, rows))),
            "repetition_penalty": params.repetition_penalty,
            "end_token": sorted(set(stops) | self._eos_ids),
            "return_end_token": True,
            "include_prompt_in_result": False,
            "static_prompt": [self._vocab[i] for i in self._static] if static else None,
        }
        if not params.greedy:
            options |= {
                "sampling_topk": max(params.top_k, 0),
                "sampling_topp": params.top_p,
                "sampling_temperature": params.temperature,
            }
        options["start_tokens"] = [[self._vocab[i] for i in (r[n:] if static else r)] for r in rows]
        return options

    def _result(self, ids: list[int], tokens: list[int], text: TextTracker, stops: dict[int, str]) -> Generation:
        """The Generation of one row: ``tokens`` as generated (an end token last, unpushed, when one ended it)."""
        text.flush()
        reason = "length"
        if tokens and text.stop is None and (tokens[-1] in stops or tokens[-1] in self._eos_ids):
            reason = stops.get(tokens[-1], "eos")
        return Generation(text.text, text.stop or reason, len(ids), len(tokens), 0, tuple(tokens))

    def _push(self, text: TextTracker, token: int, stops: dict[int, str]) -> bool:
        """Add a generated token to ``text``; True when generation should stop (an end token or stop string)."""
        if token in stops or token in self._eos_ids:
            return True
        text.push(token)
        return text.stop is not None

    def generate(self, prompt: str, params: SamplingParams) -> Generation:
        """Generate a continuation of ``prompt`` (see the class for what stops it).

        Raises:
            ContextWindowExceededError: When prompt plus ``max_new_tokens`` exceed the context window and
                ``params.truncate`` is ``"error"``.
            ValueError: For a stop token that is not one token, an empty prompt, or ``max_new_tokens`` < 1.
        """
        return self.generate_batch([prompt], params)[0]

    def generate_batch(self, prompts: Sequence[str], params: SamplingParams) -> list[Generation]:
        """Generate continuations of several prompts in CTranslate2 batches; under greedy, equal to one by one.

        With a repetition penalty, only prompts of equal length share a batch: CTranslate2 feeds the tail of a
        longer prompt through its decoding loop, where the penalty would count it as generated.
        """
        stops = self._end_ids(params)
        rows = [fit_context(self.token_ids(p), params, self.context_window) for p in prompts]
        groups: dict[int, list[int]] = {}
        for i, ids in enumerate(rows):
            groups.setdefault(len(ids) if params.repetition_penalty != 1.0 else 0, []).append(i)
        out: dict[int, Generation] = {}
        for members in groups.values():
            out |= zip(members, self._batch([rows[i] for i in members], params, stops), strict=True)
        return [out[i] for i in range(len(rows))]

    def _batch(self, rows: list[list[int]], params: SamplingParams, stops: dict[int, str]) -> list[Generation]:
        texts = [TextTracker(self.decode, params.stop) for _ in rows]
        done = [False] * len(rows)

        def step(result: Any) -> bool:
            b = result.batch_id
            if not done[b]:
                done[b] = self._push(texts[b], result.token_id, stops)
            return done[b]

        options = self._options(params, stops, rows)
        results = self._generator.generate_batch(options.pop("start_tokens"), callback=step, **options)
        return [
            self._result(ids, list(r.sequences_ids[0]), text, stops)
            for ids, r, text in zip(rows, results, texts, strict=True)
        ]

    def stream(self, prompt: str, params: SamplingParams) -> Iterator[Delta]:
        """Generate, yielding text deltas; the last delta carries the :class:`Generation`.

        CTranslate2 decodes in a worker thread and hands each token over; closing the iterator early stops it.
        """
        stops = self._end_ids(params)
        ids = fit_context(self.token_ids(prompt), params, self.context_window)
        options = self._options(params, stops, [ids])
        start = options.pop("start_tokens")
        tokens: queue.Queue[int | BaseException | None] = queue.Queue()
        halt = threading.Event()

        def step(result: Any) -> bool:
            tokens.put(result.token_id)
            return halt.is_set()

        def work() -> None:
            try:
                self._generator.generate_batch(start, callback=step, **options)
            except BaseException as exc:  # handed to the consumer
                tokens.put(exc)
            finally:
                tokens.put(None)

        worker = threading.Thread(target=work, name="ctranslate2-stream", daemon=True)
        worker.start()
        return self._deltas(ids, tokens, halt, worker, TextTracker(self.decode, params.stop), stops)

    def _deltas(
        self,
        ids: list[int],
        tokens: queue.Queue[int | BaseException | None],
        halt: threading.Event,
        worker: threading.Thread,
        text: TextTracker,
        stops: dict[int, str],
    ) -> Iterator[Delta]:
        generated: list[int] = []
        try:
            while (item := tokens.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                generated.append(item)
                if self._push(text, item, stops):
                    break  # tokens the worker made before it saw the halt are dropped
                if piece := text.ready():
                    yield Delta(piece)
        finally:
            halt.set()
            _drain(tokens, worker.join)
        generation = self._result(ids, generated, text, stops)
        yield Delta(text.ready(final=True), generation)


def _drain(tokens: queue.Queue[Any], join: Callable[[], None]) -> None:
    """Let the worker finish (it stops at its next token once halted) and empty the queue."""
    join()
    while not tokens.empty():
        tokens.get_nowait()
