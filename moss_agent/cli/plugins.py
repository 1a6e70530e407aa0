"""The plugin options of ``chat``, ``demo`` and ``serve``, and the tools they make, each checked at start.

A plugin that cannot work here says so before the first question, with what to do about it:

* Search needs something to search: ``--docs PATH...`` (a local BM25 index of text files, offline) or
  ``TAVILY_API_KEY`` (web search). Without either its index is empty and every search finds nothing.
* Text2Image needs diffusers and its model (``--image-model``, by default ``stabilityai/sd-turbo``) on this
  machine; it is not downloaded behind the user's back.

With ``--plugins auto`` (the default) every plugin that can work is on and the others are off, each with a line
saying why; a plugin named explicitly that cannot work is an error (Search without documents only warns: it
runs, and finds nothing).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from moss_agent.cli import PLUGIN_KEYS, CliError, data_dir, plugin_keys

__all__ = ["add_plugin_options", "make_plugin_tools"]

AUTO = "auto"


def add_plugin_options(p: argparse.ArgumentParser) -> None:
    """``--plugins``, ``--docs``, ``--image-model`` and ``--image-dir``."""
    from moss_agent.tools.text_to_image import DEFAULT_TEXT2IMAGE_MODEL

    p.add_argument(
        "--plugins",
        default=AUTO,
        help=f"comma-separated, from {','.join(PLUGIN_KEYS)}; 'auto': every plugin that can work here",
    )
    p.add_argument("--docs", nargs="+", metavar="PATH", help="text files or folders Search indexes (offline search)")
    p.add_argument(
        "--image-model", default=DEFAULT_TEXT2IMAGE_MODEL, help="Text2Image's diffusers model: hub id or directory"
    )
    p.add_argument("--image-dir", default=str(data_dir() / "images"), help="where Text2Image saves pictures")


def _search(args: argparse.Namespace, say: Callable[[str], None], explicit: bool) -> Any | None:
    from moss_agent.tools.search import SearchTool
    from moss_agent.tools.search_backends import TavilyBackend, default_backend

    backend = getattr(args, "search_backend", None)  # a caller's own (the demo's corpus)
    if backend is not None:
        return SearchTool(backend=backend)
    if args.docs:
        missing = [d for d in args.docs if not Path(d).expanduser().exists()]
        if missing:
            raise CliError(f"--docs: no such file or folder: {', '.join(missing)}")
        tool = SearchTool.from_documents(files=[Path(d).expanduser() for d in args.docs])
        count = len(tool.backend)
        if not count:
            raise CliError(f"--docs {' '.join(args.docs)}: no text found (Search reads .txt and .md files)")
        say(f"Search: local index of {count} passage{'' if count == 1 else 's'} from {' '.join(args.docs)}")
        return tool
    backend = default_backend()
    if isinstance(backend, TavilyBackend):
        say("Search: Tavily web search (TAVILY_API_KEY)")
        return SearchTool(backend=backend)
    why = "nothing to search: give --docs PATH... (local files) or set TAVILY_API_KEY (web search)"
    if os.environ.get("TAVILY_API_KEY"):
        why = "TAVILY_API_KEY is set but tavily-python is missing: pip install 'moss-agent[search]', or give --docs"
    if not explicit:
        say(f"Search: off, {why}")
        return None
    say(f"Search: warning: {why}; until then it finds nothing")
    return SearchTool(backend=backend)


def _text2image(args: argparse.Namespace, say: Callable[[str], None], explicit: bool) -> Any | None:
    from moss_agent.tools.text_to_image import TextToImageTool, text2image_problem

    problem = text2image_problem(args.image_model)
    if problem is None:
        say(f"Text2Image: {args.image_model}")
        return TextToImageTool(model=args.image_model, output_dir=args.image_dir)
    if explicit:
        raise CliError(f"Text2Image cannot work: {problem}")
    say(f"Text2Image: off, {problem}; then add text2image to --plugins")
    return None


def make_plugin_tools(args: argparse.Namespace, *, out: Any = None, notes: list[str] | None = None) -> list[Any]:
    """The plugin tools ``args`` ask for, each checked; one line per plugin that needs saying goes to ``out``.

    Args:
        args: The parsed options (``plugins``, ``docs``, ``image_model``, ``image_dir``).
        out: Where the lines go (stderr by default).
        notes: Also gets the lines (the terminal chat's ``/plugins`` repeats them).

    Raises:
        CliError: A plugin named in ``--plugins`` cannot work (the message says what to do).
    """
    from moss_agent.tools import make_tools

    stream = out if out is not None else sys.stderr

    def say(line: str) -> None:
        print(line, file=stream)
        if notes is not None:
            notes.append(line)

    explicit = args.plugins.strip() != AUTO
    keys: Sequence[str] = plugin_keys(args.plugins) if explicit else PLUGIN_KEYS
    tools: list[Any] = []
    for key in keys:
        if key == "search":
            tool = _search(args, say, explicit)
        elif key == "text2image":
            tool = _text2image(args, say, explicit)
        else:
            (tool,) = make_tools([key])
        if tool is not None:
            tools.append(tool)
    return tools
