"""MOSS memories: buffer, window, token budget, prefix stability, persistence, LangChain messages."""

from __future__ import annotations

import itertools
import logging
import random
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage

from moss_agent.memory import (
    BufferMemory,
    ContextBudgetError,
    MossChatMessageHistory,
    TokenBudgetMemory,
    WindowMemory,
)
from moss_agent.memory.store import SQLiteStore
from moss_agent.messages import from_messages, to_messages
from moss_agent.protocol import format as fmt
from moss_agent.protocol.data import iter_conversations

MOSS_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "moss_data"
needs_data = pytest.mark.skipif(
    not MOSS_DATA.is_dir(), reason="../shared/moss_data (the MOSS sample SFT data) is absent"
)
SYSTEM = fmt.system_prompt(["Search", "Calculate"])


def turn(i: int, reply: int = 40, results: int = 0) -> fmt.MossTurn:
    """Turn i; ``results`` characters of search output (0: no command)."""
    if not results:
        return fmt.MossTurn(f"question {i}", f"answer {i} " + "r" * reply, results="\nNone\n")
    body = f'\nSearch("q{i}") =>\n<|1|>: ' + repr("s" * results) + "\n"
    return fmt.MossTurn(f"question {i}", f"answer {i} " + "r" * reply, f"thoughts {i}", f'Search("q{i}")', body)


def pending(human: str) -> str:
    return fmt.segment(fmt.HUMAN, human) + fmt.THOUGHTS + ":"


def test_buffer_keeps_and_renders_every_turn_in_moss_layout() -> None:
    memory = BufferMemory(SYSTEM)
    turns = [turn(i, results=30 * (i % 2)) for i in range(4)]
    for i, t in enumerate(turns):
        before = memory.history_text()
        memory.add_turn(t, artifacts={"images": [f"/tmp/{i}.png"]} if i == 1 else None)
        assert memory.history_text() == before + t.to_text()  # only appends
    assert memory.turns() == memory.all_turns() == turns
    assert memory.history_text() == fmt.MossConversation(SYSTEM, turns).to_text()
    assert memory.render(pending("next")) == memory.history_text() + pending("next")
    assert memory.fit("anything") is None
    assert [r.artifacts for r in memory.records()] == [None, {"images": ["/tmp/1.png"]}, None, None]
    assert len(memory) == 4
    assert memory.history_text("OTHER\n").startswith("OTHER\n<|Human|>: question 0<eoh>\n")
    memory.clear()
    assert memory.turns() == [] and memory.history_text() == SYSTEM


def test_buffer_compacts_earlier_results_as_production_did_and_still_only_appends() -> None:
    memory = BufferMemory(SYSTEM, compact_results=True)
    turns = [turn(i, results=50) for i in range(3)]
    for t in turns:
        before = memory.history_text()
        memory.add_turn(t)
        assert memory.history_text() == before + t.compacted().to_text()
    assert memory.turns() == [t.compacted() for t in turns]
    assert all(t.results == " None" for t in memory.turns())
    assert memory.all_turns() == turns  # the full results are kept
    assert "<|Results|>: None<eor>\n" in memory.history_text()


def test_window_drops_to_drop_to_at_once() -> None:
    memory = WindowMemory(4, system=SYSTEM)
    shown = []
    for i in range(10):
        memory.add_turn(turn(i))
        shown.append([t.human for t in memory.turns()])
    assert [len(s) for s in shown] == [1, 2, 3, 4, 2, 3, 4, 2, 3, 4]
    assert shown[-1] == ["question 6", "question 7", "question 8", "question 9"]
    strict = WindowMemory(3, drop_to=3)
    for i in range(5):
        strict.add_turn(turn(i))
    assert [t.human for t in strict.turns()] == ["question 2", "question 3", "question 4"]
    assert len(strict.all_turns()) == 5


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: WindowMemory(0), "at least 1"),
        (lambda: WindowMemory(3, drop_to=4), "between 1 and k=3"),
        (lambda: TokenBudgetMemory(len, context_window=256, max_new_tokens=256), "lower max_new_tokens"),
        (lambda: TokenBudgetMemory(len, low_water=0), "low_water"),
        (lambda: BufferMemory(session_id="x"), "needs a store"),
    ],
)
def test_developer_mistakes_raise_with_the_fix(factory: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        factory()


def _run_budget(memory: TokenBudgetMemory, n: int, seed: int) -> tuple[list[int], list[bool]]:
    """Drive ``n`` turns of random sizes, checking every invariant.

    Returns:
        For each prompt after the first, how many characters of its history the engine must prefill again
        (those past the common prefix with the previous prompt's history plus its turn); and for each turn
        whether the memory dropped turns.
    """
    rng = random.Random(seed)
    costs, drops = [], []
    previous, reported = "", False
    for i in range(n):
        tail = pending(f"question {i} " + "h" * rng.randint(0, 120))
        report = memory.fit(tail)
        history = memory.history_text()
        assert report.prompt_tokens == memory.count_tokens(history + tail) <= memory.limit
        shown, stored = memory.turns(), memory.all_turns()
        assert shown or i == 0  # the newest turn always fits here
        for s, t in zip(shown, stored[len(stored) - len(shown) :], strict=True):
            assert s in (t, t.compacted())  # whole turns, never cut
        if i:
            assert (history != previous) == (reported or report.shifted)  # the reports tell the truth
            pairs = zip(history, previous, strict=False)
            same = next((k for k, (a, b) in enumerate(pairs) if a != b), min(len(history), len(previous)))
            costs.append(len(history) - same)
        new = turn(i, reply=rng.randint(20, 300), results=rng.choice([0, 0, 200, 600]))
        memory.add_turn(new)
        assert memory.last_fit is not None
        drops.append(report.dropped > 0 or memory.last_fit.dropped > 0)
        previous, reported = history + new.to_text(), memory.last_fit.shifted
    return costs, drops


@pytest.mark.parametrize("compact", [True, False])
def test_budget_only_appends_until_full_then_drops_to_low_water_and_holds(compact: bool) -> None:
    def budget(low_water: float) -> TokenBudgetMemory:
        window = len(SYSTEM) + 5000
        return TokenBudgetMemory(
            len,
            context_window=window,
            max_new_tokens=400,
            system=SYSTEM,
            low_water=low_water,
            compact_when_needed=compact,
        )

    costs, drops = _run_budget(budget(0.5), 60, seed=1)
    assert costs[:6] == [0] * 6  # room for the first turns: pure appends, the whole prefix is reused
    assert 3 <= sum(drops) <= 12
    assert not any(a and b for a, b in itertools.pairwise(drops))  # never two drops in a row
    naive_costs, naive_drops = _run_budget(budget(1.0), 60, seed=1)  # drops one turn at a time
    assert sum(naive_drops) > 2 * sum(drops)
    assert sum(naive_costs) > 4 * sum(costs)


def test_budget_compacts_results_before_dropping_turns() -> None:
    memory = TokenBudgetMemory(len, context_window=len(SYSTEM) + 2500, max_new_tokens=300, system=SYSTEM)
    for i in range(3):
        memory.add_turn(turn(i, reply=20, results=500))
        assert memory.last_fit is not None and not memory.last_fit.shifted
    before = memory.history_text()
    memory.add_turn(turn(3, reply=20, results=500))
    report = memory.last_fit
    assert report is not None and report.compacted == 4 and report.dropped == 0 and report.shifted
    assert memory.turns() == [t.compacted() for t in memory.all_turns()]
    first_results = before.index("<|Results|>:")
    assert memory.history_text()[:first_results] == before[:first_results]  # the cache holds up to there
    memory.add_turn(turn(4, reply=20, results=500))  # compacted ones stay compacted; the new one is appended
    assert memory.last_fit is not None and not memory.last_fit.shifted
    assert memory.turns()[-1] == turn(4, reply=20, results=500)


def test_budget_says_so_when_the_newest_turn_alone_does_not_fit(caplog: pytest.LogCaptureFixture) -> None:
    memory = TokenBudgetMemory(len, context_window=len(SYSTEM) + 900, max_new_tokens=300, system=SYSTEM)
    memory.add_turn(turn(0))
    with caplog.at_level(logging.WARNING, logger="moss_agent.memory.turns"):
        memory.add_turn(turn(1, reply=2000))
    report = memory.last_fit
    assert report is not None and report.warning is not None and "does not fit" in report.warning
    assert report.dropped == 2 and memory.turns() == [] and memory.history_text() == SYSTEM
    assert report.warning in caplog.text
    memory.add_turn(turn(2))
    assert memory.turns() == [turn(2)] and memory.last_fit is not None and memory.last_fit.warning is None
    with pytest.raises(ContextBudgetError, match=r"shorten the input or lower max_new_tokens"):
        memory.fit(pending("h" * 1000))


def test_budget_with_a_moss_tokenizer_on_real_conversations() -> None:
    tokenizers = pytest.importorskip("tokenizers")
    from moss_agent.testing.checkpoints import tiny_moss_tokenizer_dir

    folder = tiny_moss_tokenizer_dir()
    tok = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens(list(fmt.END_TOKENS))

    def count(text: str) -> int:
        return len(tok.encode(text).ids)

    if MOSS_DATA.is_dir():
        turns = [
            t for c in iter_conversations(MOSS_DATA / "conversations/conversation_with_plugins/mix") for t in c.turns
        ]
    else:
        turns = [turn(i, reply=200, results=300) for i in range(40)]
    memory = TokenBudgetMemory(count, system=SYSTEM)  # MOSS's 2048 context, 256 new tokens
    sizes = []
    for t in turns[:60]:
        memory.add_turn(t)
        report = memory.fit(pending("What next?"))
        assert report.prompt_tokens <= 2048 - 256
        sizes.append(len(memory.turns()))
        # Pieces split at end tokens, so counting turn by turn adds up to the whole prompt.
        assert count(memory.history_text()) == count(SYSTEM) + sum(count(s.to_text()) for s in memory.turns())
    assert max(sizes) >= 3 and min(sizes[10:]) >= 1


def test_memories_resume_from_sqlite_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "chat.db"
    first = WindowMemory.from_sqlite(path, "alice", k=4, system=SYSTEM, compact_results=True)
    for i in range(7):
        first.add_turn(turn(i, results=40), artifacts=[Path(f"/img/{i}.png")])
    again = WindowMemory.from_sqlite(path, "alice", k=4, compact_results=True)
    assert again.system == SYSTEM  # the session's switches come back with it
    assert again.turns() == first.turns() and again.all_turns() == first.all_turns()
    expected = [[f"/img/{i}.png"] for i in range(7)]  # kept as JSON, the same before and after
    assert [r.artifacts for r in again.records()] == [r.artifacts for r in first.records()] == expected
    assert [r.created_at for r in again.records()] == pytest.approx([r.created_at for r in first.records()], abs=1.0)
    again.add_turn(turn(7))
    assert len(BufferMemory.from_sqlite(path, "alice").turns()) == 8

    other = BufferMemory(store=SQLiteStore(path), session_id="bob", system="BOB\n")
    other.add_turn(turn(0))
    assert BufferMemory.from_sqlite(path, "bob").history_text() == "BOB\n" + turn(0).to_text()
    other.system = "BOB2\n"
    assert BufferMemory.from_sqlite(path, "bob").system == "BOB2\n"
    other.clear()
    assert BufferMemory.from_sqlite(path, "bob").all_turns() == []
    assert len(BufferMemory.from_sqlite(path, "alice")) == 8  # sessions do not mix

    budget = TokenBudgetMemory.from_sqlite(path, "alice", count_tokens=len, context_window=len(SYSTEM) + 800)
    assert 1 <= len(budget.turns()) < 8 and budget.turns()[-1] == turn(7)
    fresh = BufferMemory.from_sqlite(path)
    assert fresh.session_id and fresh.session_id not in ("alice", "bob")


def test_memory_to_and_from_langchain_messages() -> None:
    memory = BufferMemory(SYSTEM)
    for i in range(3):
        memory.add_turn(turn(i, results=30 * i))
    messages = memory.to_messages()
    assert isinstance(messages[0], SystemMessage) and messages[0].content == SYSTEM
    assert [type(m).__name__ for m in messages[1:3]] == ["HumanMessage", "AIMessage"]
    assert any(isinstance(m, ToolMessage) for m in messages)
    back = WindowMemory.from_messages(messages, k=2, drop_to=2)
    assert back.system == SYSTEM and back.all_turns() == memory.all_turns() and len(back.turns()) == 2
    assert memory.to_messages(shown_only=True) == to_messages(fmt.MossConversation(SYSTEM, memory.turns()))


def test_chat_history_keeps_whole_turns_and_holds_back_an_open_one(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # subclassing the deprecated base does not warn our users
        history = MossChatMessageHistory(tmp_path / "h.db", "s1")
    history.add_messages([HumanMessage("2+2?")])
    assert [m.content for m in history.messages] == ["2+2?"]
    call = {"name": "Calculate", "args": {"expression": "2+2"}, "id": "c1"}
    history.add_messages([AIMessage("", tool_calls=[call], additional_kwargs={"reasoning_content": "Add."})])
    history.add_messages([ToolMessage("4", tool_call_id="c1"), AIMessage("It is 4.")])
    history.add_messages([HumanMessage("thanks"), AIMessage("You are welcome.")])

    saved = history.store.load("s1")
    assert saved is not None and saved.pending is None
    assert saved.turns[0] == fmt.MossTurn(
        "2+2?", "It is 4.", "Add.", 'Calculate("2+2")', "\nCalculate(\"2+2\") => '4'\n"
    )
    # The first turn's tool call set the session's switches (Calculate on), so the plain turn has the plugin
    # form of empty results.
    assert saved.system == fmt.system_prompt(["Calculate"])
    assert saved.turns[1].human == "thanks" and saved.turns[1].results == "\nNone\n"
    reopened = MossChatMessageHistory(SQLiteStore(tmp_path / "h.db"), "s1")
    assert reopened.messages == history.messages
    assert from_messages(reopened.messages).turns == saved.turns
    reopened.clear()
    assert reopened.messages == [] and MossChatMessageHistory(tmp_path / "h.db", "s2").messages == []


@needs_data
def test_chat_history_stores_real_conversations_losslessly(tmp_path: Path) -> None:
    conversations = list(iter_conversations(MOSS_DATA / "conversations"))[::4]
    store = SQLiteStore(tmp_path / "h.db", synchronous="NORMAL")
    rng = random.Random(3)
    for n, conv in enumerate(conversations):
        history = MossChatMessageHistory(store, f"c{n}", include_system=True)
        messages = to_messages(conv)
        cuts = sorted(rng.sample(range(1, len(messages)), min(3, len(messages) - 1)))
        for a, b in zip([0, *cuts], [*cuts, len(messages)], strict=True):  # arrives in arbitrary pieces
            history.add_messages(messages[a:b])
        saved = store.load(f"c{n}")
        assert saved is not None and saved.pending is None
        assert saved.to_conversation().to_text() == conv.to_text()
        assert from_messages(history.messages).to_text() == conv.to_text()


def test_agent_conversation_survives_a_restart_and_prompts_extend_each_other(tmp_path: Path) -> None:
    from moss_agent.agent import MossAgent
    from moss_agent.testing.engines import ScriptedEngine

    engine = ScriptedEngine(["Hello there!", "Again."])
    agent = MossAgent(engine, memory=TokenBudgetMemory.from_sqlite(tmp_path / "m.db", "s", count_tokens=len))
    agent.invoke({"input": "hi"})
    agent.invoke({"input": "more"})
    first, second = engine.prompts
    assert second.startswith(first + " Hello there!<eom>\n")  # the engine's cached prefix stays valid

    restarted = ScriptedEngine(["Third."])
    memory = TokenBudgetMemory.for_engine(restarted, store=SQLiteStore(tmp_path / "m.db"), session_id="s")
    MossAgent(restarted, memory=memory).invoke({"input": "again"})
    assert restarted.prompts[0].startswith(second + " Again.<eom>\n")
    assert [t.reply for t in memory.all_turns()] == ["Hello there!", "Again.", "Third."]
