"""Shared bits of the examples: the ``--model`` option and the demonstration model as its default."""

from __future__ import annotations

import argparse
import sys


def parse_args(description: str, **extra: dict) -> argparse.Namespace:
    """Parse ``--model`` (a checkpoint directory or hub id) plus the example's own options."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--model",
        help="MOSS checkpoint directory or hub id (e.g. fnlp/moss-moon-003-sft-plugin); "
        "default: the tiny demonstration model shipped with moss-agent",
    )
    for flag, options in extra.items():
        parser.add_argument(flag, **options)
    return parser.parse_args()


def resolve_model(model: str | None) -> str:
    """The checkpoint to use: ``model``, or the demonstration model shipped with the package."""
    if model:
        return model
    from moss_agent.demo import demo_checkpoint

    print("(using the tiny demonstration model; pass --model for a real MOSS checkpoint)", file=sys.stderr)
    return str(demo_checkpoint())


def chat_model(model: str | None, **kwargs: object):
    """A greedy ChatMoss on ``model`` (greedy so that the examples print the same thing every run)."""
    from moss_agent import ChatMoss

    return ChatMoss(model=resolve_model(model), temperature=0, do_sample=False, **kwargs)


def search_tool(model: str | None):
    """A Search tool: over the demonstration corpus for the demo model, else the default backend."""
    from moss_agent.tools import SearchTool

    if model:
        return SearchTool()  # Tavily with TAVILY_API_KEY, else an (empty) local index: add your documents
    from moss_agent.demo.corpus import DemoSearchBackend

    return SearchTool(backend=DemoSearchBackend())
