"""``moss-agent plan``: what fits where, before a weight is read.

The table's columns, per precision: "load" is the weights alone; "turn (512)" and "full (2048)" are the
peak memory of transformers' eager generate() with 512 and 2048 tokens of context (KV cache, float32 attention
scores, full-sequence logits, and the allocator overhead the published MOSS figures show, which dominates). A
serving engine with a paged KV cache (vLLM) needs far less: the weights plus the KV cache (0.8 MiB a token for
the 16 B model in fp16).
"""

from __future__ import annotations

import argparse
from typing import Any

from moss_agent import settings
from moss_agent.cli import gib_list, model_name, positive_float, precision

__all__ = ["add_parser"]

DEFAULT_CPU_GIB = 24.0
"""CPU RAM assumed when only ``--gpus`` describes the machine."""


def _cmd_plan(args: argparse.Namespace) -> int:
    from moss_agent.checkpoints.hardware import Hardware, inspect_hardware
    from moss_agent.checkpoints.loading import plan_load

    if args.gpus is not None or args.cpu_gib is not None:
        hardware = Hardware.simulated(gpu_gib=args.gpus or (), cpu_gib=args.cpu_gib or DEFAULT_CPU_GIB)
    else:
        hardware = inspect_hardware()
    plan = plan_load(args.model, hardware, precision=args.precision)
    print(plan.describe())
    return 0


def add_parser(sub: Any) -> None:
    """Add ``plan`` to the ``moss-agent`` subcommands."""
    p = sub.add_parser(
        "plan",
        help="print the load plan for a checkpoint on this (or described) hardware",
        description=(__doc__ or "").split("\n\n")[1].replace("\n", " "),
    )
    p.add_argument("model", type=model_name, help="checkpoint directory or hub id")
    p.add_argument("--precision", default="auto", type=precision, help="auto, " + ", ".join(settings.PRECISIONS))
    p.add_argument("--gpus", type=gib_list, help="plan for GPUs with this much free GiB instead, e.g. 24,24")
    p.add_argument(
        "--cpu-gib", type=positive_float, help=f"plan for this much CPU RAM instead (with --gpus: {DEFAULT_CPU_GIB:g})"
    )
    p.set_defaults(func=_cmd_plan)
