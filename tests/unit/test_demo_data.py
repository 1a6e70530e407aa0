"""The synthetic dialogues the demonstration model learns from: exact MOSS format, honest results, held-out split."""

from __future__ import annotations

import itertools
import random
import re
from fractions import Fraction

import pytest

from moss_agent.demo import data as demo_data
from moss_agent.protocol import format as fmt
from moss_agent.protocol.parser import parse_commands, parse_conversation

TRAIN = list(demo_data.dialogues(2000, seed=0))
QUESTIONS = demo_data.held_out_questions(60, seed=1)


def _turns(kind: str) -> list[tuple[fmt.MossConversation, fmt.MossTurn]]:
    """Turns of one kind, with their conversation; not those whose results were compacted to None."""
    return [
        (d.conversation, turn)
        for d in TRAIN
        for k, turn in zip(d.kinds, d.conversation.turns, strict=True)
        if k == kind and turn.results != " None"
    ]


def test_dialogues_are_seeded() -> None:
    again = [d.conversation.to_text() for d in demo_data.dialogues(50, seed=0)]
    assert again == [d.conversation.to_text() for d in TRAIN[:50]]
    other = [d.conversation.to_text() for d in demo_data.dialogues(50, seed=1)]
    assert other != again


def test_every_kind_and_layout_occurs() -> None:
    kinds = {k for d in TRAIN for k in d.kinds}
    assert kinds == set(demo_data.KINDS)
    assert any(not d.conversation.plugins_on for d in TRAIN)
    assert any(len(d.conversation.turns) == 2 for d in TRAIN)
    systems = {d.conversation.system for d in TRAIN}
    assert len(systems) >= 12  # many switch combinations, not one fixed prompt


def test_text_round_trips_through_the_parser() -> None:
    for d in TRAIN[:400]:
        text = d.conversation.to_text()
        assert parse_conversation(text).to_text() == text
        assert text.startswith(fmt.META_INSTRUCTION)


def test_trained_spans_are_exactly_what_the_model_generates() -> None:
    for d in TRAIN[:400]:
        conv, text = d.conversation, d.conversation.to_text()
        spans = demo_data.trained_spans(conv)
        assert len(spans) == len(conv.turns) * (2 if conv.plugins_on else 1)
        for start, end in spans:
            before, piece = text[:start], text[start:end]
            if piece.endswith(fmt.EOC):
                assert before.endswith(fmt.THOUGHTS + ":")
                assert f"{fmt.EOT}\n{fmt.COMMANDS}: " in piece
            else:
                assert before.endswith(fmt.MOSS + ":") and piece.endswith(fmt.EOM)
                assert piece.count(fmt.EOM) == 1 and fmt.HUMAN not in piece
            assert text[end] == "\n"


def test_commands_only_use_enabled_plugins() -> None:
    for d in TRAIN:
        enabled = {p.api for p in d.conversation.enabled_plugins()}
        for turn in d.conversation.turns:
            commands, invalid = parse_commands(turn.commands)
            assert not invalid
            assert {c.name for c in commands} <= enabled


def test_calculator_results_are_pythons_and_agree_with_the_real_tool() -> None:
    from moss_agent.tools.calculator import calculate

    turns = _turns("calculator")
    assert len(turns) > 300
    for _, turn in turns:
        (command,), _ = parse_commands(turn.commands)
        value = demo_data.evaluate_expression(command.arg)
        assert value is not None
        assert f"{command} => '{value}'\n" in turn.results
        assert str(value) in turn.reply
    for _, turn in turns[:25]:  # the tool the demo runs prints the same text
        (command,), _ = parse_commands(turn.commands)
        assert calculate(command.arg) == str(demo_data.evaluate_expression(command.arg))


def test_solver_results_satisfy_the_equations_and_agree_with_the_real_tool() -> None:
    from moss_agent.tools.equation_solver import solve

    turns = _turns("solver")
    assert len(turns) > 150
    for _, turn in turns:
        (command,), _ = parse_commands(turn.commands)
        values = {k: Fraction(v) for k, v in re.findall(r"^(\w) = (\S+)$", turn.results, re.MULTILINE)}
        for equation in command.arg.split(";"):
            left, right = equation.split("=")
            expr = re.sub(r"(\d)([a-z])", r"\1*\2", left)  # 2x+3 -> 2*x+3, then exact arithmetic
            assert eval(expr, {"__builtins__": {}}, values) == Fraction(right), (equation, values)
    for _, turn in turns[:15]:
        (command,), _ = parse_commands(turn.commands)
        lines = "".join(f"{n} = {v}\n" for n, v in solve(command.arg) or [])
        assert f"{command} =>\n{lines}" in turn.results


def test_search_copies_the_name_and_results_come_from_the_corpus() -> None:
    turns = _turns("search")
    found = 0
    for _, turn in turns:
        (command,), _ = parse_commands(turn.commands)
        assert command.arg in turn.human
        snippets = demo_data.search_snippets(command.arg, 2)
        if snippets:
            found += 1
            assert f"<|1|>: {snippets[0]!r}" in turn.results
            assert snippets[0].startswith(command.arg) and "<sup><|1|></sup>" in turn.reply
        else:
            assert "No result." in turn.results and command.arg in turn.reply
    assert 0.8 < found / len(turns) < 0.97


def test_search_backend_finds_people_and_nothing_else() -> None:
    question = next(q for q in QUESTIONS if q.kind == "search" and "could not find" not in q.accept[0])
    name = parse_commands(question.command or "")[0][0].arg
    hits = demo_data.DemoSearchBackend().search(f"who is {name}", 3)
    assert hits[0].title == name and len(hits) == 2  # capped at two, as in training
    assert demo_data.search_snippets("the weather tomorrow") == []


def test_second_turns_need_the_first_turn() -> None:
    names = _turns("memory")
    assert len(names) > 30
    for conv, turn in names:
        name = turn.reply.removeprefix("Your name is ").rstrip(".")
        assert turn.commands == fmt.NONE and name in conv.turns[0].human and name not in turn.human
    followups = _turns("followup")
    assert len(followups) > 15
    for conv, turn in followups:
        (command,), _ = parse_commands(turn.commands)
        previous = re.match(r"\d+", command.arg)
        assert previous and previous.group() in conv.turns[0].reply and previous.group() not in turn.human


def test_held_out_questions_are_never_trained_on() -> None:
    more = itertools.islice(demo_data.dialogue_batches(8, seed=0), 400)
    convs = [d.conversation for d in TRAIN] + [d.conversation for batch in more for d in batch]
    seen = {(t.human,) for c in convs for t in c.turns} | {tuple(t.human for t in c.turns) for c in convs}
    for q in QUESTIONS:  # a follow-up like "Now add 5 to that." is new only with the turn before it
        assert (*(h.human for h in q.history), q.human) not in seen, q
        assert demo_data.split_of(q.human) == "test" or q.kind in ("search", "memory", "followup")
    trained_names = {parse_commands(t.commands)[0][0].arg for _, t in _turns("search")}
    asked = {parse_commands(q.command or "")[0][0].arg for q in QUESTIONS if q.kind == "search"}
    assert not trained_names & asked  # held-out search questions are about people never seen


def test_held_out_questions_have_consistent_expectations() -> None:
    assert {q.kind for q in QUESTIONS} == set(demo_data.KINDS)
    for q in QUESTIONS:
        assert q.system == fmt.system_prompt(["search", "calculator", "solver"])
        assert q.accept and all(q.accept)
        if q.command is None:
            assert q.results == fmt.results_body(None)
        else:
            assert q.results.startswith(f"\n{q.command} =>")
        assert len(q.history) == (1 if q.kind in ("memory", "followup") else 0)
    humans = [q.human for q in QUESTIONS if q.kind == "calculator"]
    assert len(set(humans)) == len(humans)


def test_questions_are_varied() -> None:
    shapes = {re.sub(r"\d+", "#", t.human) for _, t in _turns("calculator")}
    assert len(shapes) > 60
    shapes = {re.sub(r"-?\d+|\b[xyzn]\b", "#", t.human) for _, t in _turns("solver")}
    assert len(shapes) > 25
    assert len({t.human.split()[0] for _, t in _turns("search")}) >= 6


@pytest.mark.parametrize(
    ("expr", "value"),
    [("12*3", 36), ("22000/1", 22000.0), ("(7+5)/4", 3.0), ("-3+1", -2), ("15/100*240", 36.0)],
)
def test_evaluate_expression_is_python_arithmetic(expr: str, value: float) -> None:
    result = demo_data.evaluate_expression(expr)
    assert result == value and type(result) is type(value)


@pytest.mark.parametrize("expr", ["__import__('os')", "2**8", "x+1", "1/0", "(1", "abs(-1)", "1 if 1 else 2"])
def test_evaluate_expression_rejects_everything_else(expr: str) -> None:
    assert demo_data.evaluate_expression(expr) is None


def test_split_is_stable_and_about_one_in_five() -> None:
    rng = random.Random(0)
    words = [str(rng.random()) for _ in range(5000)]
    share = sum(demo_data.split_of(w) == "test" for w in words) / len(words)
    assert 0.17 < share < 0.23
    assert [demo_data.split_of(w) for w in words[:50]] == [demo_data.split_of(w) for w in words[:50]]
