"""``moss-agent plan``: what fits where, before a weight is read."""

from __future__ import annotations

import argparse
from typing import Any

from moss_agent.cli import precision

__all__ = ["add_parser"]


def _cmd_plan(args: argparse.Namespace) -> int:
    from moss_agent.checkpoints.hardware import Hardware, inspect_hardware
    from moss_agent.checkpoints.loading import plan_load

    if args.gpus is not None or args.cpu_gib is not None:
        gpus = tuple(float(g) for g in args.gpus.split(",") if g) if args.gpus else ()
        hardware = Hardware.simulated(gpu_gib=gpus, cpu_gib=args.cpu_gib or 24.0)
    else:
        hardware = inspect_hardware()
    plan = plan_load(args.model, hardware, precision=args.precision)
    print(plan.describe())
    return 0


def add_parser(sub: Any) -> None:
    """Add ``plan`` to the ``moss-agent`` subcommands."""
    p = sub.add_parser("plan", help="print the load plan for a checkpoint on this (or described) hardware")
    p.add_argument("model", help="checkpoint directory or hub id")
    p.add_argument("--precision", default="auto", type=precision)
    p.add_argument("--gpus", help="plan for GPUs of these free GiB instead, e.g. 24,24")
    p.add_argument("--cpu-gib", type=float, help="plan for this much CPU RAM instead")
    p.set_defaults(func=_cmd_plan)
