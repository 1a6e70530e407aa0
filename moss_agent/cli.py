"""The ``moss-agent`` command: plan, chat, demo, convert and serve.

``moss-agent plan MODEL`` prints the load plan without reading a weight; ``moss-agent chat --model M`` chats in
the terminal with MOSS's plugins; ``moss-agent demo`` runs a plugin conversation end to end on the small
demonstration model that the project trains itself (or on ``--model``); ``moss-agent convert`` writes a standard
GPT-J / CodeGen checkpoint for serving engines; ``moss-agent serve`` runs the OpenAI-compatible backend.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, TextIO

__all__ = ["main"]

PLUGIN_KEYS = ("search", "calculator", "solver", "text2image")
DIM, RESET = "\033[2m", "\033[0m"


class _Printer:
    """Writes agent events: inner thoughts, commands and results dimmed, the reply plain."""

    def __init__(self, out: TextIO, color: bool) -> None:
        self.out = out
        self.dim, self.reset = (DIM, RESET) if color else ("", "")

    def side(self, label: str, text: str) -> None:
        self.out.write(f"{self.dim}[{label}] {text}{self.reset}\n")
        self.out.flush()

    def event(self, event: Any) -> None:
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


def _tools(keys: Sequence[str], args: argparse.Namespace) -> list[Any]:
    from moss_agent.tools import make_tools

    return make_tools(keys, output_dir=getattr(args, "image_dir", None))


def _plugin_keys(text: str) -> list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in PLUGIN_KEYS]
    if unknown:
        raise SystemExit(f"unknown plugin(s) {unknown}; choose from {', '.join(PLUGIN_KEYS)}")
    return keys


def _cmd_plan(args: argparse.Namespace) -> int:
    from moss_agent.hardware import Hardware, inspect_hardware
    from moss_agent.loading import plan_load

    if args.gpus is not None or args.cpu_gib is not None:
        gpus = tuple(float(g) for g in args.gpus.split(",") if g) if args.gpus else ()
        hardware = Hardware.simulated(gpu_gib=gpus, cpu_gib=args.cpu_gib or 24.0)
    else:
        hardware = inspect_hardware()
    plan = plan_load(args.model, hardware, precision=args.precision)
    print(plan.describe())
    return 0


def _agent(args: argparse.Namespace, model: str) -> Any:
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
        from moss_agent.memory_store import SQLiteStore

        # Both plugin passes generate, and the results come in between: keep room for all of it.
        memory = TokenBudgetMemory.for_engine(
            chat.get_engine(),
            max_new_tokens=2 * args.max_new_tokens,
            reserve_tokens=256,
            store=SQLiteStore(args.db),
            session_id=args.session,
        )
    return MossAgent(chat, tools=_tools(_plugin_keys(args.plugins), args), memory=memory)


def _cmd_chat(args: argparse.Namespace) -> int:
    printer = _Printer(sys.stdout, sys.stdout.isatty())
    print(f"Loading {args.model} ...", file=sys.stderr)
    agent = _agent(args, args.model)
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


def _demo_questions() -> list[str]:
    """Questions the demonstration model never saw verbatim: one calculator, solver, search and chat question."""
    from moss_agent.demo_data import held_out_questions

    return [q.human for q in held_out_questions(1, kinds=("calculator", "solver", "search", "chat"))]


def _cmd_demo(args: argparse.Namespace) -> int:
    printer = _Printer(sys.stdout, sys.stdout.isatty())
    model, questions = args.model, list(args.questions)
    if model is None:
        from moss_agent.demo_model import demo_checkpoint

        print(
            "moss-agent demo: this runs a TINY DEMONSTRATION MODEL (0.6 M parameters) that moss-agent trains\n"
            "on its own synthetic MOSS dialogues (seeded, on this CPU, cached), so that the real engine, plugin\n"
            "protocol, parser and tools run end to end offline. Its answers are only as good as that.\n"
            "For a real MOSS checkpoint: moss-agent demo --model fnlp/moss-moon-003-sft-plugin (or a directory)\n",
            file=sys.stderr,
        )
        model = str(demo_checkpoint(progress=_training_progress()))
        questions = questions or _demo_questions()
        if args.plugins == ",".join(PLUGIN_KEYS):
            args.plugins = "search,calculator,solver"  # the switches the demonstration model was trained with
    args.temperature = 0.0
    agent = _agent(args, model)
    if args.model is None:
        from moss_agent.demo_data import DemoSearchBackend

        for tool in agent.tools:
            if tool.name == "Search":
                tool.backend = DemoSearchBackend()  # the made-up corpus the demo model learned to search
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``moss-agent``."""
    parser = argparse.ArgumentParser(prog="moss-agent", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    plan = sub.add_parser("plan", help="print the load plan for a checkpoint on this (or described) hardware")
    plan.add_argument("model", help="checkpoint directory or hub id")
    plan.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16", "int8", "int4"])
    plan.add_argument("--gpus", help="plan for GPUs of these free GiB instead, e.g. 24,24")
    plan.add_argument("--cpu-gib", type=float, help="plan for this much CPU RAM instead")
    plan.set_defaults(func=_cmd_plan)

    for name, func, helptext in (
        ("chat", _cmd_chat, "chat with MOSS and its plugins in the terminal"),
        ("demo", _cmd_demo, "run a plugin conversation end to end (tiny demonstration model by default)"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--model", required=name == "chat", help="checkpoint directory or hub id")
        p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16", "int8", "int4"])
        p.add_argument("--plugins", default=",".join(PLUGIN_KEYS), help="comma-separated: " + ",".join(PLUGIN_KEYS))
        p.add_argument("--temperature", type=float, default=0.7)
        p.add_argument("--max-new-tokens", type=int, default=256)
        p.add_argument("--image-dir", help="where Text2Image saves pictures")
        p.set_defaults(func=func)
        if name == "chat":
            p.add_argument("--session", help="keep the conversation under this name in --db")
            p.add_argument("--db", default="moss-agent.sqlite3", help="SQLite file for --session")
        else:
            p.add_argument("questions", nargs="*", help="questions to ask instead of the built-in script")
    from moss_agent.convert import add_convert_parser
    from moss_agent.server import add_serve_parser

    add_convert_parser(sub)
    add_serve_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``moss-agent`` console script."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
