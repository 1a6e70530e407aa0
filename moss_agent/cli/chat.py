"""``moss-agent chat``: MOSS with its plugins in the terminal; the agent and the printer ``demo`` shares."""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from moss_agent import settings
from moss_agent.cli import add_model_options, plugin_keys

__all__ = ["Printer", "add_parser", "add_sampling_options", "make_agent"]

DIM, RESET = "\033[2m", "\033[0m"


class Printer:
    """Writes agent events: inner thoughts, commands and results dimmed, the reply plain."""

    def __init__(self, out: TextIO, color: bool) -> None:
        self.out = out
        self.dim, self.reset = (DIM, RESET) if color else ("", "")

    def side(self, label: str, text: str) -> None:
        """Write a dimmed side line (thoughts, a command, a result)."""
        self.out.write(f"{self.dim}[{label}] {text}{self.reset}\n")
        self.out.flush()

    def event(self, event: Any) -> None:
        """Write one :class:`~moss_agent.agent.AgentEvent`."""
        kind, data = event.type, event.data
        if kind == "thoughts" and data != "None":
            self.side("thoughts", data)
        elif kind == "command":
            self.side("command", data.text)
        elif kind == "result":
            text = data.error or data.output
            self.side("result", text.strip().replace("\n", " | ")[:300])
            if isinstance(data.artifact, str) and data.artifact.endswith(".png"):
                self.side("image", data.artifact)
        elif kind == "reply":
            self.out.write(data)
            self.out.flush()
        elif kind == "turn":
            self.out.write("\n")


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    """``--temperature``, ``--max-new-tokens`` and ``--image-dir``."""
    p.add_argument("--temperature", type=float, default=settings.TEMPERATURE)
    p.add_argument("--max-new-tokens", type=int, default=settings.MAX_NEW_TOKENS)
    p.add_argument("--image-dir", help="where Text2Image saves pictures")


def make_agent(args: argparse.Namespace, model: str) -> Any:
    """The MossAgent the parsed options describe (memory in ``--db`` under ``--session`` when given)."""
    from moss_agent.agent import MossAgent
    from moss_agent.chat_model import ChatMoss

    chat = ChatMoss(
        model=model,
        precision=args.precision,
        temperature=args.temperature,
        do_sample=args.temperature > 0,
        max_tokens=args.max_new_tokens,
    )
    memory = None
    if getattr(args, "session", None):
        from moss_agent.memory import TokenBudgetMemory
        from moss_agent.memory.store import SQLiteStore

        # Both plugin passes generate, and the results come in between: keep room for all of it.
        memory = TokenBudgetMemory.for_engine(
            chat.get_engine(),
            max_new_tokens=2 * args.max_new_tokens,
            reserve_tokens=256,
            store=SQLiteStore(args.db),
            session_id=args.session,
        )
    from moss_agent.tools import make_tools

    tools = make_tools(plugin_keys(args.plugins), output_dir=getattr(args, "image_dir", None))
    return MossAgent(chat, tools=tools, memory=memory)


def _cmd_chat(args: argparse.Namespace) -> int:
    printer = Printer(sys.stdout, sys.stdout.isatty())
    print(f"Loading {args.model} ...", file=sys.stderr)
    agent = make_agent(args, args.model)
    agent.chat.get_engine()  # load now, not in the middle of the first answer
    print("Ready. Empty line or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            text = input("> ")
        except EOFError:
            break
        if not text.strip():
            break
        for event in agent.stream_events_of_turn(text):
            printer.event(event)
    return 0


def add_parser(sub: Any) -> None:
    """Add ``chat`` to the ``moss-agent`` subcommands."""
    p = sub.add_parser("chat", help="chat with MOSS and its plugins in the terminal")
    add_model_options(p, required=True)
    add_sampling_options(p)
    p.add_argument("--session", help="keep the conversation under this name in --db")
    p.add_argument("--db", default="moss-agent.sqlite3", help="SQLite file for --session")
    p.set_defaults(func=_cmd_chat)
