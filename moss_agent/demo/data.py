"""Synthetic MOSS-format dialogues for the demonstration model: calculator, solver, search, chat and memory.

Every dialogue is rendered through :mod:`moss_agent.protocol.format` and :mod:`moss_agent.protocol.plugins`, so
the model learns exactly the text the real agent writes, with the results of :mod:`moss_agent.demo.corpus` (Python
arithmetic, exact fractions for ``Solve``, the made-up search corpus). A turn belongs to the train or the test
split by its text (see :func:`~moss_agent.demo.corpus.split_of`): training never sees a held-out question.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction

from moss_agent.demo.corpus import Split, corpus, evaluate_expression, made_up_name, search_snippets, split_of
from moss_agent.protocol import format as fmt
from moss_agent.protocol import plugins

__all__ = [
    "KINDS",
    "DemoDialogue",
    "DemoTurn",
    "chat_replies",
    "dialogue_batches",
    "dialogues",
    "sample_turns",
    "trained_spans",
    "training_windows",
]

KINDS: tuple[str, ...] = ("calculator", "solver", "search", "chat", "memory", "followup")
"""Question kinds: the three plugins, plain chat, and two second turns that need the first: the user's name
(``memory``) and a calculation on the previous result (``followup``)."""

_TOOL_KEYS = plugins.TOOL_KEYS
_NEEDS = {"calculator": "calculator", "solver": "solver", "search": "search", "followup": "calculator"}


# ---------------------------------------------------------------- turns


@dataclass(frozen=True)
class DemoTurn:
    """One synthetic turn and what is right about it.

    Attributes:
        kind: One of :data:`KINDS`.
        key: The text that decides the turn's split.
        turn: The turn as MOSS writes it.
        command: The commands segment content, None for no command.
        answer: What the reply states (the result, the solution, the found entry, the name).
        accept: A right reply contains one of these; empty means ``answer``.
    """

    kind: str
    key: str
    turn: fmt.MossTurn
    command: str | None = None
    answer: str | None = None
    accept: tuple[str, ...] = ()


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


def _calculator_turn(rng: random.Random, human: str | None = None, expr: str | None = None) -> DemoTurn:
    if human is None or expr is None:
        human, expr = _calc_question(rng)
    value = evaluate_expression(expr)
    shown = plugins.NO_RESULT if value is None else str(value)
    reply = _pick(rng, _CALC_REPLY).format(shown)
    turn = _tool_turn("calculator", plugins.CALCULATOR, human, expr, plugins.format_calculate(shown), reply)
    return DemoTurn("calculator", human, turn, turn.commands, shown)


def _solver_turn(rng: random.Random) -> DemoTurn:
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
    return DemoTurn("solver", human, turn, turn.commands, answer)


_WHO = ("Who is {}?", "Tell me about {}.", "What do you know about {}?", "Can you look up {}?",
        "Search the web for {}.", "I heard of {}. Who is that?", "who is {}", "Do you know {}?",
        "Find information about {}.", "What is {} known for?")  # fmt: skip


def _search_turn(rng: random.Random, split: Split) -> DemoTurn:
    known = rng.random() < 0.9
    name = _pick(rng, corpus(split)) if known else made_up_name(rng)
    human = _pick(rng, _WHO).format(name)
    snippets = search_snippets(name, rng.randint(1, 2))
    if snippets:  # the reply cites the first hit, as MOSS does
        reply = f"{_pick(rng, ('', 'According to the search results, '))}{snippets[0][:-1]}<sup><|1|></sup>."
    else:
        reply = f"Sorry, I could not find any information about {name}."
    turn = _tool_turn("search", plugins.WEB_SEARCH, human, name, plugins.format_search_hits(snippets), reply)
    return DemoTurn("search", name, turn, turn.commands, snippets[0][:-1] if snippets else "could not find")


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
    (("How are you", "How is it going", "How do you do", "Are you well"),
     ("?", " today?", ", MOSS?"),
     ("I am doing well, thank you! How can I help you?",)),
    (("Bye", "Goodbye", "See you later", "Good night", "I have to go now"),
     ("!", ".", ", MOSS!", ""),
     ("Goodbye! Have a nice day.", "See you! Come back any time.")),
)  # fmt: skip
_OPENERS = ("", "", "", "OK. ", "Oh, ", "Well, ", "So, ")  # "Oh, " and the others lowercase what follows


def _chat_question(rng: random.Random) -> tuple[str, Sequence[str]]:
    heads, tails, replies = _CHAT[rng.randrange(len(_CHAT))]
    opener, head = _pick(rng, _OPENERS), _pick(rng, heads)
    if opener.endswith(", ") and not head.startswith(("Hi", "MOSS")):
        head = head[0].lower() + head[1:]
    return opener + head + _pick(rng, tails), replies


def chat_replies(question: str) -> tuple[str, ...]:
    """The replies the demonstration model learned for a plain chat question (none if it is not one)."""
    for heads, tails, replies in _CHAT:
        for opener, head, tail in itertools.product(dict.fromkeys(_OPENERS), heads, tails):
            low = head if not opener.endswith(", ") or head.startswith(("Hi", "MOSS")) else head[0].lower() + head[1:]
            if question == opener + low + tail:
                return tuple(replies)
    return ()


def _chat_turn(rng: random.Random, plugins_on: bool) -> DemoTurn:
    human, replies = _chat_question(rng)
    reply = _pick(rng, replies)
    turn = fmt.MossTurn(human, reply, _THOUGHTS["chat"], results=fmt.results_body(None)) if plugins_on else None
    return DemoTurn("chat", human, turn or fmt.MossTurn(human, reply), None, reply, tuple(replies))


def _memory_turns(rng: random.Random, plugins_on: bool, split: Split) -> list[DemoTurn]:
    """The user's name in turn 1, asked for in turn 2."""
    thoughts = _THOUGHTS["chat"] if plugins_on else fmt.NONE
    results = fmt.results_body(None, plugins_on=plugins_on)
    name = made_up_name(rng)
    while split_of(name) != split:
        name = made_up_name(rng)
    intro = _pick(rng, ("My name is {}.", "Hi, I am {}.", "Call me {}.", "Hello, my name is {}!")).format(name)
    hello = fmt.MossTurn(intro, f"Nice to meet you, {name}! How can I help you?", thoughts, results=results)
    ask = _pick(rng, ("What is my name?", "Do you remember my name?", "Who am I?", "What did I say my name was?"))
    answer = fmt.MossTurn(ask, f"Your name is {name}.", thoughts, results=results)
    return [DemoTurn("chat", name, hello), DemoTurn("memory", name, answer, None, name)]


def _followup_turns(rng: random.Random) -> list[DemoTurn]:
    """A calculation in turn 1, and in turn 2 one on its result ("Now add 5 to that.")."""
    first = _calculator_turn(rng)
    while first.answer is None or not first.answer.isdigit() or len(first.answer) > 5:
        first = _calculator_turn(rng)
    op, d = _pick(rng, "+-*"), rng.randint(2, 99)
    asks = {"+": ("Now add {} to that.", "And that plus {}?"), "-": ("Subtract {} from it.", "And that minus {}?"),
            "*": ("Multiply that by {}.", "And that times {}?")}[op]  # fmt: skip
    second = _calculator_turn(rng, _pick(rng, asks).format(d), f"{first.answer}{op}{d}")
    return [first, DemoTurn("followup", first.key + second.key, second.turn, second.command, second.answer)]


# ---------------------------------------------------------------- dialogues


@dataclass
class DemoDialogue:
    """One synthetic conversation and the kind of each of its turns (one of :data:`KINDS`)."""

    conversation: fmt.MossConversation
    kinds: list[str]


def sample_turns(rng: random.Random, kind: str, plugins_on: bool, split: Split) -> list[DemoTurn]:
    """One turn of ``kind`` (two for ``memory`` and ``followup``: the first turn they need, then theirs).

    The turns may belong to the other split: callers keep those whose keys are in the split they want.
    """
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
    made: list[DemoTurn] = []
    while len(made) < turns:
        kind = rng.choices(pool, [_WEIGHTS[k] for k in pool])[0]
        new = sample_turns(rng, kind, plugins_on, split)
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
        yield _dialogue(rng, _switches(rng), split, rng.choice((1, 1, 2)))
        count += 1


def dialogue_batches(size: int, *, seed: int = 0, split: Split = "train") -> Iterator[list[DemoDialogue]]:
    """An endless seeded stream of batches; the dialogues of one batch share their system text.

    Sharing it lets training run the long system text once per batch; sharing the number of turns keeps the
    padding short.
    """
    rng = random.Random(f"moss-demo-batches-{split}-{seed}")
    while True:
        enabled, turns = _switches(rng), rng.choice((1, 1, 2))
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
