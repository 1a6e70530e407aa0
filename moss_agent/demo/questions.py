"""Questions the demonstration model never trained on: the held-out evaluation set and the demo's script.

Both come from the test split (see :func:`~moss_agent.demo.corpus.split_of`), and each carries what a right answer
is: the exact commands segment, the results the tools give for it, and the text a right reply must contain (the
result digit for digit, each solution, the found entry, the user's name, one of the chat replies).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from moss_agent.demo.corpus import corpus, evaluate_expression, search_snippets, split_of
from moss_agent.demo.data import KINDS, chat_replies, sample_turns
from moss_agent.protocol import format as fmt

__all__ = ["DEMO_PLUGINS", "DemoQuestion", "demo_script", "held_out_questions"]

DEMO_PLUGINS: tuple[str, ...] = ("search", "calculator", "solver")
"""The plugin switches questions are asked under (the demo's too)."""


@dataclass(frozen=True)
class DemoQuestion:
    r"""A held-out question and what a right answer looks like.

    Attributes:
        kind: One of :data:`~moss_agent.demo.data.KINDS`.
        system: The system text (meta instruction and switches) to ask it under.
        history: Earlier turns (memory and follow-up questions have one).
        human: The question.
        command: The expected commands segment content, e.g. ``Calculate("12*7")``; None for no command.
        results: The raw results body the tools give for the expected command (``" None"`` for none).
        accept: A right reply contains one of these (the result, the name, a chat reply).
    """

    kind: str
    system: str
    history: tuple[fmt.MossTurn, ...]
    human: str
    command: str | None
    results: str
    accept: tuple[str, ...]


def held_out_questions(n: int = 100, *, seed: int = 1, kinds: Sequence[str] = KINDS) -> list[DemoQuestion]:
    """``n`` distinct test-split questions of each kind in ``kinds``, asked with :data:`DEMO_PLUGINS` on.

    Args:
        n: Questions per kind (the test split has a few hundred distinct questions of each kind).
        seed: Seed of the generator.
        kinds: Which kinds.

    Raises:
        ValueError: If the test split has fewer than ``n`` distinct questions of a kind.
    """
    rng = random.Random(f"moss-demo-questions-{seed}")
    system = fmt.system_prompt(DEMO_PLUGINS)
    out: list[DemoQuestion] = []
    for kind in kinds:
        seen: set[str] = set()
        tries = 0
        while len(seen) < n:
            tries += 1
            if tries > 50 * n + 1000:
                raise ValueError(f"the test split has fewer than {n} distinct {kind} questions")
            turns = sample_turns(rng, kind, True, "test")
            last = turns[-1]
            asked = "\n".join(t.turn.human for t in turns)
            if any(split_of(t.key) != "test" for t in turns) or asked in seen:
                continue
            seen.add(asked)
            accept = last.accept or ((last.answer,) if last.answer else ())
            history = tuple(t.turn for t in turns[:-1])
            out.append(DemoQuestion(kind, system, history, last.turn.human, last.command, last.turn.results, accept))
    return out


# ---------------------------------------------------------------- the demo's script


def _calc(human: str, expr: str) -> tuple[str, str | None, tuple[str, ...]]:
    return human, f'Calculate("{expr}")', (str(evaluate_expression(expr)),)


def _chat(human: str) -> tuple[str, str | None, tuple[str, ...]]:
    return human, None, chat_replies(human)


def demo_script() -> list[list[tuple[str, str | None, tuple[str, ...]]]]:
    """The conversations ``moss-agent demo`` runs: lists of ``(question, expected command, accepted replies)``.

    Every question is from the test split (a held-out name, for search and memory; a held-out pair of turns, for
    the follow-up), so the transcript shows the model on questions it never saw.
    """
    searched, user = corpus("test")[3], corpus("test")[7]
    first = _calc("What is 4*5939?", "4*5939")
    return [
        [_chat("Hello! How are you today?")],
        [first, _calc("And that plus 99?", f"{first[2][0]}+99")],
        [("Solve 3x+7=25.", 'Solve("3x+7=25")', ("x = 6",))],
        [(f"Who is {searched}?", f'Search("{searched}")', (search_snippets(searched, 1)[0][:-1],))],
        [_calc("I buy 23 tickets at 17 dollars each. How much do I pay?", "23*17")],
        [(f"My name is {user}.", None, (user,)), ("What is my name?", None, (user,))],
        [_chat("Many thanks!")],
    ]
