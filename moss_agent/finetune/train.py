"""The training loop: LoRA, QLoRA or full fine-tuning of a MOSS checkpoint on MOSS-format conversations.

Plain PyTorch: AdamW, the release's cosine schedule with 5% warmup and gradient clipping at 1.0, gradient
checkpointing, a seeded data order, checkpoints every ``save_steps`` under ``OUT/checkpoints/step-N`` that
``resume=True`` continues from exactly (weights, optimizer, schedule, position in the data).
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moss_agent.checkpoints.files import write_json
from moss_agent.finetune.batches import batch_order, collate, count_tokens, iter_batches
from moss_agent.finetune.data import MalformedDataError, Problem, Sample, load_samples
from moss_agent.finetune.plan import METHODS, check_options, load_for_training
from moss_agent.finetune.spans import Encoded, EncodeStats, LossMode, encode_samples
from moss_agent.settings import CONTEXT_WINDOW

__all__ = ["METHODS", "FinetuneResult", "finetune"]

DEFAULT_LR = {"lora": 1e-3, "qlora": 1e-3, "full": 9e-6}
"""LoRA's usual rate for small adapters; full fine-tuning uses the release's 9e-6."""
WARMUP = 0.05
WEIGHT_DECAY = {"lora": 0.0, "qlora": 0.0, "full": 0.1}
NO_DECAY = ("bias", "ln_")  # the release exempts biases and layer norms from weight decay
STATE = "trainer_state.pt"
PROBE = 32
"""Training conversations whose loss ``loss_first`` / ``loss_last`` measure (the same ones before and after)."""


@dataclass
class FinetuneResult:
    """What a run did; ``to_dict`` is what ``--json`` writes.

    Attributes:
        out: The output directory (adapter, or checkpoint for ``full``).
        method: ``lora``, ``qlora`` or ``full``.
        steps: Optimizer steps taken in all (a resumed run counts the earlier ones).
        loss_first: Loss on a fixed probe of the training data (its first :data:`PROBE` conversations in the
            seeded order) before training.
        loss_last: Loss on the same probe after training.
        losses: The loss of every step (of the batch that step trained on).
        trained_tokens: Predicted ids that had loss, over all steps.
        masked_tokens: Predicted ids without loss (meta instruction, tool results, ...), padding excluded.
        eval_loss_first: Loss on the eval data before training (None without eval data).
        eval_loss: Loss on the eval data after training.
        conversations: Conversations trained on.
        truncated: Conversations cut at a turn boundary to fit ``max_length``.
        dropped: Conversations whose first turn alone is longer than ``max_length``.
        skipped: Malformed conversations skipped.
        problems: What was wrong with each skipped one (``file, turn N: reason``).
        seconds: Wall time of the training loop.
    """

    out: str
    method: str
    steps: int
    loss_first: float
    loss_last: float
    losses: list[float] = field(default_factory=list)
    trained_tokens: int = 0
    masked_tokens: int = 0
    eval_loss_first: float | None = None
    eval_loss: float | None = None
    conversations: int = 0
    truncated: int = 0
    dropped: int = 0
    skipped: int = 0
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def _prepare(
    read: tuple[list[Sample], list[Problem]], tokenizer: Any, loss: LossMode, max_length: int, what: str, where: Any
) -> tuple[list[Encoded], EncodeStats, list[Problem]]:
    samples, problems = read
    encoded, stats = encode_samples(samples, tokenizer, loss=loss, max_length=max_length)
    if not encoded:
        why = f"; {stats.dropped} longer than max_length {max_length} in their first turn" if stats.dropped else ""
        why += f"; {len(problems)} malformed (first: {problems[0]})" if problems else ""
        raise MalformedDataError(f"no usable {what} conversation in {where}{why}")
    return encoded, stats, problems


def _optimizer(model: Any, method: str, lr: float) -> Any:
    import torch

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = WEIGHT_DECAY[method]
    groups = [
        {"params": [p for n, p in params if not any(k in n for k in NO_DECAY)], "weight_decay": decay},
        {"params": [p for n, p in params if any(k in n for k in NO_DECAY)], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def _schedule(optimizer: Any, steps: int) -> Any:
    import torch

    warmup = int(WARMUP * steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _device(model: Any) -> Any:
    return next(p.device for p in model.parameters() if p.device.type != "meta")


def evaluate(model: Any, encoded: list[Encoded], pad_id: int, batch_size: int = 1) -> float:
    """Token-weighted mean loss of ``model`` on ``encoded`` (no gradients)."""
    import torch

    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(encoded), batch_size):
            batch = {k: v.to(_device(model)) for k, v in collate(encoded[i : i + batch_size], pad_id).items()}
            n, _ = count_tokens(batch)
            if n:
                total += float(model(**batch).loss) * n
                count += n
    model.train(was_training)
    return total / max(count, 1)


def _latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    return found[-1] if found else None


def _save_checkpoint(out: Path, step: int, model: Any, optimizer: Any, scheduler: Any, run: dict[str, Any]) -> None:
    import torch

    folder = out / "checkpoints" / f"step-{step}"
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    state = {"step": step, "weights": trainable, "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "run": run, "rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}  # fmt: skip
    torch.save(state, tmp / STATE)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def _restore(folder: Path, model: Any, optimizer: Any, scheduler: Any) -> tuple[int, dict[str, Any]]:
    import torch

    state = torch.load(folder / STATE, map_location="cpu", weights_only=True)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["weights"].items():
            if name not in params:
                raise ValueError(f"{folder} holds {name}, which this model lacks: resume with the same options")
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])  # dropout masks continue as in an uninterrupted run
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"]), dict(state["run"])


def finetune(
    model: str | os.PathLike[str],
    data: Any,
    out: str | os.PathLike[str],
    *,
    method: str = "lora",
    steps: int | None = None,
    epochs: float | None = None,
    lr: float | None = None,
    batch_size: int = 1,
    max_length: int = CONTEXT_WINDOW,
    precision: str = "auto",
    eval_data: Any = None,
    loss: LossMode = "release",
    strict: bool = False,
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    gradient_checkpointing: bool = True,
    save_steps: int | None = None,
    resume: bool = False,
    seed: int = 0,
    json_path: str | os.PathLike[str] | None = None,
    progress: bool = True,
    hardware: Any = None,
) -> FinetuneResult:
    """Fine-tune a MOSS checkpoint on MOSS-format conversations.

    Args:
        model: The checkpoint directory or hub id.
        data: Training data: a path or a list of paths (see :mod:`moss_agent.finetune.data`).
        out: Output directory: the adapter (``lora`` / ``qlora``) or a released-layout checkpoint (``full``).
        method: ``lora``, ``qlora`` (4-bit base, CUDA only) or ``full``.
        steps: Optimizer steps; overrides ``epochs``.
        epochs: Passes over the data (default 2, the release's; fractions allowed).
        lr: Peak learning rate (default 1e-3 for LoRA, the release's 9e-6 for full).
        batch_size: Conversations per step.
        max_length: Most ids per conversation; longer ones stop at a turn boundary.
        precision: Base weights' precision: ``auto``, ``fp32``, ``bf16``, ``fp16`` (``qlora`` uses int4).
        eval_data: Optional held-out data, evaluated before and after training.
        loss: ``release`` (the release's loss spans) or ``moss`` (MOSS's own segments only).
        strict: Fail on a malformed conversation instead of skipping it.
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha.
        lora_dropout: LoRA dropout.
        gradient_checkpointing: Recompute activations in the backward pass to save memory.
        save_steps: Save a resumable checkpoint every this many steps (and always at the end).
        resume: Continue from the latest checkpoint under ``out``.
        seed: Seed of the data order and the LoRA initialisation.
        json_path: Also write the result there as JSON.
        progress: Show a progress bar (loss, tokens/s, ETA) on stderr.
        hardware: The hardware to plan for (:class:`~moss_agent.checkpoints.hardware.Hardware`); inspected when
            None.

    Returns:
        The result (also written to ``json_path``).

    Raises:
        ValueError: Bad options.
        FileNotFoundError: Missing data.
        MalformedDataError: A malformed conversation under ``strict``, or no usable conversation.
        InsufficientMemoryError: When the training plan does not fit the hardware (before loading).
    """
    method, precision = check_options(method, precision, steps, epochs, batch_size, max_length, loss)
    out_dir = Path(out).expanduser()
    read = load_samples(data, strict=strict)  # bad data fails before minutes of loading
    read_eval = load_samples(eval_data, strict=strict) if eval_data else None
    loaded = load_for_training(model, method, precision, batch_size, max_length, lora_r, hardware)
    tokenizer, net = loaded.tokenizer, loaded.model
    pad_id = loaded.end_token_ids["<eom>"]  # the release pads with <eom>
    encoded, stats, problems = _prepare(read, tokenizer, loss, max_length, "training", data)
    held_out = _prepare(read_eval, tokenizer, loss, max_length, "eval", eval_data)[0] if read_eval else None

    import torch

    torch.manual_seed(seed)
    if method == "full":
        for p in net.parameters():
            p.requires_grad_(True)
    else:
        from moss_agent.finetune.adapters import lora_model

        if method == "qlora":
            from peft import prepare_model_for_kbit_training

            net = prepare_model_for_kbit_training(net, use_gradient_checkpointing=gradient_checkpointing)
        net = lora_model(net, r=lora_r, alpha=lora_alpha, dropout=lora_dropout)
    if gradient_checkpointing:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    net.config.use_cache = False

    per_epoch = math.ceil(len(encoded) / batch_size)
    total = steps if steps is not None else max(1, round((epochs if epochs is not None else 2) * per_epoch))
    optimizer = _optimizer(net, method, lr if lr is not None else DEFAULT_LR[method])
    scheduler = _schedule(optimizer, total)
    start = 0
    run: dict[str, Any] = {"trained": 0, "masked": 0, "losses": []}
    if resume and (last := _latest_checkpoint(out_dir)) is not None:
        start, run = _restore(last, net, optimizer, scheduler)
    probe = [encoded[b[0]] for b in batch_order(len(encoded), 1, seed, 0)[:PROBE]]
    if start == 0:
        run["probe_first"] = evaluate(net, probe, pad_id)
        run["eval_first"] = evaluate(net, held_out, pad_id) if held_out else None

    from tqdm.auto import tqdm

    device = _device(net)
    bar = tqdm(total=total, initial=start, disable=not progress, unit="step", dynamic_ncols=True)
    began, seen = time.perf_counter(), 0
    net.train()
    batches = iter_batches(len(encoded), batch_size, seed, start)
    for step in range(start, total):
        _, indices = next(batches)
        batch = {k: v.to(device) for k, v in collate([encoded[i] for i in indices], pad_id).items()}
        trained, masked = count_tokens(batch)
        value = net(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        scheduler.step()
        run["losses"].append(float(value.detach()))
        run["trained"] += trained
        run["masked"] += masked
        seen += trained + masked
        rate = seen / max(time.perf_counter() - began, 1e-9)
        bar.set_postfix(loss=f"{run['losses'][-1]:.4f}", tok_s=f"{rate:.0f}")
        bar.update(1)
        if save_steps and (step + 1) % save_steps == 0 and step + 1 < total:
            _save_checkpoint(out_dir, step + 1, net, optimizer, scheduler, run)
    bar.close()
    seconds = time.perf_counter() - began
    if total > start:
        _save_checkpoint(out_dir, total, net, optimizer, scheduler, run)
    eval_last = evaluate(net, held_out, pad_id) if held_out else None
    probe_last = evaluate(net, probe, pad_id)

    from moss_agent.finetune.export import save_trained

    save_trained(net, method, loaded, out_dir)
    losses = run["losses"]
    result = FinetuneResult(
        out=str(out_dir), method=method, steps=total, loss_first=run["probe_first"],
        loss_last=probe_last, losses=losses, trained_tokens=run["trained"],
        masked_tokens=run["masked"], eval_loss_first=run["eval_first"], eval_loss=eval_last,
        conversations=stats.conversations, truncated=stats.truncated, dropped=stats.dropped,
        skipped=len(problems), problems=[str(p) for p in problems], seconds=round(seconds, 3),
    )  # fmt: skip
    if json_path is not None:
        write_json(Path(json_path), result.to_dict())
    return result
