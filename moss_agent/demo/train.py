"""Train the demonstration model: ``python -m moss_agent.demo.train --out DIR`` (the shipped weights come from here).

The run is seeded: a byte-level BPE trained on synthetic dialogues (:mod:`moss_agent.demo.data`), then a tiny
CodeGen (:mod:`moss_agent.demo.model`) trained with AdamW on the generated segments only. Text is encoded by the
tokenizer that :func:`moss_agent.checkpoints.files.load_tokenizer` returns for the written files, i.e. with the
release's ids, exactly as the engine will encode prompts. Most steps train on short windows of the turns, the
last ones on whole turns after the whole system text. The checkpoint is written in the released MOSS layout with
one ``model.safetensors`` and ``moss_demo.json``, the record of the run (seed, steps, time, machine, versions).

Seeded training is bit-identical on one machine and thread count, not across CPUs: the project ships the weights
it trained (``moss_agent/demo/weights``), and this command is how they were made.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import random
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from moss_agent.checkpoints.files import load_tokenizer, moss_config, write_json, write_moss_tokenizer, write_weights
from moss_agent.demo import DEMO_VERSION
from moss_agent.demo import data as demo_data
from moss_agent.demo.model import SIZES, forward, new_model
from moss_agent.protocol import format as fmt

__all__ = ["DEMO_SEED", "DEMO_STEPS", "Progress", "main", "train_demo_model"]

DEMO_SEED = 0
DEMO_STEPS = 12000
"""Optimizer steps of the shipped run."""
BPE_VOCAB, BATCH, LR, WARMUP = 800, 8, 4e-3, 200
WINDOW_SHARE = 0.35  # of the steps train on short windows; the rest on whole turns after the system text, which
# teaches copying to ignore the system text (trained on windows only, names came from the meta instruction)
POOL = 4  # batches of windows sorted by length together, so that little is padding
# Units the BPE may merge within: a space with a lowercase word, a capitalised word, or one character. A digit is
# always one token, and a name is the same tokens after a space as inside Search("..."): both copy token by token.
_UNITS = r" [a-z]+|[A-Z]+[a-z]*|[a-z]+|[\s\S]"

Progress = Callable[[int, int, float], None]
"""Called as ``progress(step, steps, loss)`` after each training step."""


def write_tokenizer(out: Path, seed: int) -> None:
    """Train the BPE on training dialogues and write the MOSS tokenizer files (end tokens and role tags added)."""
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
    texts = (specials.sub(" ", d.conversation.to_text()) for d in demo_data.dialogues(3000, seed=seed))
    tok.train_from_iterator(texts, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    write_moss_tokenizer(out, model["vocab"], merges, (*fmt.END_TOKENS, *fmt.ROLE_TAGS), name="moss-agent/moss-demo")


# ---------------------------------------------------------------- batches

Row = tuple[list[int], list[int]]


class _Encoded:
    """A conversation encoded whole (the engine's ids), with its trained tokens marked."""

    def __init__(self, tokenizer: Any, conv: fmt.MossConversation) -> None:
        self.conv, text = conv, conv.to_text()
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        self.ids: list[int] = enc["input_ids"]
        self.offsets: list[tuple[int, int]] = enc["offset_mapping"]
        spans = demo_data.trained_spans(conv)
        self.trained = [any(s <= a and b <= e for s, e in spans) for a, b in self.offsets]

    def row(self, start: int, end: int) -> Row:
        """Ids and labels of the tokens inside ``text[start:end]`` (label -100 where nothing is generated)."""
        keep = [i for i, (a, b) in enumerate(self.offsets) if start <= a and b <= end]
        return [self.ids[i] for i in keep], [self.ids[i] if self.trained[i] else -100 for i in keep]

    def split_system(self) -> tuple[list[int], Row]:
        """The system text's ids, and the row of everything after them."""
        cut = sum(b <= len(self.conv.system) for _, b in self.offsets)
        return self.ids[:cut], self.row(self.offsets[cut][0], len(self.conv.to_text()))


def _batches(tokenizer: Any, seed: int, steps: int) -> Iterator[tuple[Any | None, Any, Any]]:
    """Batches of (prefix ids or None, ids, labels), right-padded: windows first, then whole turns."""
    import torch

    dialogues = demo_data.dialogue_batches(BATCH, seed=seed)
    rng = random.Random(f"moss-demo-windows-{seed}")
    pad = tokenizer.eos_token_id  # causal attention never looks ahead at right padding

    def tensors(rows: Sequence[Row]) -> tuple[Any, Any]:
        width = max(len(ids) for ids, _ in rows)
        ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
        return ids, torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in rows])

    for _ in range(0, round(WINDOW_SHARE * steps), POOL):
        convs = [d.conversation for _ in range(POOL) for d in next(dialogues)]
        rows = [_Encoded(tokenizer, c).row(*rng.choice(demo_data.training_windows(c))) for c in convs]
        rows.sort(key=lambda r: len(r[0]))
        yield from ((None, *tensors(rows[k : k + BATCH])) for k in range(0, len(rows), BATCH))
    while True:  # whole turns after the system text their batch shares
        split = [_Encoded(tokenizer, d.conversation).split_system() for d in next(dialogues)]
        yield (torch.tensor([split[0][0]]), *tensors([row for _, row in split]))


def _train(tokenizer: Any, seed: int, steps: int, progress: Progress | None) -> Any:
    import torch

    model = new_model(tokenizer, seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.98), weight_decay=0.01)

    def warmup_cosine(step: int) -> float:
        cosine = 0.02 + 0.49 * (1 + math.cos(math.pi * (step - WARMUP) / max(1, steps - WARMUP)))
        return min((step + 1) / WARMUP, cosine)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine)
    for step, (prefix_ids, ids, labels) in enumerate(itertools.islice(_batches(tokenizer, seed, steps), steps)):
        prefix = None
        if prefix_ids is not None:
            with torch.no_grad():
                _, prefix = forward(model, prefix_ids)
        hidden, _ = forward(model, ids, prefix)
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


def _machine() -> str:
    cpus = os.cpu_count()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return f"{platform.machine()} {platform.processor() or platform.system()}, {cpus} CPUs, load average {load}"


def train_demo_model(
    out: str | Path,
    *,
    seed: int = DEMO_SEED,
    steps: int = DEMO_STEPS,
    threads: int = 1,
    progress: Progress | None = None,
) -> Path:
    """Train the demonstration model into ``out`` (created; files there are replaced).

    Args:
        out: The checkpoint directory to write.
        seed: Seed of the tokenizer data, the initialisation and the batches.
        steps: Optimizer steps of 8 dialogues (windows) each.
        threads: Torch CPU threads; part of what makes a run repeat bit for bit.
        progress: Called as ``progress(step, steps, loss)`` after each step.

    Returns:
        ``out``, a checkpoint in the released MOSS layout for :func:`moss_agent.checkpoints.loading.load_moss`.

    Raises:
        ValueError: If ``steps`` or ``threads`` is not positive.
    """
    import torch
    import transformers

    if steps < 1 or threads < 1:
        raise ValueError(f"steps and threads must be positive, got steps={steps}, threads={threads}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        write_tokenizer(out, seed)
        tokenizer = load_tokenizer(out)[0]  # exactly as the checkpoint will be read: the release's ids
        model = _train(tokenizer, seed, steps, progress)
    finally:
        torch.set_num_threads(before)
    cfg = model.config
    config = moss_config(cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.rotary_dim, cfg.vocab_size, "float32", None)
    config.update(_name_or_path="moss-agent/moss-demo", bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id)
    write_json(out / "config.json", config)
    for stale in out.glob("*.safetensors*"):
        stale.unlink()
    write_weights(out, {k: t.detach().clone() for k, t in model.state_dict().items()}, 1, "safetensors")
    record = {
        "about": "moss-agent demonstration model",
        "version": DEMO_VERSION,
        "command": f"python -m moss_agent.demo.train --out DIR --seed {seed} --steps {steps} --threads {threads}",
        "seed": seed,
        "steps": steps,
        "threads": threads,
        "sizes": SIZES,
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokenization": "release",
        "seconds": round(time.perf_counter() - start),
        "machine": _machine(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    write_json(out / "moss_demo.json", record)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: train, print progress to stderr, write the checkpoint."""
    parser = argparse.ArgumentParser(prog="python -m moss_agent.demo.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--seed", type=int, default=DEMO_SEED)
    parser.add_argument("--steps", type=int, default=DEMO_STEPS)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (one is fastest on a busy machine)")
    args = parser.parse_args(argv)
    start = time.monotonic()
    last = [0.0]

    def report(step: int, steps: int, loss: float) -> None:
        now = time.monotonic()
        if step in (1, steps) or now - last[0] > 30:
            last[0] = now
            print(f"step {step}/{steps}  loss {loss:.4f}  {now - start:.0f} s", file=sys.stderr, flush=True)

    try:
        out = train_demo_model(args.out, seed=args.seed, steps=args.steps, threads=args.threads, progress=report)
    except ValueError as err:
        parser.error(str(err))
    print(json.loads((out / "moss_demo.json").read_text(encoding="utf-8")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
