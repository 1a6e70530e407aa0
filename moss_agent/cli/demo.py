"""``moss-agent demo``: a plugin conversation end to end, on the demonstration model or ``--model``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from moss_agent.cli import PLUGIN_KEYS, add_model_options
from moss_agent.cli.chat import Printer, add_sampling_options, make_agent

__all__ = ["add_parser"]


def _demo_questions() -> list[str]:
    """Questions the demonstration model never saw verbatim: one calculator, solver, search and chat question."""
    from moss_agent.demo.data import held_out_questions

    return [q.human for q in held_out_questions(1, kinds=("calculator", "solver", "search", "chat"))]


def _cmd_demo(args: argparse.Namespace) -> int:
    printer = Printer(sys.stdout, sys.stdout.isatty())
    model, questions = args.model, list(args.questions)
    if model is None:
        from moss_agent.demo.model import demo_checkpoint

        print(
            "moss-agent demo: this runs a TINY DEMONSTRATION MODEL (0.6 M parameters) that moss-agent trains\n"
            "on its own synthetic MOSS dialogues (seeded, on this CPU, cached), so that the real engine, plugin\n"
            "protocol, parser and tools run end to end offline. Its answers are only as good as that.\n"
            "For a real MOSS checkpoint: moss-agent demo --model fnlp/moss-moon-003-sft-plugin (or a directory)\n",
            file=sys.stderr,
        )
        model = str(demo_checkpoint(progress=_training_progress()))
        questions = questions or _demo_questions()
        if args.plugins in ("auto", ",".join(PLUGIN_KEYS)):
            args.plugins = "search,calculator,solver"  # the switches the demonstration model was trained with
        from moss_agent.demo.data import DemoSearchBackend

        args.search_backend = DemoSearchBackend()  # the made-up corpus the demo model learned to search
    args.temperature = 0.0
    agent = make_agent(args, model)
    for question in questions or ["Hello! Who are you?", "What is 37 * 12 + 5?", "Solve 3x + 7 = 25."]:
        print(f"> {question}")
        if args.model is None:
            agent.reset()  # the demonstration model learned short dialogues: one conversation per question
        for event in agent.stream_events_of_turn(question):
            printer.event(event)
    return 0


def _training_progress() -> Any:
    """Prints training progress now and then (the first run trains the demonstration model)."""
    import time

    start = time.monotonic()
    last = [0.0]

    def report(step: int, steps: int, loss: float) -> None:
        now = time.monotonic()
        if step == 1 or step == steps or now - last[0] > 10:
            last[0] = now
            print(
                f"  training the demonstration model: step {step}/{steps}, loss {loss:.3f}, {now - start:.0f} s",
                file=sys.stderr,
            )

    return report


def add_parser(sub: Any) -> None:
    """Add ``demo`` to the ``moss-agent`` subcommands."""
    p = sub.add_parser("demo", help="run a plugin conversation end to end (tiny demonstration model by default)")
    add_model_options(p, required=False)
    add_sampling_options(p)
    p.add_argument("questions", nargs="*", help="questions to ask instead of the built-in script")
    p.set_defaults(func=_cmd_demo)
