"""How the demonstration model does on questions it never saw: ``python -m moss_agent.demo.evaluate [PATH]``.

Questions go through the real engine with greedy decoding, in the two plugin passes the agent runs. Pass 1 is
scored on its commands segment (exactly the expected command, or none); pass 2 gets the results the tools give
for the right command and is scored on whether the reply states the answer exactly: a number digit for digit
(not as part of a longer number), each solution, the found entry, the user's name, one of the chat replies.
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from moss_agent.demo.data import KINDS
from moss_agent.demo.questions import held_out_questions
from moss_agent.protocol import format as fmt

__all__ = ["DemoReport", "evaluate_demo_model", "main", "states"]


def states(reply: str, answer: str) -> bool:
    """Whether ``reply`` states ``answer``; a number counts only whole (``2375`` is not in ``23756``)."""
    return re.search(rf"(?<![\d.]){re.escape(answer)}(?!\.?\d)", reply) is not None


@dataclass
class DemoReport:
    """How a demonstration model does on held-out questions.

    Attributes:
        n: Questions per kind.
        command: Per kind, the share of exactly right commands segments (none where no tool is needed).
        reply: Per kind, the share of replies (after the right results) that state the answer.
        failures: Per kind, up to five wrong answers as (question, commands, reply).
        seconds: Wall time of the evaluation.
    """

    n: int
    command: dict[str, float] = field(default_factory=dict)
    reply: dict[str, float] = field(default_factory=dict)
    failures: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)
    seconds: float = 0.0

    def __str__(self) -> str:
        lines = [f"{'kind':<12}{'command':>9}{'reply':>8}   ({self.n} held-out questions per kind, greedy)"]
        return "\n".join(lines + [f"{k:<12}{self.command[k]:>9.0%}{self.reply[k]:>8.0%}" for k in self.command])


def evaluate_demo_model(
    path: str | Path,
    n: int = 100,
    *,
    seed: int = 1,
    kinds: Sequence[str] = KINDS,
    batch: int = 25,
) -> DemoReport:
    """Ask a checkpoint ``n`` held-out questions of each kind and score its commands and replies.

    Args:
        path: A checkpoint directory (the shipped one is :func:`moss_agent.demo.demo_checkpoint`).
        n: Questions per kind.
        seed: Seed of :func:`moss_agent.demo.questions.held_out_questions`.
        kinds: Which kinds of question.
        batch: Prompts generated together.
    """
    from moss_agent.engines.base import SamplingParams
    from moss_agent.engines.transformers import TransformersEngine
    from moss_agent.protocol.stream import parse_pass1, parse_reply

    start = time.perf_counter()
    engine = TransformersEngine.from_pretrained(path, precision="fp32", device_map="cpu")
    params = SamplingParams(max_new_tokens=96, do_sample=False, temperature=0.0, repetition_penalty=1.0)
    questions = held_out_questions(n, seed=seed, kinds=kinds)

    def run(prompts: list[str], stop: str) -> list[str]:
        stopping = params.with_(stop_tokens=(stop,))
        chunks = (engine.generate_batch(prompts[i : i + batch], stopping) for i in range(0, len(prompts), batch))
        return [g.text for chunk in chunks for g in chunk]

    prompts = [fmt.plugin_pass1_prompt(q.system, q.history, q.human) for q in questions]
    pass1 = [parse_pass1(text) for text in run(prompts, fmt.EOC)]
    prompts = [
        fmt.plugin_pass2_prompt(p, r.inner_thoughts, r.commands_text, q.results)
        for p, r, q in zip(prompts, pass1, questions, strict=True)
    ]
    replies = [parse_reply(text).text for text in run(prompts, fmt.EOM)]
    report = DemoReport(n)
    for kind in kinds:
        rows = [i for i, q in enumerate(questions) if q.kind == kind]
        command = [pass1[i].commands_text == (questions[i].command or fmt.NONE) for i in rows]
        reply = [any(states(replies[i], a) for a in questions[i].accept) for i in rows]
        report.command[kind], report.reply[kind] = sum(command) / n, sum(reply) / n
        wrong = [i for i, c, r in zip(rows, command, reply, strict=True) if not (c and r)]
        report.failures[kind] = [(questions[i].human, pass1[i].commands_text, replies[i]) for i in wrong[:5]]
    report.seconds = time.perf_counter() - start
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: evaluate a checkpoint (the shipped one by default) and print the report."""
    parser = argparse.ArgumentParser(prog="python -m moss_agent.demo.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("path", nargs="?", help="checkpoint directory (default: the shipped weights)")
    parser.add_argument("-n", type=int, default=100, help="questions per kind")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--failures", action="store_true", help="print up to five wrong answers per kind")
    args = parser.parse_args(argv)
    if args.path is None:
        from moss_agent.demo import demo_checkpoint

        args.path = demo_checkpoint()
    report = evaluate_demo_model(args.path, args.n, seed=args.seed)
    print(report)
    print(f"({report.seconds:.0f} s)")
    for kind, rows in report.failures.items() if args.failures else ():
        for row in rows:
            print(kind, *(repr(x) for x in row), sep="  ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
