"""What the demonstration model's tools know: Python arithmetic, a made-up search corpus, and the train/test split.

Results are honest: ``Calculate`` results are Python's (the release's recorded results are Python's too, ``'36'``,
``'22000.0'``), and ``Search`` looks names up in a corpus of made-up people that is a pure function of a seed, so
the real tools print what the model saw in training. Questions fall into a train or a test split by a stable hash
of their text (of the made-up name, for search and memory): held-out search questions ask about people the model
has never seen.
"""

from __future__ import annotations

import ast
import functools
import operator
import random
import re
import zlib
from collections.abc import Callable
from typing import Any, Literal

__all__ = [
    "DemoSearchBackend",
    "Split",
    "corpus",
    "evaluate_expression",
    "made_up_name",
    "search_snippets",
    "split_of",
]

Split = Literal["train", "test"]

_TEST_BUCKETS = 5  # one text in five belongs to the test split


def split_of(key: str) -> Split:
    """The split a question (or made-up name) belongs to, by a stable hash of its text."""
    return "test" if zlib.crc32(key.encode()) % _TEST_BUCKETS == 0 else "train"


# ---------------------------------------------------------------- honest arithmetic

_OPS: dict[type, Callable[[Any, Any], Any]] = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}
_OPS[ast.Div] = operator.truediv


def evaluate_expression(expr: str) -> int | float | None:
    """Python's value of an arithmetic expression (numbers, ``+ - * /``, parentheses), or None if it is not one.

    Never evaluates anything else: the expression is walked as an AST.
    """

    def walk(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        raise ValueError("not arithmetic")

    try:
        return walk(ast.parse(expr, mode="eval").body)  # type: ignore[no-any-return]
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return None


# ---------------------------------------------------------------- the made-up search corpus

_SYLLABLES = (
    "zor bax quin vel mor tash kel dun ari bo lin fen rok sa thi mur pel gan osh ru "
    "vi dra lo mek nal tor is ka ven jul bren cor hal im pry wex yul gor ta ne"
).split()
_ROLES = (
    "painter", "chemist", "sailor", "poet", "baker", "astronomer", "architect", "singer",
    "farmer", "inventor", "dancer", "historian", "pilot", "sculptor", "gardener", "doctor",
)  # fmt: skip


def made_up_name(rng: random.Random, parts: int | None = None) -> str:
    """A made-up name of 2 or 3 syllables; one word, as the space token would make copying ambiguous."""
    return "".join(rng.choice(_SYLLABLES) for _ in range(parts or rng.choice((2, 3)))).capitalize()


def _fact(name: str) -> str:
    """The corpus entry of a made-up person: a function of the name, so the corpus needs no storage."""
    rng = random.Random(zlib.crc32(name.encode()))
    role = rng.choice(_ROLES)
    return f"{name} is {'an' if role[0] in 'aeiou' else 'a'} {role} from {made_up_name(rng, 2)}."


@functools.cache
def corpus(split: Split) -> tuple[str, ...]:
    """The made-up people of one split: many, so that the model learns to copy names rather than recall them."""
    rng = random.Random(2023)
    names: dict[str, None] = {}
    while len(names) < (3000 if split == "train" else 400):
        name = made_up_name(rng)
        if split_of(name) == split:
            names[name] = None
    return tuple(names)


@functools.cache
def _by_name() -> dict[str, str]:
    return {n.casefold(): n for n in corpus("train") + corpus("test")}


def search_snippets(query: str, k: int = 3) -> list[str]:
    """Search the made-up corpus: the entry of the person named in ``query`` first, then other entries.

    Returns:
        Up to ``k`` snippets, or none when nobody in the corpus is named in the query.
    """
    people = _by_name()
    hits = list(dict.fromkeys(people[w] for w in re.findall(r"\w+", query.casefold()) if w in people))
    if not hits:
        return []
    rng = random.Random(zlib.crc32(query.encode()))
    others = rng.sample(corpus("train"), k)
    return [_fact(n) for n in (hits + [o for o in others if o not in hits])[:k]]


class DemoSearchBackend:
    """A search backend over the made-up corpus for the demo's ``Search`` tool: at most two hits, as in training."""

    def search(self, query: str, k: int) -> list[Any]:
        """Hits as :class:`moss_agent.tools.search_backends.SearchHit` (title: the person's name)."""
        from moss_agent.tools.search_backends import SearchHit

        return [SearchHit(s.split(" ", 1)[0], "", s) for s in search_snippets(query, min(k, 2))]
