"""Tiny seeded MOSS checkpoints in the real released layout, built locally in seconds.

A directory from :func:`tiny_moss_checkpoint` looks like ``fnlp/moss-moon-003-sft`` on the hub, only small:
``config.json`` (``model_type: "moss"``, ``MossForCausalLM``, ``auto_map``, the released keys), sharded
``pytorch_model-0000N-of-0000M.bin`` files with ``pytorch_model.bin.index.json`` under the MOSS/CodeGen
parameter names (the non-learned ``attn.causal_mask`` buffers included, untied ``lm_head`` with a bias), and
the MOSS tokenizer files (``vocab.json``, ``merges.txt``, ``added_tokens.json``, ``special_tokens_map.json``,
``tokenizer_config.json`` naming ``MossTokenizer``).

The tokenizer is a byte-level BPE of about a thousand tokens, trained here with the ``tokenizers`` library on
a fixed seeded corpus of MOSS-format text; ``<|endoftext|>`` is the last entry of ``vocab.json`` (bos, as in
the release) and the 43 added tokens follow it as in the release's ``added_tokens.json``: CodeGen's 38
whitespace runs (31 down to 2 spaces, 9 down to 2 tabs), then the end tokens ``<eoh> <eot> <eoc> <eor> <eom>``
(``<eom>`` is eos).
Weights are random and seeded: the same arguments give bit-identical tensors.

Built checkpoints are cached under ``$MOSS_AGENT_CACHE`` (default ``~/.cache/moss-agent``), keyed by the
arguments and :data:`CHECKPOINT_VERSION`, written to a temporary directory and renamed into place so that
parallel test processes never see half a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from moss_agent.checkpoints.files import (
    ENDOFTEXT,
    WHITESPACE_RUNS,
    WeightsFormat,
    moss_config,
    write_json,
    write_moss_tokenizer,
    write_weights,
)
from moss_agent.protocol import format as fmt
from moss_agent.settings import CONTEXT_WINDOW, cache_dir

__all__ = [
    "CHECKPOINT_VERSION",
    "ENDOFTEXT",
    "MOSS_ADDED_TOKENS",
    "cache_dir",
    "tiny_gptq_checkpoint",
    "tiny_moss_checkpoint",
    "tiny_moss_tokenizer_dir",
]

CHECKPOINT_VERSION = "5"
"""Bumped whenever the layout or the corpus changes, so that stale cached checkpoints are not reused."""

MOSS_ADDED_TOKENS: tuple[str, ...] = (*WHITESPACE_RUNS, *fmt.END_TOKENS)
"""The added tokens of the MOSS tokenizer, in id order after ``<|endoftext|>``: the release's structure."""

N_POSITIONS = CONTEXT_WINDOW
GROUPSIZE = 128


# ---------------------------------------------------------------- the corpus and the tokenizer

_EN = [
    "What is the capital of France?",
    "The capital of France is Paris.",
    "Please write a short poem about the sea.",
    "Sure, here is a short poem about the sea.",
    "How do I sort a list in Python?",
    "You can use the sorted() function or list.sort().",
    "Tell me a joke about cats.",
    "Why did the cat sit on the computer? To keep an eye on the mouse!",
    "What is the weather like today?",
    "I am sorry, I cannot access real-time information.",
    "Explain the theory of relativity in simple terms.",
    "Thank you for your help!",
    "You're welcome. Is there anything else I can help you with?",
    "Draw a picture of a red bird on a tree.",
    "Here is the picture you asked for.",
]
_ZH = [
    "你好，请问你是谁？",
    "我是MOSS，一个由复旦大学开发的人工智能助手。",
    "今天天气怎么样？",
    "请帮我计算一下这个数学题。",
    "中国的首都是北京。",
    "谢谢你的帮助！",
    "请介绍一下长城的历史。",
    "好的，下面是一首关于春天的诗。",
]
_WORDS = "the of and to in is that for it as with was on be by this are or from an at which model answer".split()


def _sentence(rng: random.Random) -> str:
    pick = rng.random()
    if pick < 0.45:
        return rng.choice(_EN)
    if pick < 0.7:
        return rng.choice(_ZH)
    if pick < 0.85:
        a, b = rng.randint(0, 9999), rng.randint(1, 999)
        return f"{a} {rng.choice('+-*/')} {b} = {rng.random() * 1000:.4f}"
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."


def _turn(rng: random.Random, plugins_on: bool) -> fmt.MossTurn:
    human = _sentence(rng)
    if not plugins_on or rng.random() < 0.4:
        results = "\nNone\n" if plugins_on else " None"
        return fmt.MossTurn(human, _sentence(rng), results=results)
    a, b = rng.randint(1, 999), rng.randint(1, 999)
    kind = rng.randrange(3)
    if kind == 0:
        cmd = fmt.Command("Calculate", f"{a}*{b}")
        entry = f"{cmd} => '{a * b}'\n"
    elif kind == 1:
        cmd = fmt.Command("Solve", f"x^2 - {a * a} = 0")
        entry = f"{cmd} =>\nx = [-{a}, {a}]\n"
    else:
        cmd = fmt.Command("Search", human[:30])
        entry = f"{cmd} =>\n<|1|>: '{_sentence(rng)}'\n<|2|>: '{_sentence(rng)}'\n"
    return fmt.MossTurn(
        human,
        f"{_sentence(rng)}<sup><|1|></sup>",
        inner_thoughts=f"The user asks: {human[:20]}. I should use {cmd.name}.",
        commands=fmt.commands_text([cmd]),
        results=fmt.results_body([entry]),
    )


def _corpus(n: int = 300, seed: int = 0) -> Iterator[str]:
    """MOSS-format conversations (meta instruction, switches, role tags, English, Chinese, digits)."""
    rng = random.Random(seed)
    for _ in range(n):
        plugins_on = rng.random() < 0.5
        enabled = rng.sample(["Search", "Calculate", "Solve", "Text2Image"], rng.randint(1, 3)) if plugins_on else []
        turns = [_turn(rng, plugins_on) for _ in range(rng.randint(1, 3))]
        yield fmt.MossConversation(fmt.system_prompt(enabled), turns).to_text()


def _write_tokenizer(out: Path, bpe_vocab: int) -> None:
    """Train the byte-level BPE and write the five MOSS tokenizer files into ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    write_moss_tokenizer(out, model["vocab"], merges, MOSS_ADDED_TOKENS, name="moss-agent/tiny-moss")


# ---------------------------------------------------------------- weights


def _state_dict(seed: int, n_layer: int, n_embd: int, vocab: int, dtype: str, wbits: int | None) -> dict[str, Any]:
    """Random seeded parameters under the MOSS names; GPTQ-for-LLaMa Linears when ``wbits``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    tdtype = getattr(torch, dtype)
    inner = 4 * n_embd

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(tdtype)

    def norm(prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": (1 + normal(n_embd)).to(tdtype), f"{prefix}.bias": normal(n_embd)}

    def linear(prefix: str, n_in: int, n_out: int, bias: bool) -> dict[str, torch.Tensor]:
        weight, b = normal(n_out, n_in), normal(n_out) if bias else None
        if not wbits:
            return {f"{prefix}.weight": weight} | ({} if b is None else {f"{prefix}.bias": b})
        from moss_agent.checkpoints.gptq import quantize  # packed as QuantLinear.pack does; fp16 bias

        return quantize(weight, b, wbits, GROUPSIZE).tensors(f"{prefix}.")

    mask = torch.tril(torch.ones(N_POSITIONS, N_POSITIONS, dtype=torch.bool)).view(1, 1, N_POSITIONS, N_POSITIONS)
    sd: dict[str, torch.Tensor] = {"transformer.wte.weight": normal(vocab, n_embd)}
    for i in range(n_layer):
        p = f"transformer.h.{i}"
        sd.update(norm(f"{p}.ln_1"))
        sd[f"{p}.attn.causal_mask"] = mask.clone()
        sd.update(linear(f"{p}.attn.qkv_proj", n_embd, 3 * n_embd, bias=False))
        sd.update(linear(f"{p}.attn.out_proj", n_embd, n_embd, bias=False))
        sd.update(linear(f"{p}.mlp.fc_in", n_embd, inner, bias=True))
        sd.update(linear(f"{p}.mlp.fc_out", inner, n_embd, bias=True))
    sd.update(norm("transformer.ln_f"))
    sd["lm_head.weight"] = normal(vocab, n_embd)
    sd["lm_head.bias"] = normal(vocab)
    return sd


def _cached(key: dict[str, Any], build: Callable[[Path], None], path: str | Path | None) -> Path:
    """Build into ``path``, or into the cache under a key of the arguments; atomic either way."""
    if path is not None:
        target = Path(path)
    else:
        digest = hashlib.sha256(json.dumps({**key, "v": CHECKPOINT_VERSION}, sort_keys=True).encode()).hexdigest()
        target = cache_dir() / "tiny" / f"{key['kind']}-{digest[:16]}"
        if target.exists():  # renamed into place only when complete
            return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        if path is not None and target.exists():
            for child in tmp.iterdir():  # an explicit, existing directory: move the files in
                os.replace(child, target / child.name)
        else:
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.exists():  # another process won the race otherwise
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------- public builders


def tiny_moss_tokenizer_dir(path: str | Path | None = None, *, bpe_vocab: int = 1000) -> Path:
    """A directory with only the MOSS tokenizer files (for token counting without weights).

    Args:
        path: Where to write; a cached directory when None.
        bpe_vocab: Size of the trained byte-level BPE, before ``<|endoftext|>`` and the added tokens.

    Returns:
        The directory.
    """
    return _cached({"kind": "tokenizer", "bpe_vocab": bpe_vocab}, lambda d: _write_tokenizer(d, bpe_vocab), path)


def tiny_moss_checkpoint(
    path: str | Path | None = None,
    *,
    seed: int = 0,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    rotary_dim: int = 16,
    vocab_size: int | None = None,
    shards: int = 2,
    dtype: str = "float16",
    quantized: int | None = None,
    weights_format: WeightsFormat = "bin",
    config_wbits: int | None = None,
) -> Path:
    """A tiny random MOSS checkpoint directory in the released layout.

    Args:
        path: Where to write; a cached directory keyed by the arguments when None.
        seed: Seed of the random weights (the tokenizer is the same for every seed).
        n_layer: Transformer blocks.
        n_embd: Hidden size.
        n_head: Attention heads (``n_embd`` must divide by ``n_head`` and, for CodeGen's fused qkv, by 4).
        rotary_dim: Rotary dimensions per head.
        vocab_size: Rows of the embedding; by default the tokenizer's length padded to a multiple of 64
            (the release pads its tokenizer to 107008 rows).
        shards: Number of weight files; above 1 an index file maps parameters to files.
        dtype: ``float16`` as released, or ``float32`` / ``bfloat16``.
        quantized: 4 or 8 for a GPTQ-for-LLaMa checkpoint as the ``-int4`` / ``-int8`` releases (``wbits`` and
            ``groupsize`` in config; ``qweight``/``qzeros``/``scales``/``g_idx`` per Linear but lm_head).
        weights_format: ``bin`` (``pytorch_model-*.bin``, as released) or ``safetensors`` (``model-*``).
        config_wbits: The ``wbits`` written to config, if it should differ from ``quantized`` (the
            plugin-int8 release says 4).

    Returns:
        The checkpoint directory.

    Raises:
        ValueError: For inconsistent sizes.
    """
    if n_embd % n_head or n_embd % 4 or rotary_dim > n_embd // n_head:
        raise ValueError(f"n_embd={n_embd} must divide by n_head={n_head} and 4, rotary_dim <= head size")
    if quantized not in (None, 4, 8) or shards < 1:
        raise ValueError(f"quantized must be None, 4 or 8 (got {quantized}); shards >= 1 (got {shards})")
    key = {
        "kind": "moss",
        "seed": seed,
        "n_layer": n_layer,
        "n_embd": n_embd,
        "n_head": n_head,
        "rotary_dim": rotary_dim,
        "vocab_size": vocab_size,
        "shards": shards,
        "dtype": dtype,
        "quantized": quantized,
        "weights_format": weights_format,
        "config_wbits": config_wbits,
    }

    def build(out: Path) -> None:
        _write_tokenizer(out, 1000)
        vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
        added = json.loads((out / "added_tokens.json").read_text(encoding="utf-8"))
        n_tokens = len(vocab) + len(added)
        rows = vocab_size if vocab_size is not None else -(-n_tokens // 64) * 64
        if rows < n_tokens:
            raise ValueError(f"vocab_size={rows} is smaller than the tokenizer ({n_tokens} tokens)")
        config = moss_config(n_layer, n_embd, n_head, rotary_dim, rows, dtype, config_wbits or quantized)
        config["bos_token_id"] = vocab[ENDOFTEXT]
        config["eos_token_id"] = added[fmt.EOM]
        write_json(out / "config.json", config)
        write_weights(out, _state_dict(seed, n_layer, n_embd, rows, dtype, quantized), shards, weights_format)

    return _cached(key, build, path)


def tiny_gptq_checkpoint(wbits: int = 4, *, config_wbits: int | None = None, **kwargs: Any) -> Path:
    """A tiny GPTQ-quantised MOSS checkpoint (as ``moss-moon-003-sft-int4`` / ``-int8``), for detection tests.

    Args:
        wbits: Bits of the packed ``qweight`` tensors, 4 or 8.
        config_wbits: ``wbits`` written to config when it should lie (the plugin-int8 release says 4).
        **kwargs: Passed to :func:`tiny_moss_checkpoint`.
    """
    return tiny_moss_checkpoint(quantized=wbits, config_wbits=config_wbits, **kwargs)
