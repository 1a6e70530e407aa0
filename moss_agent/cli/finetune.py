"""``moss-agent finetune`` and ``moss-agent merge``: teach MOSS your data, then fold the adapter in.

finetune MODEL DATA... --out DIR trains a LoRA adapter (or QLoRA, or every weight) on MOSS-format
conversations: SFT conversation JSON files or folders, the release's finetune JSONL, or JSON dumps of LangChain
message lists. --plan-only prints the training memory plan and stops. merge MODEL ADAPTER OUT writes the
adapted model as a checkpoint in the released layout.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from moss_agent import settings
from moss_agent.cli import gib_list, model_name, positive_float

__all__ = ["add_parser"]

DEFAULT_CPU_GIB = 24.0
"""CPU RAM assumed when only ``--gpus`` describes the machine."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give at least 1")
    return value


def _hardware(args: argparse.Namespace) -> Any:
    from moss_agent.checkpoints.hardware import Hardware

    if args.gpus is None and args.cpu_gib is None:
        return None
    return Hardware.simulated(gpu_gib=args.gpus or (), cpu_gib=args.cpu_gib or DEFAULT_CPU_GIB)


def _cmd_finetune(args: argparse.Namespace) -> int:
    from moss_agent.finetune.plan import check_options, describe_training

    if args.plan_only:
        check_options(args.method, args.precision, args.steps, args.epochs, args.batch_size, args.max_length, args.loss)
        print(describe_training(args.model, args.method, args.precision, args.batch_size, args.max_length,
                                args.lora_r, _hardware(args)))  # fmt: skip
        return 0
    if not args.data or args.out is None:
        raise SystemExit("finetune needs DATA (files or folders of conversations) and --out DIR")
    from moss_agent.finetune import finetune

    result = finetune(
        args.model, args.data, args.out, method=args.method, steps=args.steps, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, max_length=args.max_length, precision=args.precision, eval_data=args.eval,
        loss=args.loss, strict=args.strict, lora_r=args.lora_r, save_steps=args.save_steps, resume=args.resume,
        seed=args.seed, json_path=args.json, progress=not args.quiet, hardware=_hardware(args),
    )  # fmt: skip
    for problem in result.problems:
        print(f"skipped {problem}", file=sys.stderr)
    line = (
        f"{result.method}: {result.steps} steps, loss {result.loss_first:.4f} -> {result.loss_last:.4f}, "
        f"{result.trained_tokens} ids with loss, {result.masked_tokens} without; {result.conversations} "
        f"conversations ({result.truncated} cut at a turn to fit --max-length, {result.dropped} too long, "
        f"{result.skipped} malformed skipped)"
    )
    if result.eval_loss is not None:
        line += f"; eval loss {result.eval_loss_first:.4f} -> {result.eval_loss:.4f}"
    print(line)
    print(f"written to {result.out}" + (f"; report in {args.json}" if args.json else ""))
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from moss_agent.finetune import merge_adapter

    out = merge_adapter(args.model, args.adapter, args.out, dtype=args.dtype)
    print(f"merged checkpoint written to {out}")
    return 0


def add_parser(sub: Any) -> None:
    """Add ``finetune`` and ``merge`` to the ``moss-agent`` subcommands."""
    from moss_agent.cli import precision
    from moss_agent.finetune.plan import METHODS
    from moss_agent.finetune.spans import LOSS_MODES

    p = sub.add_parser(
        "finetune",
        help="fine-tune MOSS on conversations (LoRA, QLoRA or full)",
        description=(__doc__ or "").split("\n\n")[1].replace("\n", " "),
    )
    p.add_argument("model", type=model_name, help="checkpoint directory or hub id")
    p.add_argument("data", nargs="*", help="conversation .json / .jsonl files or folders")
    p.add_argument("--out", help="output directory (the adapter, or the checkpoint for --method full)")
    p.add_argument("--method", default="lora", choices=METHODS, help="lora, qlora (4-bit base, CUDA) or full")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--steps", type=_positive_int, help="optimizer steps")
    group.add_argument("--epochs", type=positive_float, help="passes over the data (default 2, as the release)")
    p.add_argument("--lr", type=positive_float, help="peak learning rate (default 1e-3 LoRA, 9e-6 full)")
    p.add_argument("--batch-size", type=_positive_int, default=1, help="conversations per step")
    p.add_argument(
        "--max-length", type=_positive_int, default=settings.CONTEXT_WINDOW, help="ids per conversation (cut at a turn)"
    )
    p.add_argument("--precision", default="auto", type=precision, help="auto, fp32, bf16, fp16")
    p.add_argument("--eval", nargs="+", help="held-out conversations, evaluated before and after")
    p.add_argument("--loss", default="release", choices=LOSS_MODES, help="release spans, or MOSS's segments only")
    p.add_argument("--strict", action="store_true", help="fail on a malformed conversation instead of skipping it")
    p.add_argument("--lora-r", type=_positive_int, default=8, help="LoRA rank")
    p.add_argument("--save-steps", type=_positive_int, help="save a resumable checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order and LoRA init")
    p.add_argument("--json", help="write loss_first, loss_last, steps, trained_tokens, ... to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--plan-only", action="store_true", help="print the training memory plan and stop")
    p.add_argument("--gpus", type=gib_list, help="plan for GPUs with this much free GiB instead, e.g. 24 or 80,80")
    p.add_argument("--cpu-gib", type=positive_float, help="plan for this much CPU RAM instead")
    p.set_defaults(func=_cmd_finetune)

    m = sub.add_parser(
        "merge",
        help="merge a LoRA adapter into a checkpoint in the released layout",
        description="Write MODEL with ADAPTER folded into its weights to OUT (config, tokenizer, .bin shards).",
    )
    m.add_argument("model", type=model_name, help="base checkpoint directory or hub id")
    m.add_argument("adapter", help="adapter directory written by moss-agent finetune")
    m.add_argument("out", help="new checkpoint directory")
    m.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"), help="weights dtype")
    m.set_defaults(func=_cmd_merge)
