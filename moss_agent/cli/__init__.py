"""The ``moss-agent`` command: plan, chat, demo, convert and serve.

``moss-agent plan MODEL`` prints the load plan without reading a weight; ``moss-agent chat --model M`` chats in
the terminal with MOSS's plugins; ``moss-agent demo`` runs a plugin conversation end to end on the small
demonstration model (or on ``--model``); ``moss-agent convert`` writes a standard GPT-J / CodeGen checkpoint for
serving engines; ``moss-agent serve`` runs the OpenAI-compatible backend. Each subcommand lives in its own module
with an ``add_parser(subparsers)``; the options several of them share are defined here once.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from moss_agent import settings
from moss_agent.protocol.plugins import TOOL_KEYS

__all__ = ["PLUGIN_KEYS", "add_model_options", "build_parser", "main", "plugin_keys", "precision"]

PLUGIN_KEYS = TOOL_KEYS
"""The plugins that have a tool (``search``, ``calculator``, ``solver``, ``text2image``)."""


def precision(text: str) -> str:
    """``--precision``: ``auto``, a precision or an alias of one (``float16``, ``4bit`` ...)."""
    try:
        return settings.normalize_precision(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def plugin_keys(text: str) -> list[str]:
    """``--plugins``: comma-separated plugin keys.

    Raises:
        SystemExit: For an unknown key, naming the choices.
    """
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in PLUGIN_KEYS]
    if unknown:
        raise SystemExit(f"unknown plugin(s) {unknown}; choose from {', '.join(PLUGIN_KEYS)}")
    return keys


def add_model_options(p: argparse.ArgumentParser, *, required: bool) -> None:
    """``--model``, ``--precision`` and ``--plugins``: how a subcommand that runs MOSS picks it."""
    p.add_argument("--model", required=required, help="checkpoint directory or hub id")
    p.add_argument("--precision", default="auto", type=precision, help="auto, " + ", ".join(settings.PRECISIONS))
    p.add_argument("--plugins", default=",".join(PLUGIN_KEYS), help="comma-separated: " + ",".join(PLUGIN_KEYS))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``moss-agent``."""
    from moss_agent.cli import chat, convert, demo, plan, serve

    parser = argparse.ArgumentParser(prog="moss-agent", description=(__doc__ or "").split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (plan, chat, demo, convert, serve):
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``moss-agent`` console script."""
    args: Any = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
