"""``moss-agent chat``: MOSS with its plugins in the terminal; the agent and the printer ``demo`` shares.

On a terminal: line editing and history (readline; the history is kept in the user data folder), the reply
rendered as Markdown (rich), inner thoughts, commands and results dimmed. Piped: plain text, no prompt. Lines
starting with ``/`` are commands (``/help``); Ctrl-C stops an answer, and Ctrl-C or Ctrl-D at the prompt leaves.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from moss_agent import settings
from moss_agent.cli import add_model_options, data_dir, default_db

__all__ = ["ChatLoop", "Printer", "add_parser", "add_sampling_options", "make_agent"]

DIM, RESET = "\033[2m", "\033[0m"
HELP = """Commands:
  /help      this help
  /plugins   the plugins and whether they are on
  /session   the session this conversation is kept in
  /reset     forget this conversation (its stored turns too)
  /quit      leave (or Ctrl-D)
Ctrl-C stops an answer; Up and Down recall earlier lines."""


class Printer:
    """Writes agent events: inner thoughts, commands and results dimmed, the reply plain or as Markdown.

    Args:
        out: Where to write.
        color: Dim the side lines with ANSI codes (a terminal).
        markdown: Render the reply as Markdown with rich while it streams; by default when ``color`` is on and
            rich is installed.
    """

    def __init__(self, out: TextIO, color: bool, markdown: bool | None = None) -> None:
        self.out = out
        self.dim, self.reset = (DIM, RESET) if color else ("", "")
        if markdown is None:
            import importlib.util

            markdown = color and importlib.util.find_spec("rich") is not None
        self.markdown = markdown
        self._text = ""
        self._live: Any = None

    def side(self, label: str, text: str) -> None:
        """Write a dimmed side line (thoughts, a command, a result)."""
        self.out.write(f"{self.dim}[{label}] {text}{self.reset}\n")
        self.out.flush()

    def _reply(self, text: str) -> None:
        if not self.markdown:
            self.out.write(text)
            self.out.flush()
            return
        from rich.console import Console
        from rich.live import Live
        from rich.markdown import Markdown

        self._text += text
        if self._live is None:
            console = Console(file=self.out, force_terminal=True)
            self._live = Live(console=console, auto_refresh=False, vertical_overflow="visible")
            self._live.start()
        self._live.update(Markdown(self._text), refresh=True)

    def end(self) -> None:
        """End the reply (after the last delta, or when it was stopped)."""
        if self._live is not None:
            self._live.stop()
            self._live = None
        elif not self.markdown or self._text:
            self.out.write("\n")
        self._text = ""
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
            self._reply(data)
        elif kind == "turn":
            self.end()


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    """``--temperature`` and ``--max-new-tokens``."""
    p.add_argument("--temperature", type=float, default=settings.TEMPERATURE, help="0 for greedy decoding")
    p.add_argument("--max-new-tokens", type=int, default=settings.MAX_NEW_TOKENS, help="tokens per model pass")


def _chat_model(args: argparse.Namespace, model: str) -> Any:
    from moss_agent.chat_model import ChatMoss

    return ChatMoss(
        model=model,
        precision=args.precision,
        adapter=getattr(args, "adapter", None),
        temperature=args.temperature,
        do_sample=args.temperature > 0,
        max_tokens=args.max_new_tokens,
    )


def make_agent(args: argparse.Namespace, model: str, tools: list[Any] | None = None) -> Any:
    """The MossAgent the parsed options describe (memory in ``--db`` under ``--session`` when given).

    Args:
        args: The parsed options.
        model: The checkpoint.
        tools: The plugin tools; by default made from the options (each checked, see ``cli.plugins``).
    """
    from moss_agent.agent import MossAgent
    from moss_agent.cli.plugins import make_plugin_tools

    if tools is None:
        tools = make_plugin_tools(args)
    chat = _chat_model(args, model)
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
    return MossAgent(chat, tools=tools, memory=memory)


class ChatLoop:
    """The terminal conversation: reads lines, runs turns, answers ``/`` commands.

    Args:
        agent: The MossAgent.
        printer: Writes the turns.
        read: Returns the next line (raises EOFError at the end, KeyboardInterrupt on Ctrl-C).
        say: Writes a status line (stderr).
        session: ``(name, db path)`` of a stored session, or None.
        notes: What the plugin checks said at start (``/plugins`` repeats it).
    """

    def __init__(
        self,
        agent: Any,
        printer: Printer,
        read: Callable[[], str],
        say: Callable[[str], None],
        session: tuple[str, str] | None = None,
        notes: list[str] | None = None,
    ) -> None:
        self.agent, self.printer, self.read, self.say, self.session = agent, printer, read, say, session
        self.notes = notes or []

    def run(self) -> int:
        """Until /quit, Ctrl-D or Ctrl-C at the prompt; returns the exit status (0)."""
        while True:
            try:
                line = self.read().strip()
            except (EOFError, KeyboardInterrupt):
                self.say("")
                return 0
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return 0
                continue
            self.turn(line)

    def turn(self, text: str) -> None:
        """One turn; Ctrl-C stops it (nothing of it is kept)."""
        events = self.agent.stream_events_of_turn(text)
        try:
            for event in events:
                self.printer.event(event)
        except KeyboardInterrupt:
            events.close()
            self.printer.end()
            self.say("[stopped]")

    def command(self, line: str) -> bool:
        """Run a ``/`` command; False to leave."""
        name = line.split()[0].lower()
        if name in ("/quit", "/exit", "/q"):
            return False
        if name == "/help":
            self.say(HELP)
        elif name == "/reset":
            self.agent.reset()
            self.say("Conversation cleared" + (" (its stored turns too)." if self.session else "."))
        elif name == "/plugins":
            on = [t.name for t in self.agent.tools]
            head = "Plugins on: " + (", ".join(on) or "none") + " (choose with --plugins at start)"
            self.say("\n".join([head, *self.notes]))
        elif name == "/session":
            if self.session is None:
                self.say("No session: this conversation is not kept. Start with --session NAME to keep it.")
            else:
                turns = len(self.agent.memory) if self.agent.memory is not None else 0
                self.say(f"Session {self.session[0]!r} in {self.session[1]}: {turns} turn{'' if turns == 1 else 's'}.")
        else:
            self.say(f"Unknown command {name}: /help lists them.")
        return True


def _line_reader(interactive: bool) -> tuple[Callable[[], str], Callable[[], None]]:
    """``input`` with readline's line editing and a kept history on a terminal; plain ``input`` otherwise."""
    if not interactive:
        return (lambda: input()), (lambda: None)
    try:
        import readline
    except ImportError:  # Windows without pyreadline: plain input still works
        return (lambda: input("> ")), (lambda: None)
    history = data_dir() / "chat_history"
    try:
        readline.read_history_file(history)
    except OSError:
        pass
    readline.set_history_length(1000)

    def save() -> None:
        try:
            history.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(history)
        except OSError:
            pass

    return (lambda: input("> ")), save


def _cmd_chat(args: argparse.Namespace) -> int:
    from moss_agent.cli.plugins import make_plugin_tools

    def say(text: str) -> None:
        print(text, file=sys.stderr)

    notes: list[str] = []
    tools = make_plugin_tools(args, notes=notes)  # says which plugins cannot work, before minutes of loading
    say(f"Loading {args.model} ...")
    agent = make_agent(args, args.model, tools)
    agent.chat.get_engine()  # load now, not in the middle of the first answer
    session = None
    if args.session:
        session = (args.session, str(Path(args.db)))
        turns = len(agent.memory)
        plural = "" if turns == 1 else "s"
        say(f"Session {args.session!r}: resumed {turns} turn{plural}." if turns else f"Session {args.session!r}: new.")
    interactive = sys.stdin.isatty()
    read, save = _line_reader(interactive)
    say("Ready. /help for commands; /quit or Ctrl-D to leave." if interactive else "Ready.")
    printer = Printer(sys.stdout, sys.stdout.isatty())
    try:
        return ChatLoop(agent, printer, read, say, session, notes).run()
    finally:
        save()


def add_parser(sub: Any) -> None:
    """Add ``chat`` to the ``moss-agent`` subcommands."""
    p = sub.add_parser("chat", help="chat with MOSS and its plugins in the terminal")
    add_model_options(p, required=True)
    add_sampling_options(p)
    p.add_argument("--session", help="keep the conversation under this name in --db (resumed when it exists)")
    p.add_argument("--db", default=default_db(), help="SQLite file for --session")
    p.set_defaults(func=_cmd_chat)
