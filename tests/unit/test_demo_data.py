"""The synthetic dialogues the demonstration model learns from: exact MOSS format, honest results, held-out split."""

from __future__ import annotations

import itertools
import random
import re
from fractions import Fraction

import pytest

from moss_agent.demo import corpus
from moss_agent.demo import data as demo_data
from moss_agent.demo import questions as demo_questions
from moss_agent.protocol import format as fmt
from moss_agent.protocol.parser import parse_commands, parse_conversation

TRAIN = list(demo_data.dialogues(2000, seed=0))
QUESTIONS = demo_questions.held_out_questions(60, seed=1)


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
        value = corpus.evaluate_expression(command.arg)
        assert value is not None
        assert f"{command} => '{value}'\n" in turn.results
        assert str(value) in turn.reply
    for _, turn in turns[:25]:  # the tool the demo runs prints the same text
        (command,), _ = parse_commands(turn.commands)
        assert calculate(command.arg) == str(corpus.evaluate_expression(command.arg))


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
        snippets = corpus.search_snippets(command.arg, 2)
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
    hits = corpus.DemoSearchBackend().search(f"who is {name}", 3)
    assert hits[0].title == name and len(hits) == 2  # capped at two, as in training
    assert corpus.search_snippets("the weather tomorrow") == []


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
        assert corpus.split_of(q.human) == "test" or q.kind in ("search", "memory", "followup")
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
    for kind in demo_data.KINDS:  # distinct, the history included (a follow-up text recurs after other turns)
        asked = [(*(h.human for h in q.history), q.human) for q in QUESTIONS if q.kind == kind]
        assert len(set(asked)) == len(asked) == 60, kind


def test_the_test_split_has_a_hundred_distinct_questions_of_each_kind() -> None:
    questions = demo_questions.held_out_questions(100, seed=2)
    for kind in demo_data.KINDS:
        asked = {(*(h.human for h in q.history), q.human) for q in questions if q.kind == kind}
        assert len(asked) == 100, kind
    with pytest.raises(ValueError, match="fewer than 1000 distinct chat"):
        demo_questions.held_out_questions(1000, kinds=("chat",))


def test_chat_replies_are_those_learned() -> None:
    chat = [t for c, t in _turns("chat") if len(c.turns) == 1]  # not the introduction before a memory question
    assert len(chat) > 100
    for turn in chat:
        assert turn.reply in demo_data.chat_replies(turn.human)
    assert demo_data.chat_replies("What is 2+2?") == ()


def test_the_demo_script_is_held_out_and_its_expectations_are_the_tools() -> None:
    from moss_agent.tools.calculator import calculate
    from moss_agent.tools.equation_solver import solve

    script = demo_questions.demo_script()
    kinds = []
    for conversation in script:
        humans = [q for q, _, _ in conversation]
        for _, command, accept in conversation:
            assert accept and all(accept)
            if command is None:
                kinds.append("memory" if len(conversation) > 1 else "chat")
            else:
                (parsed,), _ = parse_commands(command)
                kinds.append(parsed.name)
                if parsed.name == "Calculate":
                    assert accept == (calculate(parsed.arg),)
                if parsed.name == "Solve":
                    assert accept == tuple(f"{n} = {v}" for n, v in solve(parsed.arg) or [])
                if parsed.name == "Search":
                    assert corpus.split_of(parsed.arg) == "test" and accept[0] in corpus.search_snippets(parsed.arg)[0]
        if len(humans) == 1 and not humans[0].startswith("Who is"):  # a search question is new by its name
            assert corpus.split_of(humans[0]) == "test", humans
    assert {"Calculate", "Solve", "Search", "chat", "memory"} <= set(kinds)
    followup = next(c for c in script if len(c) == 2 and c[1][1])
    assert corpus.split_of(followup[0][0] + followup[1][0]) == "test"  # the pair's key, as in held_out_questions
    assert followup[0][2][0] in (followup[1][1] or "")  # it calculates on the first result
    user = next(c for c in script if len(c) == 2 and not c[1][1])
    assert corpus.split_of(user[1][2][0]) == "test"


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
    result = corpus.evaluate_expression(expr)
    assert result == value and type(result) is type(value)


@pytest.mark.parametrize("expr", ["__import__('os')", "2**8", "x+1", "1/0", "(1", "abs(-1)", "1 if 1 else 2"])
def test_evaluate_expression_rejects_everything_else(expr: str) -> None:
    assert corpus.evaluate_expression(expr) is None


def test_split_is_stable_and_about_one_in_five() -> None:
    rng = random.Random(0)
    words = [str(rng.random()) for _ in range(5000)]
    share = sum(corpus.split_of(w) == "test" for w in words) / len(words)
    assert 0.17 < share < 0.23
    assert [corpus.split_of(w) for w in words[:50]] == [corpus.split_of(w) for w in words[:50]]


@pytest.mark.parametrize(
    ("reply", "answer", "right"),
    [
        ("The result is 23756.", "23756", True),
        ("The result is 2375.", "23756", False),
        ("The result is 237560.", "23756", False),
        ("That is 8.5.", "8.5", True),
        ("That is 8.55.", "8.5", False),
        ("That is 18.5.", "8.5", False),
        ("The solution is x = -4.", "x = -4", True),
        ("The solution is x = -41.", "x = -4", False),
    ],
)
def test_a_reply_states_a_number_only_whole(reply: str, answer: str, right: bool) -> None:
    from moss_agent.demo.evaluate import states

    assert states(reply, answer) is right
