"""Synthetic MOSS-format dialogues for the demonstration model: calculator, solver, search, chat and memory.

Every dialogue is rendered through :mod:`moss_agent.protocol.format` and :mod:`moss_agent.protocol.plugins`, so
the model learns exactly the text the real agent writes. Results are honest: Python arithmetic for ``Calculate`` (the release's
recorded results are Python's, ``'36'``, ``'22000.0'``), exact fractions for ``Solve``, a made-up corpus for
``Search``; the real tools print the same. Questions fall into a train or a test split by a stable hash of their
text (of the made-up name, for search and memory): the model never trains on a held-out question, and held-out
search questions ask about people it has never seen.
"""

from __future__ import annotations

import ast
import functools
import operator
import random
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

from moss_agent.protocol import format as fmt
from moss_agent.protocol import plugins

__all__ = [
    "KINDS",
    "DemoDialogue",
    "DemoQuestion",
    "DemoSearchBackend",
    "Split",
    "dialogue_batches",
    "dialogues",
    "evaluate_expression",
    "held_out_questions",
    "search_snippets",
    "split_of",
    "trained_spans",
    "training_windows",
]

Split = Literal["train", "test"]
KINDS: tuple[str, ...] = ("calculator", "solver", "search", "chat", "memory", "followup")
"""Question kinds: the three plugins, plain chat, and two second turns that need the first: the user's name
(``memory``) and a calculation on the previous result (``followup``)."""

_TOOL_KEYS = plugins.TOOL_KEYS
_NEEDS = {"calculator": "calculator", "solver": "solver", "search": "search", "followup": "calculator"}
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


def _word(rng: random.Random, parts: int | None = None) -> str:
    """A made-up name of 2 or 3 syllables; one word, as the space token would make copying ambiguous."""
    return "".join(rng.choice(_SYLLABLES) for _ in range(parts or rng.choice((2, 3)))).capitalize()


def _fact(name: str) -> str:
    """The corpus entry of a made-up person: a function of the name, so the corpus needs no storage."""
    rng = random.Random(zlib.crc32(name.encode()))
    role = rng.choice(_ROLES)
    return f"{name} is {'an' if role[0] in 'aeiou' else 'a'} {role} from {_word(rng, 2)}."


@functools.cache
def _corpus(split: Split) -> tuple[str, ...]:
    """The made-up people of one split: many, so that the model learns to copy names rather than recall them."""
    rng = random.Random(2023)
    names: dict[str, None] = {}
    while len(names) < (3000 if split == "train" else 400):
        name = _word(rng)
        if split_of(name) == split:
            names[name] = None
    return tuple(names)


@functools.cache
def _by_name() -> dict[str, str]:
    return {n.casefold(): n for n in _corpus("train") + _corpus("test")}


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
    others = rng.sample(_corpus("train"), k)
    return [_fact(n) for n in (hits + [o for o in others if o not in hits])[:k]]


class DemoSearchBackend:
    """A search backend over the made-up corpus for the demo's ``Search`` tool: at most two hits, as in training."""

    def search(self, query: str, k: int) -> list[Any]:
        """Hits as :class:`moss_agent.tools.search_backends.SearchHit` (title: the person's name)."""
        from moss_agent.tools.search_backends import SearchHit

        return [SearchHit(s.split(" ", 1)[0], "", s) for s in search_snippets(query, min(k, 2))]


# ---------------------------------------------------------------- turns


@dataclass(frozen=True)
class _Turn:
    kind: str
    key: str  # what decides the split
    turn: fmt.MossTurn
    command: str | None = None
    answer: str | None = None
    accept: tuple[str, ...] = ()  # a right reply contains one of these


def _pick(rng: random.Random, options: Sequence[str]) -> str:
    return options[rng.randrange(len(options))]


def _number(rng: random.Random) -> int:
    return rng.choice((rng.randint(2, 20), rng.randint(10, 99), rng.randint(100, 999), rng.randint(1000, 9999)))


_ASK = ("What is {}?", "Calculate {}.", "How much is {}?", "Please compute {}.", "Can you work out {}?",
        "what's {}", "{} = ?", "Tell me the value of {}.", "Compute {} for me.")  # fmt: skip
_WORD_OPS = {"+": ("plus", "added to"), "-": ("minus",), "*": ("times", "multiplied by"), "/": ("divided by",)}
_ITEMS = ("apples", "books", "tickets", "pens", "boxes", "cakes", "chairs", "shirts")


def _expression(rng: random.Random) -> str:
    a, b, c = _number(rng), _number(rng), rng.randint(2, 30)
    if rng.random() < 0.65:
        op = _pick(rng, "+-*/")
        if op == "/":  # divisions that come out even, as people ask them
            a = b * rng.randint(2, 50)
        return f"{a}{op}{b}"
    o1, o2 = _pick(rng, "+-"), _pick(rng, "*/")
    if o2 == "/":
        total, b = c * rng.randint(2, 99), rng.randint(1, 99)
        a = total + b if o1 == "-" else max(total - b, 1)
        b = total - a if o1 == "+" else b
    return f"({a}{o1}{b}){o2}{c}" if rng.random() < 0.7 else f"{c}{o2.replace('/', '*')}({a}{o1}{b})"


def _calc_question(rng: random.Random) -> tuple[str, str]:
    """A question and the expression MOSS writes: the user's own expression verbatim, or a translation."""
    form = rng.random()
    if form < 0.6:
        # Written without spaces: a space is one token, and copying past several of them is ambiguous for a
        # two-layer model.
        expr = _expression(rng)
        return _pick(rng, _ASK).format(expr), expr
    a, b = _number(rng), _number(rng)
    if form < 0.75:
        op = _pick(rng, "+-*/")
        a = b * rng.randint(2, 50) if op == "/" else a
        return _pick(rng, _ASK).format(f"{a} {_pick(rng, _WORD_OPS[op])} {b}"), f"{a}{op}{b}"
    if form < 0.85:
        a = rng.randint(2, 99)
        ask = _pick(rng, ("What is the square of {}?", "What is {} squared?", "Calculate {} squared."))
        return ask.format(a), f"{a}*{a}"
    if form < 0.93:
        p = rng.choice((5, 10, 12, 15, 20, 25, 30, 40, 50, 75))
        ask = _pick(rng, ("What is {p}% of {n}?", "Calculate {p} percent of {n}.", "How much is {p}% of {n}?"))
        return ask.format(p=p, n=a), f"{a}*{p}/100"
    item, n, price = _pick(rng, _ITEMS), rng.randint(2, 40), rng.randint(2, 99)
    if rng.random() < 0.5:
        return f"I buy {n} {item} at {price} dollars each. How much do I pay?", f"{n}*{price}"
    return f"I had {price + n} {item} and gave away {n}. How many are left?", f"{price + n}-{n}"


_THOUGHTS = {
    "calculator": "I need the calculator for this.",
    "solver": "I need the equation solver for this.",
    "search": "I should search the web for this.",
    "chat": "No tool is needed.",
}
_CALC_REPLY = ("The result is {}.", "The answer is {}.", "It comes to {}.", "That is {}.")


def _tool_turn(kind: str, plugin: plugins.Plugin, human: str, arg: str, output: str, reply: str) -> fmt.MossTurn:
    """A turn with one command, its result entry (``output`` after ``=>``) and the reply."""
    command = str(fmt.Command(plugin.api or "", arg))
    entry = plugins.format_result_entry(command, output, plugin.layout)
    return fmt.MossTurn(human, reply, _THOUGHTS[kind], command, fmt.results_body([entry]))


def _calculator_turn(rng: random.Random, human: str | None = None, expr: str | None = None) -> _Turn:
    if human is None or expr is None:
        human, expr = _calc_question(rng)
    value = evaluate_expression(expr)
    shown = plugins.NO_RESULT if value is None else str(value)
    reply = _pick(rng, _CALC_REPLY).format(shown)
    turn = _tool_turn("calculator", plugins.CALCULATOR, human, expr, plugins.format_calculate(shown), reply)
    return _Turn("calculator", human, turn, turn.commands, shown)


def _solver_turn(rng: random.Random) -> _Turn:
    v = _pick(rng, "xxxyzn")
    a, b, c = rng.randint(1, 12), rng.randint(-60, 60), rng.randint(-99, 199)
    if rng.random() < 0.25:  # two equations, two unknowns, ';'-separated as MOSS writes them
        s, d = rng.randint(2, 120), rng.randint(0, 40)
        eq = f"x+y={s};x-y={d}"
        solution = [("x", Fraction(s + d, 2)), ("y", Fraction(s - d, 2))]
        human = _pick(rng, ("Solve {}.", "Solve the system {}.", "Find x and y if {}.", "What are x and y when {}?"))
    else:
        eq = f"{'' if a == 1 else a}{v}{'' if b == 0 else f'{b:+d}'}={c}"
        solution = [(v, Fraction(c - b, a))]
        human = _pick(rng, ("Solve {e}.", "Solve {e} for {v}.", "Find {v} if {e}.", "What is {v} when {e}?",
                            "Help me solve the equation {e}.", "Please solve {e}", "{e}, what is {v}?"))  # fmt: skip
    human = human.format(eq, e=eq, v=v)  # the command copies the user's equation verbatim
    values = [(name, str(val)) for name, val in solution]
    answer = " and ".join(f"{n} = {val}" for n, val in values)
    reply = _pick(rng, ("The solution is {}.", "{}.", "Solving the equation gives {}.")).format(answer)
    turn = _tool_turn("solver", plugins.EQUATION_SOLVER, human, eq, plugins.format_solve(values), reply)
    return _Turn("solver", human, turn, turn.commands, answer)


_WHO = ("Who is {}?", "Tell me about {}.", "What do you know about {}?", "Can you look up {}?",
        "Search the web for {}.", "I heard of {}. Who is that?", "who is {}", "Do you know {}?",
        "Find information about {}.", "What is {} known for?")  # fmt: skip


def _search_turn(rng: random.Random, split: Split) -> _Turn:
    known = rng.random() < 0.9
    name = _pick(rng, _corpus(split)) if known else _word(rng)
    human = _pick(rng, _WHO).format(name)
    snippets = search_snippets(name, rng.randint(1, 2))
    if snippets:  # the reply cites the first hit, as MOSS does
        reply = f"{_pick(rng, ('', 'According to the search results, '))}{snippets[0][:-1]}<sup><|1|></sup>."
    else:
        reply = f"Sorry, I could not find any information about {name}."
    turn = _tool_turn("search", plugins.WEB_SEARCH, human, name, plugins.format_search_hits(snippets), reply)
    return _Turn("search", name, turn, turn.commands, snippets[0][:-1] if snippets else "could not find")


_CHAT: tuple[tuple[Sequence[str], Sequence[str], Sequence[str]], ...] = (
    (("Hello", "Hi", "Hey", "Good morning", "Good evening", "Hello there", "Hi MOSS", "Hey MOSS", "Hi there"),
     ("!", ".", ", how are you?", "! How are you today?", "", "! Nice to meet you."),
     ("Hello! I am MOSS. How can I help you today?", "Hi! I am doing well, thank you. What can I do for you?")),
    (("Thank you", "Thanks", "Thanks a lot", "Many thanks", "Thank you very much", "Great, thanks"),
     ("!", ".", " for your help!", " MOSS.", ""),
     ("You are welcome! Is there anything else I can help you with?", "My pleasure! Feel free to ask me more.")),
    (("Who are you", "What is your name", "Who made you", "Who developed you", "What are you", "Are you a robot"),
     ("?", "", "? Tell me please."),
     ("I am MOSS, an AI assistant developed by Fudan University.",
      "My name is MOSS. I am a language model developed by Fudan University.")),
    (("What can you do", "How can you help me", "What tools do you have", "What are you good at"),
     ("?", "", "? Tell me please."),
     ("I can chat with you, do calculations, solve equations and search the web.",)),
    (("Bye", "Goodbye", "See you later", "Good night", "I have to go now"),
     ("!", ".", ", MOSS!", ""),
     ("Goodbye! Have a nice day.", "See you! Come back any time.")),
)  # fmt: skip


def _chat_turn(rng: random.Random, plugins_on: bool) -> _Turn:
    heads, tails, replies = _CHAT[rng.randrange(len(_CHAT))]
    human = _pick(rng, heads) + _pick(rng, tails)
    reply = _pick(rng, replies)
    turn = fmt.MossTurn(human, reply, _THOUGHTS["chat"], results=fmt.results_body(None)) if plugins_on else None
    return _Turn("chat", human, turn or fmt.MossTurn(human, reply), None, reply, tuple(replies))


def _memory_turns(rng: random.Random, plugins_on: bool, split: Split) -> list[_Turn]:
    """The user's name in turn 1, asked for in turn 2."""
    thoughts = _THOUGHTS["chat"] if plugins_on else fmt.NONE
    results = fmt.results_body(None, plugins_on=plugins_on)
    name = _word(rng)
    while split_of(name) != split:
        name = _word(rng)
    intro = _pick(rng, ("My name is {}.", "Hi, I am {}.", "Call me {}.", "Hello, my name is {}!")).format(name)
    hello = fmt.MossTurn(intro, f"Nice to meet you, {name}! How can I help you?", thoughts, results=results)
    ask = _pick(rng, ("What is my name?", "Do you remember my name?", "Who am I?", "What did I say my name was?"))
    answer = fmt.MossTurn(ask, f"Your name is {name}.", thoughts, results=results)
    return [_Turn("chat", name, hello), _Turn("memory", name, answer, None, name)]


def _followup_turns(rng: random.Random) -> list[_Turn]:
    """A calculation in turn 1, and in turn 2 one on its result ("Now add 5 to that.")."""
    first = _calculator_turn(rng)
    while first.answer is None or not first.answer.isdigit() or len(first.answer) > 5:
        first = _calculator_turn(rng)
    op, d = _pick(rng, "+-*"), rng.randint(2, 99)
    asks = {"+": ("Now add {} to that.", "And that plus {}?"), "-": ("Subtract {} from it.", "And that minus {}?"),
            "*": ("Multiply that by {}.", "And that times {}?")}[op]  # fmt: skip
    second = _calculator_turn(rng, _pick(rng, asks).format(d), f"{first.answer}{op}{d}")
    return [first, _Turn("followup", first.key + second.key, second.turn, second.command, second.answer)]


# ---------------------------------------------------------------- dialogues


@dataclass
class DemoDialogue:
    """One synthetic conversation and the kind of each of its turns (one of :data:`KINDS`)."""

    conversation: fmt.MossConversation
    kinds: list[str]


def _turn_of_kind(rng: random.Random, kind: str, plugins_on: bool, split: Split) -> list[_Turn]:
    if kind == "calculator":
        return [_calculator_turn(rng)]
    if kind == "solver":
        return [_solver_turn(rng)]
    if kind == "search":
        return [_search_turn(rng, split)]
    if kind == "memory":
        return _memory_turns(rng, plugins_on, split)
    if kind == "followup":
        return _followup_turns(rng)
    return [_chat_turn(rng, plugins_on)]


_WEIGHTS = {"calculator": 3.0, "solver": 2.0, "search": 4.0, "chat": 1.0, "memory": 1.5, "followup": 3.0}
_TWO_TURNS = ("memory", "followup")


def _switches(rng: random.Random) -> tuple[str, ...]:
    """Enabled plugin keys: one time in twelve none, otherwise each tool with chance 3/4."""
    if rng.random() < 1 / 12:
        return ()
    on: tuple[str, ...] = ()
    while not on:
        on = tuple(k for k in _TOOL_KEYS if rng.random() < 0.75)
    return on


def _dialogue(rng: random.Random, enabled: Sequence[str], split: Split, turns: int) -> DemoDialogue:
    """A dialogue of 1 or 2 turns that needs only the plugins ``enabled``; none is the no-plugin layout."""
    plugins_on = bool(enabled)
    pool = [k for k in _WEIGHTS if _NEEDS.get(k) in (None, *enabled)] if plugins_on else ["chat", "memory"]
    if turns == 1:
        pool = [k for k in pool if k not in _TWO_TURNS]
    made: list[_Turn] = []
    while len(made) < turns:
        kind = rng.choices(pool, [_WEIGHTS[k] for k in pool])[0]
        new = _turn_of_kind(rng, kind, plugins_on, split)
        if all(split_of(t.key) == split for t in new) and len(made) + len(new) <= turns:
            made += new
    moss_turns = [t.turn for t in made]
    if len(moss_turns) > 1 and rng.random() < 0.5:  # production compacts earlier results
        moss_turns[0] = moss_turns[0].compacted()
    system = fmt.system_prompt(sorted(enabled, key=_TOOL_KEYS.index))
    return DemoDialogue(fmt.MossConversation(system, moss_turns), [t.kind for t in made])


def dialogues(n: int | None, *, seed: int = 0, split: Split = "train") -> Iterator[DemoDialogue]:
    """Seeded synthetic dialogues of one split, each under its own random switches.

    Args:
        n: How many; None for an endless stream.
        seed: Seed of the generator.
        split: ``train`` or ``test``; a question of one split never occurs in the other.
    """
    rng = random.Random(f"moss-demo-{split}-{seed}")
    count = 0
    while n is None or count < n:
        yield _dialogue(rng, _switches(rng), split, rng.choice((1, 1, 1, 2)))
        count += 1


def dialogue_batches(size: int, *, seed: int = 0, split: Split = "train") -> Iterator[list[DemoDialogue]]:
    """An endless seeded stream of batches; the dialogues of one batch share their system text.

    Sharing it lets training run the long system text once per batch; sharing the number of turns keeps the
    padding short.
    """
    rng = random.Random(f"moss-demo-batches-{split}-{seed}")
    while True:
        enabled, turns = _switches(rng), rng.choice((1, 1, 1, 2))
        yield [_dialogue(rng, enabled, split, turns) for _ in range(size)]


def trained_spans(conversation: fmt.MossConversation) -> list[tuple[int, int]]:
    """Character spans of ``conversation.to_text()`` that the model generates (and is trained on).

    With plugins on: from after ``<|Inner Thoughts|>:`` to ``<eoc>`` (pass 1) and the reply up to ``<eom>``
    (pass 2). Without plugins, only the reply: the prompt prefills the empty segments.
    """
    spans = []
    offset = len(conversation.system)
    for turn in conversation.turns:
        text = turn.to_text()
        if conversation.plugins_on:
            start = offset + len(fmt.segment(fmt.HUMAN, turn.human)) + len(fmt.THOUGHTS) + 1
            spans.append((start, offset + text.index(fmt.EOC) + len(fmt.EOC)))
        reply_start = len(turn.prefix_text()) + len(fmt.MOSS) + 1
        spans.append((offset + reply_start, offset + len(text) - 1))  # the newline after <eom> is not generated
        offset += len(text)
    return spans


def training_windows(conversation: fmt.MossConversation) -> list[tuple[int, int]]:
    """Short character windows of ``conversation.to_text()``, each ending with one generated span.

    A pass-1 window runs from the first turn to the ``<eoc>`` of its turn; a reply window starts at its turn's
    results when a tool answered (the reply copies them), at the first turn otherwise. Training on windows
    without the long system text is cheap; copying is learnt there.
    """
    windows = []
    offset = first = len(conversation.system)
    for turn in conversation.turns:
        text = turn.to_text()
        if conversation.plugins_on:
            windows.append((first, offset + text.index(fmt.EOC) + len(fmt.EOC) + 1))
        answered = turn.results.strip() not in (fmt.NONE, "")
        results = len(turn.prefix_text()) - len(fmt.segment(fmt.RESULTS, turn.results))
        windows.append((offset + results if answered else first, offset + len(text)))
        offset += len(text)
    return windows


# ---------------------------------------------------------------- held-out questions


@dataclass(frozen=True)
class DemoQuestion:
    r"""A held-out question and what a right answer looks like.

    Attributes:
        kind: One of :data:`KINDS`.
        system: The system text (meta instruction and switches) to ask it under.
        history: Earlier turns (memory questions have one).
        human: The question.
        command: The expected commands segment content, e.g. ``Calculate("12*7")``; None for no command.
        results: The raw results body the tools give for the expected command (``"\nNone\n"`` for none).
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
    """``n`` test-split questions of each kind in ``kinds``, asked with the three trained tools switched on.

    Questions are distinct while the test split has enough of them (it has a few dozen plain chat questions).

    Args:
        n: Questions per kind.
        seed: Seed of the generator.
        kinds: Which kinds.
    """
    rng = random.Random(f"moss-demo-questions-{seed}")
    system = fmt.system_prompt(["search", "calculator", "solver"])
    out: list[DemoQuestion] = []
    for kind in kinds:
        seen: list[str] = []
        tries = 0
        while len(seen) < n:
            turns = _turn_of_kind(rng, kind, True, "test")
            last, tries = turns[-1], tries + 1
            if any(split_of(t.key) != "test" for t in turns) or (last.turn.human in seen and tries < 50 * n):
                continue
            seen.append(last.turn.human)
            accept = last.accept or ((last.answer,) if last.answer else ())
            history = tuple(t.turn for t in turns[:-1])
            out.append(DemoQuestion(kind, system, history, last.turn.human, last.command, last.turn.results, accept))
    return out
