"""ScriptedEngine: replays scripted outputs with the real engine's stop, count and context rules."""

from __future__ import annotations

import pytest

from moss_agent.engines.base import ContextWindowExceededError, Engine, Generation, SamplingParams
from moss_agent.testing.engines import ScriptedCall, ScriptedEngine, ScriptExhaustedError, scripted_tokens

PASS1 = SamplingParams(stop_tokens=("<eoc>",))
REPLY = SamplingParams()  # stops at <eom>


def test_is_an_engine() -> None:
    engine = ScriptedEngine([], model_name="fake", context_window=512)
    assert isinstance(engine, Engine)
    assert (engine.model_name, engine.context_window) == ("fake", 512)


def test_stops_at_the_first_requested_stop_token() -> None:
    engine = ScriptedEngine([' I should search.<eot>\n<|Commands|>: Search("x")<eoc>\n<|Results|>: junk'])
    got = engine.generate("<|Inner Thoughts|>:", PASS1)
    assert got.text == ' I should search.<eot>\n<|Commands|>: Search("x")'
    assert got.stop_reason == "<eoc>"
    assert got.completion_tokens == len(scripted_tokens(got.text)) + 1
    assert len(got.token_ids) == got.completion_tokens


def test_eos_that_is_not_requested_reports_eos() -> None:
    got = ScriptedEngine(["Hi there<eom> more"]).generate("p", PASS1)
    assert (got.text, got.stop_reason) == ("Hi there", "eos")


def test_stop_strings_cut_before_them() -> None:
    engine = ScriptedEngine(["Answer: 42\nQuestion: next<eom>"])
    got = engine.generate("p", REPLY.with_(stop=("\nQuestion", "never")))
    assert (got.text, got.stop_reason) == ("Answer: 42", "\nQuestion")


def test_max_new_tokens_gives_length() -> None:
    got = ScriptedEngine(["one two three four<eom>"]).generate("p", REPLY.with_(max_new_tokens=2))
    assert (got.text, got.stop_reason, got.completion_tokens) == ("one two", "length", 2)
    exact = ScriptedEngine(["one two"]).generate("p", REPLY.with_(max_new_tokens=2))
    assert exact.stop_reason == "length"


def test_a_script_without_end_token_ends_as_requested() -> None:
    engine = ScriptedEngine(["Paris.", " thinking<eot>\n<|Commands|>: None", "raw"])
    reply = engine.generate("p", REPLY)
    assert (reply.text, reply.stop_reason, reply.completion_tokens) == ("Paris.", "<eom>", 3)
    assert engine.generate("p", PASS1).stop_reason == "<eoc>"
    assert engine.generate("p", REPLY.with_(stop_tokens=())).stop_reason == "eos"


def test_generations_are_replayed_as_given() -> None:
    given = Generation("custom", "length", prompt_tokens=5, completion_tokens=9)
    assert ScriptedEngine([given]).generate("p", REPLY) is given


def test_records_calls_and_runs_out_clearly() -> None:
    engine = ScriptedEngine(["a<eom>"])
    engine.generate("first prompt", REPLY)
    assert engine.remaining == 0
    with pytest.raises(ScriptExhaustedError, match=r"no output left for call 2.*1 outputs were scripted.*add"):
        engine.generate("second prompt", PASS1)
    assert engine.calls == [
        ScriptedCall("first prompt", REPLY, "generate"),
        ScriptedCall("second prompt", PASS1, "generate"),
    ]
    engine.add("b<eom>", "c<eom>")
    assert [g.text for g in engine.generate_batch(["x", "y"], REPLY)] == ["b", "c"]
    assert engine.prompts == ["first prompt", "second prompt", "x", "y"]
    assert engine.calls[-1].method == "generate_batch"


def test_stream_yields_tokens_and_never_splits_end_tokens() -> None:
    script = ' Let me see.<eot>\n<|Commands|>: Calculate("1+1")<eoc>'
    deltas = list(ScriptedEngine([script]).stream("p", PASS1))
    final = deltas[-1].generation
    assert final is not None and final.stop_reason == "<eoc>"
    assert "".join(d.text for d in deltas) == final.text
    assert "<eot>" in [d.text for d in deltas]
    assert all(d.generation is None for d in deltas[:-1])


def test_token_rule_is_lossless_and_deterministic() -> None:
    text = "Hello, world!<eoh>\n 你好 x=3.5  "
    tokens = scripted_tokens(text)
    assert "".join(tokens) == text
    assert tokens[:4] == ["Hello", ",", " world", "!"]
    assert "<eoh>" in tokens
    engine = ScriptedEngine()
    assert engine.count_tokens(text) == len(tokens) == len(engine.token_ids(text))
    assert engine.token_ids(text) == ScriptedEngine().token_ids(text)


def test_cached_tokens_follow_the_shared_prefix() -> None:
    engine = ScriptedEngine(["ok thought<eot>\n<|Commands|>: None<eoc>", "Fine.<eom>", "Other.<eom>"])
    pass1 = "<|Human|>: hi<eoh>\n<|Inner Thoughts|>:"
    first = engine.generate(pass1, PASS1)
    assert first.cached_tokens == 0
    pass2 = pass1 + first.text + "<eoc>\n<|Results|>:\nNone\n<eor>\n<|MOSS|>:"
    second = engine.generate(pass2, REPLY)
    assert second.cached_tokens == first.prompt_tokens + first.completion_tokens - 1
    assert engine.generate("unrelated", REPLY).cached_tokens == 0


def test_context_window_as_the_real_engine() -> None:
    engine = ScriptedEngine(["a", "b"], context_window=10)
    with pytest.raises(ContextWindowExceededError, match="over the context window of 10"):
        engine.generate("one two three four five six", REPLY.with_(max_new_tokens=5))
    cut = engine.generate("one two three four five six", REPLY.with_(max_new_tokens=5, truncate="left"))
    assert cut.prompt_tokens == 5
