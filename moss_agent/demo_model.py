"""A small demonstration MOSS model that really uses plugins, trained here on CPU in a few minutes.

:func:`demo_checkpoint` trains a tiny CodeGen (the MOSS architecture: 2 layers, 128 wide) on the synthetic
dialogues of :mod:`moss_agent.demo_data` and writes it in the released MOSS checkpoint layout (``config.json``
with ``model_type: "moss"``, sharded ``pytorch_model-*.bin`` with an index, the MOSS tokenizer files), so that it
loads like ``fnlp/moss-moon-003-sft-plugin``. It writes ``Calculate``, ``Solve`` and ``Search`` commands for
questions it has not seen, which lets ``make demo`` run a real plugin conversation offline. It knows nothing
else: point the library at a real MOSS checkpoint for real answers.

The tokenizer is a byte-level BPE of 800 tokens that only merges letters (digits, punctuation and spaces stay
single tokens, so numbers and names copy token by token) with the end tokens and role tags as added tokens.
Training is seeded and single-process: the same seed gives bit-identical weights.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moss_agent import demo_data
from moss_agent import format as fmt
from moss_agent.testing import checkpoints as _ckpt

__all__ = [
    "DEMO_STEPS",
    "DEMO_VERSION",
    "DemoReport",
    "demo_checkpoint",
    "evaluate_demo_model",
]

DEMO_VERSION = "1"
"""Part of the cache key: bump it whenever the data, the tokenizer or the training changes."""
DEMO_STEPS = 3700
"""Optimizer steps of the default training run (about 2.5 minutes on two cores)."""

BPE_VOCAB = 800
BATCH = 8
LR = 4e-3
WARMUP = 100
WINDOW_SHARE = 0.87
POOL = 4
PRIMED_HEADS = {0: 1, 1: 2, 2: 0}
INDUCTION_HEADS = (0, 1)
INDUCTION_SCALES = (0.5, 5.0, 1.0)
SIZES = {"n_layer": 2, "n_embd": 128, "n_head": 4, "rotary_dim": 16}
_ROLE_TOKENS = fmt.ROLE_TAGS
# Training units: a space with a lowercase word, a capitalised word or a lone character. Merges never join a
# space to a capital, a digit or punctuation, so GPT-2's pre-tokenizer (used when the files are loaded) gives the
# same tokens, and a name or a number is the same tokens after a space as after a quote: it copies token by token.
_UNITS = r" [a-z]+|[A-Z]+[a-z]*|[a-z]+|[0-9]+|[\s\S]"

Progress = Callable[[int, int, float], None]
"""Called as ``progress(step, steps, loss)`` during training."""


# ---------------------------------------------------------------- tokenizer


def _write_tokenizer(out: Path, seed: int) -> None:
    """Train the letters-only byte-level BPE on training dialogues and write the MOSS tokenizer files."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_UNITS), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    specials = re.compile("|".join(re.escape(t) for t in (*fmt.END_TOKENS, *_ROLE_TOKENS)))
    texts = (specials.sub(" ", d.conversation.to_text()) for d in demo_data.dialogues(3000, seed=seed))
    tok.train_from_iterator(texts, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = dict(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    vocab[_ckpt.ENDOFTEXT] = len(vocab)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    added = {t: len(vocab) + i for i, t in enumerate((*_ckpt.MOSS_ADDED_TOKENS, *_ROLE_TOKENS))}

    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (out / "added_tokens.json").write_text(json.dumps(added, indent=2), encoding="utf-8")
    special = {"bos_token": _ckpt.ENDOFTEXT, "eos_token": fmt.EOM, "unk_token": _ckpt.ENDOFTEXT}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "auto_map": {"AutoTokenizer": ["tokenization_moss.MossTokenizer", None]},
        "bos_token": _ckpt._added_token(_ckpt.ENDOFTEXT),
        "eos_token": _ckpt._added_token(fmt.EOM),
        "unk_token": _ckpt._added_token(_ckpt.ENDOFTEXT),
        "errors": "replace",
        "model_max_length": _ckpt.N_POSITIONS,
        "name_or_path": "moss-agent/moss-demo",
        "special_tokens_map_file": None,
        "tokenizer_class": "MossTokenizer",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def _load_tokenizer(path: Path) -> Any:
    from moss_agent.loading import load_tokenizer

    return load_tokenizer(path)[0]


# ---------------------------------------------------------------- training


def _rotary(positions: Any, rot: int) -> tuple[Any, Any]:
    import torch

    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2, dtype=torch.int64) / rot))
    angles = positions.float()[:, None] * inv
    return torch.sin(angles).repeat_interleave(2, -1)[:, None], torch.cos(angles).repeat_interleave(2, -1)[:, None]


def _rope(x: Any, sin: Any, cos: Any) -> Any:
    import torch

    turned = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
    return x * cos + turned * sin


def _forward(model: Any, ids: Any, prefix: list[tuple[Any, Any]] | None = None) -> tuple[Any, list[tuple[Any, Any]]]:
    """CodeGen's forward pass (hidden states before ``lm_head``) continuing a batch-1 ``prefix`` of keys/values.

    transformers' CodeGen computes the same (checked by the tests); this version shares one prefix across the
    batch, so the long system text costs one forward pass per batch, without gradient.
    """
    import torch
    import torch.nn.functional as F

    cfg, tr = model.config, model.transformer
    batch, length = ids.shape
    heads, dim, rot = cfg.n_head, cfg.n_embd // cfg.n_head, cfg.rotary_dim
    past = 0 if prefix is None else prefix[0][0].shape[2]
    sin, cos = _rotary(torch.arange(past, past + length), rot)
    mask = torch.ones(length, past + length, dtype=torch.bool).tril(past) if past else None
    x = tr.wte(ids)
    kv = []
    for i, block in enumerate(tr.h):
        h = block.ln_1(x)
        # The fused projection holds 4 groups of [q | v | k] (CodeGen's mp_num), one head per group here.
        q, v, k = block.attn.qkv_proj(h).view(batch, length, 4, -1).split(cfg.n_embd // 4, dim=-1)
        q, k, v = (t.reshape(batch, length, heads, dim) for t in (q, k, v))
        q = torch.cat([_rope(q[..., :rot], sin, cos), q[..., rot:]], -1).transpose(1, 2)
        k = torch.cat([_rope(k[..., :rot], sin, cos), k[..., rot:]], -1).transpose(1, 2)
        v = v.transpose(1, 2)
        kv.append((k, v))
        if prefix is not None:
            k = torch.cat([prefix[i][0].expand(batch, -1, -1, -1), k], 2)
            v = torch.cat([prefix[i][1].expand(batch, -1, -1, -1), v], 2)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        x = x + block.attn.out_proj(a.transpose(1, 2).reshape(batch, length, -1)) + block.mlp(h)
    return tr.ln_f(x), kv


def _prime_previous_token_heads(model: Any, scale: float = 8.0) -> None:
    """Start heads of layer 0 as previous-token heads, so that copying (an induction circuit) is learnt fast.

    One hidden dimension of ``ln_1`` becomes a constant 1; from it, the rotary halves of a head's query and key
    get fixed vectors whose dot product, after rotation, peaks at a distance of one token (head 0) or two
    (head 1). Training is free to change all of it.
    """
    import torch

    cfg, block = model.config, model.transformer.h[0]
    dim = cfg.n_embd // cfg.n_head  # one head per fused [q | v | k] group here (n_head == 4 == CodeGen's mp_num)
    inv = 1.0 / (10000 ** (torch.arange(0, cfg.rotary_dim, 2, dtype=torch.int64) / cfg.rotary_dim))
    with torch.no_grad():
        block.ln_1.weight[-1], block.ln_1.bias[-1] = 0.0, 1.0
        weight = block.attn.qkv_proj.weight
        for head, distance in PRIMED_HEADS.items():
            q, k = 3 * dim * head, 3 * dim * head + 2 * dim
            for i, theta in enumerate(inv[:3].tolist()):
                angle = distance * theta
                weight[q + 2 * i, -1], weight[q + 2 * i + 1, -1] = scale * math.cos(angle), -scale * math.sin(angle)
                weight[k + 2 * i, -1], weight[k + 2 * i + 1, -1] = scale, 0.0


def _prime_induction_heads(model: Any) -> None:
    """Wire an induction circuit into the primed heads, for fast learning of copying.

    Layer-0 heads 0 (previous token) and 2 (current token) write the same projection ``P`` of their token into
    two separate subspaces ``U`` and ``V``. Layer-1 heads in ``INDUCTION_HEADS`` compare the current token
    (read from ``V``) with the previous token stored at each earlier position (read from ``U``): they attend to
    the token that followed an earlier occurrence of the current one, which is what copying a name or a number
    needs. Training is free to change all of it.
    """
    import torch

    cfg = model.config
    n, dim, rot = cfg.n_embd, cfg.n_embd // cfg.n_head, cfg.rotary_dim
    beta, gamma, _ = INDUCTION_SCALES
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(n - 1, 2 * dim, generator=gen))[0]  # the constant last dim left out
    u, v = (torch.cat([b, torch.zeros(1, dim)]) for b in basis.split(dim, dim=1))  # n x dim each, orthogonal
    p = torch.randn(dim, n, generator=gen) / math.sqrt(n)
    p[:, -1] = 0.0  # the constant dimension of layer 0 carries no token
    layer0, layer1 = model.transformer.h
    with torch.no_grad():
        for head, space in ((0, u), (2, v)):
            layer0.attn.qkv_proj.weight[3 * dim * head + dim : 3 * dim * head + 2 * dim] = p  # values
            layer0.attn.out_proj.weight[:, head * dim : (head + 1) * dim] = beta * space
        w = layer1.attn.qkv_proj.weight
        for head in INDUCTION_HEADS:
            s = torch.randn(dim - rot, dim, generator=gen) / math.sqrt(dim)
            q, k = 3 * dim * head, 3 * dim * head + 2 * dim
            w[q : q + rot], w[k : k + rot] = 0.0, 0.0  # no preference for positions: a pure content match
            w[q + rot : q + dim] = gamma * s @ v.T
            w[k + rot : k + dim] = gamma * s @ u.T


def _labelled(tokenizer: Any, conv: fmt.MossConversation, start: int, end: int) -> tuple[list[int], list[int]]:
    """Token ids of ``text[start:end]`` and labels: the id where the model generates it, -100 elsewhere."""
    enc = tokenizer(conv.to_text()[start:end], return_offsets_mapping=True)
    spans = [(a - start, b - start) for a, b in demo_data.trained_spans(conv) if start <= a and b <= end]
    ids = enc["input_ids"]
    return ids, [
        t if any(s <= a and b <= e for s, e in spans) else -100
        for t, (a, b) in zip(ids, enc["offset_mapping"], strict=True)
    ]


def _batches(tokenizer: Any, seed: int, steps: int) -> Iterator[tuple[Any | None, Any, Any]]:
    """``steps`` batches of (prefix ids or None, ids, labels), right-padded.

    The first ``WINDOW_SHARE`` of them are short training windows without prefix, sorted by length in groups of
    ``POOL`` batches so that little is padding: they are cheap, and copying is learnt there. The others are whole
    turns after the whole system text (shared by the batch, the prefix), as every real prompt has it.
    """
    import torch

    dialogues = demo_data.dialogue_batches(BATCH, seed=seed)
    rng = random.Random(f"moss-demo-windows-{seed}")
    pad = tokenizer.eos_token_id  # causal attention never looks ahead at right padding

    def tensors(rows: list[tuple[list[int], list[int]]]) -> tuple[Any, Any]:
        width = max(len(ids) for ids, _ in rows)
        ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
        return ids, torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in rows])

    windowed = round(WINDOW_SHARE * steps)
    for _ in range(0, windowed, POOL):
        convs = [d.conversation for _ in range(POOL) for d in next(dialogues)]
        rows = sorted(
            (_labelled(tokenizer, c, *rng.choice(demo_data.training_windows(c))) for c in convs),
            key=lambda r: len(r[0]),
        )
        for k in range(0, len(rows), BATCH):
            yield (None, *tensors(rows[k : k + BATCH]))
    for _ in range(steps - windowed - (-windowed % POOL)):
        convs = [d.conversation for d in next(dialogues)]
        rows = [_labelled(tokenizer, c, len(c.system), len(c.to_text())) for c in convs]
        yield (torch.tensor([tokenizer(convs[0].system)["input_ids"]]), *tensors(rows))


def _train(tokenizer: Any, seed: int, steps: int, progress: Progress | None) -> Any:
    import torch
    from transformers import CodeGenConfig, CodeGenForCausalLM

    config = CodeGenConfig(
        vocab_size=-(-len(tokenizer) // 64) * 64,
        n_positions=_ckpt.N_POSITIONS,
        n_ctx=_ckpt.N_POSITIONS,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        n_layer=SIZES["n_layer"],
        n_embd=SIZES["n_embd"],
        n_head=SIZES["n_head"],
        rotary_dim=SIZES["rotary_dim"],
    )
    torch.manual_seed(seed)
    model = CodeGenForCausalLM(config)
    _prime_previous_token_heads(model)
    if INDUCTION_HEADS:
        _prime_induction_heads(model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.98), weight_decay=0.01)

    def schedule(step: int) -> float:
        if step < WARMUP:
            return (step + 1) / WARMUP
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / max(1, steps - WARMUP)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    for step, (prefix_ids, ids, labels) in enumerate(_batches(tokenizer, seed, steps)):
        prefix = None
        if prefix_ids is not None:
            with torch.no_grad():
                _, prefix = _forward(model, prefix_ids)
        hidden, _ = _forward(model, ids, prefix)
        target = labels[:, 1:]
        keep = target != -100  # the head only where there is a loss
        logits = model.lm_head(hidden[:, :-1][keep])
        loss = torch.nn.functional.cross_entropy(logits, target[keep])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if progress is not None:
            progress(step + 1, steps, loss.item())
    return model.eval()


def _state_dict(model: Any) -> dict[str, Any]:
    """The model's parameters under the MOSS names, with the ``causal_mask`` buffers the release carries."""
    import torch

    n = _ckpt.N_POSITIONS
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    mask = torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n)
    for i in range(model.config.n_layer):
        sd[f"transformer.h.{i}.attn.causal_mask"] = mask.clone()
    return sd


def _build(out: Path, seed: int, steps: int, progress: Progress | None) -> None:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _write_tokenizer(out, seed)
        tokenizer = _load_tokenizer(out)
        model = _train(tokenizer, seed, steps, progress)
    finally:
        torch.set_num_threads(threads)
    cfg = model.config
    config = _ckpt._config(cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.rotary_dim, cfg.vocab_size, "float32", None)
    config.update(
        _name_or_path="moss-agent/moss-demo", bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    _ckpt._write_weights(out, _state_dict(model), 2, "bin")
    meta = {"version": DEMO_VERSION, "seed": seed, "steps": steps, "note": "moss-agent demonstration model"}
    (out / "moss_demo.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def demo_checkpoint(
    path: str | Path | None = None,
    *,
    seed: int = 0,
    steps: int = DEMO_STEPS,
    force: bool = False,
    progress: Progress | None = None,
) -> Path:
    """The demonstration model's checkpoint directory, trained on first use and cached.

    Args:
        path: Where to write it; by default ``$MOSS_AGENT_CACHE/demo/moss-demo-v{DEMO_VERSION}-seed{seed}-...``.
        seed: Seed of the data, the initialisation and the batches.
        steps: Optimizer steps (batches of 8 dialogues); fewer for quick tests, worse plugin use.
        force: Train again even if the directory already holds a model.
        progress: Called as ``progress(step, steps, loss)`` after each step.

    Returns:
        A directory in the released MOSS layout, for :func:`moss_agent.loading.load_moss`.

    Raises:
        ValueError: If ``steps`` is not positive.
    """
    if steps < 1:
        raise ValueError(f"steps must be a positive number of optimizer steps, got {steps}")
    suffix = "" if steps == DEMO_STEPS else f"-steps{steps}"
    target = (
        Path(path) if path is not None else _ckpt.cache_dir() / "demo" / f"moss-demo-v{DEMO_VERSION}-seed{seed}{suffix}"
    )
    if (target / "config.json").exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _build(tmp, seed, steps, progress)
        # Renamed into place whole, so a reader never sees half a checkpoint.
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}-old-{os.getpid()}")
            os.rename(target, old)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").exists():  # otherwise another process won the race
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------- evaluation


@dataclass
class DemoReport:
    """How the demonstration model does on held-out questions (greedy decoding).

    Attributes:
        n: Questions per kind.
        command: Per kind, the share of questions with exactly the expected commands segment (``None`` for chat).
        reply: Per kind, the share of replies (after the expected results) that contain the right answer.
        samples: A few (question, pass-1 output, reply) triples per kind, for eyeballing.
        seconds: Wall time of the evaluation.
    """

    n: int
    command: dict[str, float] = field(default_factory=dict)
    reply: dict[str, float] = field(default_factory=dict)
    samples: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)
    seconds: float = 0.0

    def __str__(self) -> str:
        lines = [f"{'kind':<12}{'command':>9}{'reply':>8}   ({self.n} held-out questions per kind)"]
        lines += [f"{k:<12}{self.command[k]:>9.0%}{self.reply[k]:>8.0%}" for k in self.command]
        return "\n".join(lines)


def evaluate_demo_model(
    path: str | Path,
    n: int = 100,
    *,
    seed: int = 1,
    kinds: Sequence[str] = demo_data.KINDS,
    batch: int = 25,
) -> DemoReport:
    """Ask a demonstration checkpoint held-out questions through the real engine and score its commands.

    Pass 1 (``<|Inner Thoughts|>:`` until ``<eoc>``) is scored on the commands segment; pass 2 gets the results
    the tools give for the expected command and is scored on whether the reply contains the answer.

    Args:
        path: The checkpoint directory (from :func:`demo_checkpoint`).
        n: Questions per kind.
        seed: Seed of :func:`moss_agent.demo_data.held_out_questions`.
        kinds: Which kinds of question.
        batch: Prompts generated together.
    """
    from moss_agent.engine import SamplingParams, TransformersEngine
    from moss_agent.parser import parse_pass1, parse_reply

    start = time.perf_counter()
    engine = TransformersEngine.from_pretrained(path, precision="fp32", device_map="cpu")
    greedy = SamplingParams(max_new_tokens=96, do_sample=False, temperature=0.0, repetition_penalty=1.0)
    questions = demo_data.held_out_questions(n, seed=seed, kinds=kinds)

    def run(prompts: list[str], stop: str) -> list[str]:
        params = greedy.with_(stop_tokens=(stop,))
        return [
            g.text for i in range(0, len(prompts), batch) for g in engine.generate_batch(prompts[i : i + batch], params)
        ]

    prompts1 = [fmt.plugin_pass1_prompt(q.system, q.history, q.human) for q in questions]
    pass1 = [parse_pass1(text) for text in run(prompts1, fmt.EOC)]
    prompts2 = [
        fmt.plugin_pass2_prompt(p, r.inner_thoughts, r.commands_text, q.results)
        for p, r, q in zip(prompts1, pass1, questions, strict=True)
    ]
    replies = [parse_reply(text).text for text in run(prompts2, fmt.EOM)]
    report = DemoReport(n)
    for kind in kinds:
        rows = [i for i, q in enumerate(questions) if q.kind == kind]
        right = [pass1[i].commands_text == (questions[i].command or fmt.NONE) for i in rows]
        answered = [any(a in replies[i] for a in questions[i].accept) for i in rows]
        report.command[kind] = sum(right) / len(rows)
        report.reply[kind] = sum(answered) / len(rows)
        report.samples[kind] = [(questions[i].human, pass1[i].commands_text, replies[i]) for i in rows[:3]]
    report.seconds = time.perf_counter() - start
    return report
