"""A small demonstration MOSS model that really uses plugins, trained here on CPU in about three minutes.

:func:`demo_checkpoint` trains a tiny CodeGen (MOSS's architecture: 2 layers, 64 wide, 4 heads) on the synthetic
dialogues of :mod:`moss_agent.demo.data` and writes it in the released MOSS layout (``config.json`` with
``model_type: "moss"``, sharded ``pytorch_model-*.bin`` with an index, the MOSS tokenizer files), so it loads like
``fnlp/moss-moon-003-sft-plugin``. It writes ``Calculate``, ``Solve`` and ``Search`` commands for questions it has
never seen, so ``make demo`` runs a real plugin conversation offline. It knows nothing else.

What makes it learn in minutes: a byte-level BPE of 800 tokens whose merges never join a space to a capital, a
digit or punctuation (a name or a number is the same tokens in the question and inside ``Search("...")``);
most steps on short windows of the turns, the last ones on whole turns after the whole system text; and an
initialisation that starts layer 0 with previous-token heads and layer 1 with heads that match them (the
induction circuit that copying needs). Training is seeded, on two threads: the same seed gives the same weights.
"""

from __future__ import annotations

import itertools
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

from moss_agent.checkpoints.files import moss_config, write_json, write_moss_tokenizer, write_weights
from moss_agent.demo import data as demo_data
from moss_agent.protocol import format as fmt
from moss_agent.settings import CONTEXT_WINDOW, cache_dir

__all__ = ["DEMO_STEPS", "DEMO_VERSION", "DemoReport", "demo_checkpoint", "evaluate_demo_model"]

DEMO_VERSION = "1"
"""Part of the cache key: bump it whenever the data, the tokenizer or the training changes."""
DEMO_STEPS = 4000
"""Optimizer steps of the default run (about 3 minutes on two cores)."""

SIZES = {"n_layer": 2, "n_embd": 64, "n_head": 4, "rotary_dim": 8}
BPE_VOCAB, BATCH, LR, WARMUP = 800, 8, 4e-3, 100
WINDOW_SHARE = 0.87  # of the steps train on short windows; the rest on whole turns after the system text
POOL = 4  # batches of windows sorted by length together, so that little is padding
# Units the BPE may merge within: a space with a lowercase word, a capitalised word, digits, or one character.
_UNITS = r" [a-z]+|[A-Z]+[a-z]*|[a-z]+|[0-9]+|[\s\S]"

Progress = Callable[[int, int, float], None]
"""Called as ``progress(step, steps, loss)`` after each training step."""


def _write_tokenizer(out: Path, seed: int) -> None:
    """Train the BPE on training dialogues and write the five MOSS tokenizer files (role tags added too)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # GPT-2's pre-tokenizer, used when the files are loaded, never splits inside these units: same tokens.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(_UNITS), "isolated"), pre_tokenizers.ByteLevel(False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, initial_alphabet=alphabet, show_progress=False)
    specials = re.compile("|".join(re.escape(t) for t in (*fmt.END_TOKENS, *fmt.ROLE_TAGS)))
    tok.train_from_iterator(
        (specials.sub(" ", d.conversation.to_text()) for d in demo_data.dialogues(3000, seed=seed)), trainer
    )
    model = json.loads(tok.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    added = (*fmt.END_TOKENS, *fmt.ROLE_TAGS)
    write_moss_tokenizer(out, model["vocab"], merges, added, name="moss-agent/moss-demo")


# ---------------------------------------------------------------- the model


def _rotary(positions: Any, rot: int) -> tuple[Any, Any]:
    import torch

    angles = positions.float()[:, None] / (10000 ** (torch.arange(0, rot, 2, dtype=torch.int64) / rot))
    return torch.sin(angles).repeat_interleave(2, -1)[:, None], torch.cos(angles).repeat_interleave(2, -1)[:, None]


def _rope(x: Any, sin: Any, cos: Any) -> Any:
    import torch

    return x * cos + torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2) * sin


def _forward(model: Any, ids: Any, prefix: list[tuple[Any, Any]] | None = None) -> tuple[Any, list[tuple[Any, Any]]]:
    """CodeGen's forward pass up to ``lm_head``, continuing after a batch-1 ``prefix`` of keys and values.

    transformers' CodeGen computes the same (the tests check); this one shares the prefix across the batch, so
    the long system text costs one forward pass per batch, without gradient.
    """
    import torch
    import torch.nn.functional as F

    cfg, tr = model.config, model.transformer
    batch, length = ids.shape
    heads, dim, rot = cfg.n_head, cfg.n_embd // cfg.n_head, cfg.rotary_dim
    past = 0 if prefix is None else prefix[0][0].shape[2]
    sin, cos = _rotary(torch.arange(past, past + length), rot)
    mask = torch.ones(length, past + length, dtype=torch.bool).tril(past) if past else None
    x, kv = tr.wte(ids), []
    for i, block in enumerate(tr.h):
        h = block.ln_1(x)
        # The fused projection holds 4 groups of [q | v | k] (CodeGen's mp_num): one head per group here.
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


def _prime_copying(model: Any, seed: int, scale: float = 8.0, beta: float = 0.5, gamma: float = 5.0) -> None:
    """Start the model with the induction circuit that copying names and numbers needs; training may undo it.

    In layer 0, one ``ln_1`` dimension becomes a constant 1, from which heads 0, 1 and 2 get fixed rotary
    query/key parts that peak at a distance of 1, 2 and 0 tokens. Heads 0 (previous token) and 2 (current token)
    write the same projection ``p`` of their token into two orthogonal subspaces ``u`` and ``v``; layer-1 heads 0
    and 1 compare ``v`` (this token) with ``u`` (the token before each earlier position), so they attend to what
    followed an earlier occurrence of the current token.
    """
    import torch

    cfg, (layer0, layer1) = model.config, model.transformer.h
    n, dim, rot = cfg.n_embd, cfg.n_embd // cfg.n_head, cfg.rotary_dim  # one head per fused group (n_head 4)
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(n - 1, 2 * dim, generator=gen))[0]  # the constant dimension left out
    u, v = (torch.cat([b, torch.zeros(1, dim)]) for b in basis.split(dim, dim=1))
    p = torch.randn(dim, n, generator=gen) / math.sqrt(n)
    p[:, -1] = 0.0
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2, dtype=torch.int64) / rot))
    w0, w1 = layer0.attn.qkv_proj.weight, layer1.attn.qkv_proj.weight
    with torch.no_grad():
        layer0.ln_1.weight[-1], layer0.ln_1.bias[-1] = 0.0, 1.0
        for head, distance in ((0, 1), (1, 2), (2, 0)):
            q, k = 3 * dim * head, 3 * dim * head + 2 * dim
            for i, angle in enumerate((distance * inv[:3]).tolist()):
                w0[q + 2 * i, -1], w0[q + 2 * i + 1, -1] = scale * math.cos(angle), -scale * math.sin(angle)
                w0[k + 2 * i, -1], w0[k + 2 * i + 1, -1] = scale, 0.0
        for head, space in ((0, u), (2, v)):
            w0[3 * dim * head + dim : 3 * dim * head + 2 * dim] = p  # values
            layer0.attn.out_proj.weight[:, head * dim : (head + 1) * dim] = beta * space
        for head in (0, 1):
            s = torch.randn(dim - rot, dim, generator=gen) / math.sqrt(dim)
            q, k = 3 * dim * head, 3 * dim * head + 2 * dim
            w1[q : q + rot], w1[k : k + rot] = 0.0, 0.0  # no preference for positions: a pure content match
            w1[q + rot : q + dim], w1[k + rot : k + dim] = gamma * s @ v.T, gamma * s @ u.T


# ---------------------------------------------------------------- training


def _labelled(tokenizer: Any, conv: fmt.MossConversation, start: int, end: int) -> tuple[list[int], list[int]]:
    """Token ids of ``text[start:end]`` and labels: the id where the model generates it, -100 elsewhere."""
    enc = tokenizer(conv.to_text()[start:end], return_offsets_mapping=True)
    spans = [(a - start, b - start) for a, b in demo_data.trained_spans(conv) if start <= a and b <= end]
    offsets = zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    return enc["input_ids"], [t if any(s <= a and b <= e for s, e in spans) else -100 for t, (a, b) in offsets]


def _batches(tokenizer: Any, seed: int, steps: int) -> Iterator[tuple[Any | None, Any, Any]]:
    """Batches of (prefix ids or None, ids, labels), right-padded: windows first, then whole turns."""
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
        rows = [_labelled(tokenizer, c, *rng.choice(demo_data.training_windows(c))) for c in convs]
        rows.sort(key=lambda r: len(r[0]))
        yield from ((None, *tensors(rows[k : k + BATCH])) for k in range(0, len(rows), BATCH))
    while True:  # whole turns after the system text their batch shares
        convs = [d.conversation for d in next(dialogues)]
        rows = [_labelled(tokenizer, c, len(c.system), len(c.to_text())) for c in convs]
        yield (torch.tensor([tokenizer(convs[0].system)["input_ids"]]), *tensors(rows))


def _train(tokenizer: Any, seed: int, steps: int, progress: Progress | None) -> Any:
    import torch
    from transformers import CodeGenConfig, CodeGenForCausalLM

    torch.manual_seed(seed)
    model = CodeGenForCausalLM(
        CodeGenConfig(
            vocab_size=-(-len(tokenizer) // 64) * 64,
            n_positions=CONTEXT_WINDOW,
            n_ctx=CONTEXT_WINDOW,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **SIZES,  # type: ignore[arg-type]
        )
    )
    _prime_copying(model, seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.98), weight_decay=0.01)

    def warmup_cosine(step: int) -> float:
        cosine = 0.05 + 0.475 * (1 + math.cos(math.pi * (step - WARMUP) / max(1, steps - WARMUP)))
        return min((step + 1) / WARMUP, cosine)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine)
    for step, (prefix_ids, ids, labels) in enumerate(itertools.islice(_batches(tokenizer, seed, steps), steps)):
        prefix = None
        if prefix_ids is not None:
            with torch.no_grad():
                _, prefix = _forward(model, prefix_ids)
        hidden, _ = _forward(model, ids, prefix)
        target = labels[:, 1:]
        keep = target != -100  # the head only where there is a loss
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden[:, :-1][keep]), target[keep])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if progress is not None:
            progress(step + 1, steps, loss.item())
    return model.eval()


def _build(out: Path, seed: int, steps: int, progress: Progress | None) -> None:
    import torch

    from moss_agent.checkpoints.loading import load_tokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # fixed, so that the same seed gives the same weights on any machine
    try:
        _write_tokenizer(out, seed)
        tokenizer = load_tokenizer(out)[0]  # exactly as the checkpoint will be read
        model = _train(tokenizer, seed, steps, progress)
    finally:
        torch.set_num_threads(threads)
    cfg, n = model.config, CONTEXT_WINDOW
    config = moss_config(cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.rotary_dim, cfg.vocab_size, "float32", None)
    config.update(_name_or_path="moss-agent/moss-demo", bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id)
    write_json(out / "config.json", config)
    weights = {k: t.detach().clone() for k, t in model.state_dict().items()}
    mask = torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n)  # the release carries these buffers
    weights.update({f"transformer.h.{i}.attn.causal_mask": mask.clone() for i in range(cfg.n_layer)})
    write_weights(out, weights, 2, "bin")
    meta = {"version": DEMO_VERSION, "seed": seed, "steps": steps, "about": "moss-agent demonstration model"}
    write_json(out / "moss_demo.json", meta)


def demo_checkpoint(
    path: str | Path | None = None,
    *,
    seed: int = 0,
    steps: int = DEMO_STEPS,
    force: bool = False,
    progress: Progress | None = None,
) -> Path:
    """The demonstration model's checkpoint directory, trained on first use (about 3 minutes) and cached.

    Args:
        path: Where to write it; by default ``$MOSS_AGENT_CACHE/demo/moss-demo-v{DEMO_VERSION}-seed{seed}``
            (``~/.cache/moss-agent`` without the variable).
        seed: Seed of the data, the initialisation and the batches.
        steps: Optimizer steps of 8 dialogues; fewer train faster and use the plugins worse.
        force: Train again even if the directory already holds a model.
        progress: Called as ``progress(step, steps, loss)`` after each step.

    Returns:
        A directory in the released MOSS layout, for :func:`moss_agent.checkpoints.loading.load_moss`.

    Raises:
        ValueError: If ``steps`` is not positive.
    """
    if steps < 1:
        raise ValueError(f"steps must be a positive number of optimizer steps, got {steps}")
    name = f"moss-demo-v{DEMO_VERSION}-seed{seed}" + ("" if steps == DEMO_STEPS else f"-steps{steps}")
    target = Path(path) if path is not None else cache_dir() / "demo" / name
    if (target / "config.json").exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    old = target.with_name(f".{target.name}-old-{os.getpid()}")
    try:
        _build(tmp, seed, steps, progress)
        if target.exists():  # replaced whole, so that a reader never sees half a checkpoint
            os.rename(target, old)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").exists():  # otherwise another process won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return target


# ---------------------------------------------------------------- evaluation


@dataclass
class DemoReport:
    """How a demonstration model does on held-out questions.

    Attributes:
        n: Questions per kind.
        command: Per kind, the share of exactly right commands segments (``None`` where no tool is needed).
        reply: Per kind, the share of replies (after the right results) that contain the answer.
        samples: Per kind, a few (question, commands, reply) triples.
        seconds: Wall time of the evaluation.
    """

    n: int
    command: dict[str, float] = field(default_factory=dict)
    reply: dict[str, float] = field(default_factory=dict)
    samples: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)
    seconds: float = 0.0

    def __str__(self) -> str:
        lines = [f"{'kind':<12}{'command':>9}{'reply':>8}   ({self.n} held-out questions per kind)"]
        return "\n".join(lines + [f"{k:<12}{self.command[k]:>9.0%}{self.reply[k]:>8.0%}" for k in self.command])


def evaluate_demo_model(
    path: str | Path,
    n: int = 100,
    *,
    seed: int = 1,
    kinds: Sequence[str] = demo_data.KINDS,
    params: Any = None,
    batch: int = 25,
) -> DemoReport:
    """Ask a checkpoint held-out questions through the real engine and score its commands and replies.

    Pass 1 (``<|Inner Thoughts|>:`` until ``<eoc>``) is scored on its commands segment; pass 2 gets the results
    the tools give for the right command, and is scored on whether the reply contains the answer.

    Args:
        path: A checkpoint directory (from :func:`demo_checkpoint`).
        n: Questions per kind.
        seed: Seed of :func:`moss_agent.demo.data.held_out_questions`.
        kinds: Which kinds of question.
        params: ``SamplingParams``; greedy decoding when None.
        batch: Prompts generated together.
    """
    from moss_agent.engines.base import SamplingParams
    from moss_agent.engines.transformers import TransformersEngine
    from moss_agent.protocol.stream import parse_pass1, parse_reply

    start = time.perf_counter()
    engine = TransformersEngine.from_pretrained(path, precision="fp32", device_map="cpu")
    params = params or SamplingParams(max_new_tokens=96, do_sample=False, temperature=0.0, repetition_penalty=1.0)
    questions = demo_data.held_out_questions(n, seed=seed, kinds=kinds)

    def run(prompts: list[str], stop: str) -> list[str]:
        stopping = params.with_(stop_tokens=(stop,))
        chunks = (engine.generate_batch(prompts[i : i + batch], stopping) for i in range(0, len(prompts), batch))
        return [g.text for chunk in chunks for g in chunk]

    prompts = [fmt.plugin_pass1_prompt(q.system, q.history, q.human) for q in questions]
    pass1 = [parse_pass1(text) for text in run(prompts, fmt.EOC)]
    prompts = [
        fmt.plugin_pass2_prompt(p, r.inner_thoughts, r.commands_text, q.results)
        for p, r, q in zip(prompts, pass1, questions, strict=True)
    ]
    replies = [parse_reply(text).text for text in run(prompts, fmt.EOM)]
    report = DemoReport(n)
    for kind in kinds:
        rows = [i for i, q in enumerate(questions) if q.kind == kind]
        report.command[kind] = sum(pass1[i].commands_text == (questions[i].command or fmt.NONE) for i in rows) / n
        report.reply[kind] = sum(any(a in replies[i] for a in questions[i].accept) for i in rows) / n
        report.samples[kind] = [(questions[i].human, pass1[i].commands_text, replies[i]) for i in rows[:3]]
    report.seconds = time.perf_counter() - start
    return report
