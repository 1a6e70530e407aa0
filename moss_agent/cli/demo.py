"""``moss-agent demo``: plugin conversations end to end, on the shipped demonstration model or ``--model``.

By default it runs the tiny demonstration model shipped with the package (``moss_agent/demo/weights``, trained
by ``python -m moss_agent.demo.train``) through the real engine, plugin protocol, parser and tools, on a script
of questions it never saw, offline. Output: one line for the load, then each turn with its parts marked::

    You       What is 4*5939?
    thoughts  I need the calculator for this.
    command   Calculate("4*5939")
    result    '23756'
    MOSS      The result is 23756.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, TextIO

from moss_agent.cli import PLUGIN_KEYS, add_model_options
from moss_agent.cli.chat import add_sampling_options, make_agent

__all__ = ["Transcript", "add_parser", "load_line"]

QUESTIONS = ("Hello! Who are you?", "What is 37 * 12 + 5?", "Solve 3x + 7 = 25.")
"""The questions for ``--model`` when none are given (one conversation)."""
DIM, BOLD, RESET = "\033[2m", "\033[1m", "\033[0m"


def load_line(engine: Any, name: str, seconds: float) -> str:
    """One line on the loaded model: name, precision, device, memory (parameters and their bytes), load time."""
    model = getattr(engine, "model", None)
    params = list(model.parameters()) if model is not None and hasattr(model, "parameters") else []
    if not params:
        return f"model {name} · {type(engine).__name__} · loaded in {seconds:.1f} s"
    count = sum(p.numel() for p in params)
    size = sum(p.numel() * p.element_size() for p in params)
    dtype = str(params[0].dtype).removeprefix("torch.")
    devices = ",".join(sorted({str(p.device) for p in params}))
    return (
        f"model {name} · {dtype} · {devices} · {size / 2**20:.1f} MiB for {count / 1e6:.2f} M parameters "
        f"· loaded in {seconds:.1f} s"
    )


class Transcript:
    """Writes each turn of a conversation with its parts marked: You, thoughts, command, result, MOSS.

    Args:
        out: Where to write.
        color: Dim the agent's inner parts and bold the speakers (a terminal).
    """

    WIDTH = 10

    def __init__(self, out: TextIO, color: bool) -> None:
        self.out = out
        self.dim, self.bold, self.reset = (DIM, BOLD, RESET) if color else ("", "", "")

    def _line(self, label: str, text: str, style: str) -> None:
        self.out.write(f"{style}{label:<{self.WIDTH}}{text}{self.reset}\n")
        self.out.flush()

    def turn(self, agent: Any, question: str) -> str:
        """Run one turn of ``agent`` on ``question``, writing it as it streams; returns the reply."""
        self.out.write("\n")
        self._line("You", question, self.bold)
        reply: list[str] = []
        for event in agent.stream_events_of_turn(question):
            kind, data = event.type, event.data
            if kind == "thoughts" and data != "None":
                self._line("thoughts", data, self.dim)
            elif kind == "command":
                self._line("command", data.text, self.dim)
            elif kind == "result":
                text = (data.error or data.output).strip().replace("\n", " | ")
                self._line("result", text[:300], self.dim)
            elif kind == "reply":
                if not reply:
                    self.out.write(f"{self.bold}{'MOSS':<{self.WIDTH}}{self.reset}")
                reply.append(data)
                self.out.write(data)
                self.out.flush()
        if not reply:
            self.out.write(f"{self.bold}{'MOSS':<{self.WIDTH}}{self.reset}")
        self.out.write("\n")
        self.out.flush()
        return "".join(reply)


def _cmd_demo(args: argparse.Namespace) -> int:
    shipped = args.model is None
    if shipped:
        from moss_agent.demo import demo_checkpoint
        from moss_agent.demo.corpus import DemoSearchBackend
        from moss_agent.demo.questions import DEMO_PLUGINS, demo_script

        model = str(demo_checkpoint())
        if args.plugins in ("auto", ",".join(PLUGIN_KEYS)):
            args.plugins = ",".join(DEMO_PLUGINS)  # the switches the demonstration model was trained with
        args.search_backend = DemoSearchBackend()  # the made-up corpus it learned to search
        script = [[q] for q in args.questions] or [[q for q, _, _ in conv] for conv in demo_script()]
        name = "moss-demo (the tiny demonstration model shipped with moss-agent; --model PATH for MOSS)"
    else:
        model, script, name = args.model, [list(args.questions or QUESTIONS)], args.model
    args.temperature = 0.0
    from transformers.utils import logging

    logging.disable_progress_bar()  # the load line says it all
    start = time.perf_counter()
    agent = make_agent(args, model)
    engine = agent.chat.get_engine()  # load now, for the load line
    print(load_line(engine, name, time.perf_counter() - start), flush=True)
    transcript = Transcript(sys.stdout, sys.stdout.isatty())
    for conversation in script:
        agent.reset()  # the demonstration model learned short dialogues: one conversation each
        for question in conversation:
            transcript.turn(agent, question)
    return 0


def add_parser(sub: Any) -> None:
    """Add ``demo`` to the ``moss-agent`` subcommands."""
    p = sub.add_parser("demo", help="run plugin conversations end to end (shipped demonstration model by default)")
    add_model_options(p, required=False)
    add_sampling_options(p)
    p.add_argument("questions", nargs="*", help="questions to ask instead of the built-in script")
    p.set_defaults(func=_cmd_demo)
