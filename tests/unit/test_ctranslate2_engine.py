"""CTranslate2Engine on a tiny random MOSS converted with ``convert_ctranslate2`` (skips without ctranslate2)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("ctranslate2")

from moss_agent.checkpoints.convert import ConversionError  # noqa: E402
from moss_agent.checkpoints.loading import load_moss  # noqa: E402
from moss_agent.engines.base import ContextWindowExceededError, Engine, SamplingParams  # noqa: E402
from moss_agent.engines.ctranslate2 import CTranslate2Engine, convert_ctranslate2  # noqa: E402
from moss_agent.engines.transformers import TransformersEngine  # noqa: E402
from moss_agent.protocol import format as fmt  # noqa: E402
from moss_agent.testing.checkpoints import tiny_moss_checkpoint  # noqa: E402

# Penalty 1: CTranslate2's repetition penalty covers generated tokens only (the engine's docstring says so).
GREEDY = SamplingParams(max_new_tokens=16, do_sample=False, repetition_penalty=1.0, stop_tokens=())
PROMPT = fmt.chat_prompt(fmt.system_prompt(), [], "What is the capital of France?")


@pytest.fixture(scope="module")
def source() -> Path:
    return tiny_moss_checkpoint(dtype="float32")


@pytest.fixture(scope="module")
def converted(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_ctranslate2(source, tmp_path_factory.mktemp("ct2") / "tiny-ct2")


@pytest.fixture(scope="module")
def engine(converted: Path) -> Any:
    engine = CTranslate2Engine.from_pretrained(converted, threads=1)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def reference(source: Path) -> TransformersEngine:
    loaded = load_moss(source, precision="fp32", device_map="cpu")
    return TransformersEngine(loaded.model, loaded.tokenizer, model_name="tiny")


def test_conversion_writes_a_ctranslate2_model_with_its_tokenizer(converted: Path) -> None:
    for name in ("model.bin", "vocabulary.json", "vocab.json", "added_tokens.json", "moss_agent.json"):
        assert (converted / name).is_file(), name


def test_conversion_refuses_bad_arguments(source: Path, converted: Path, tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="quantization must be one of"):
        convert_ctranslate2(source, tmp_path / "x", quantization="int3")
    with pytest.raises(ConversionError, match="exists and is not empty"):
        convert_ctranslate2(source, converted)


def test_not_a_ctranslate2_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a CTranslate2 model"):
        CTranslate2Engine.from_pretrained(tmp_path)


def test_greedy_tokens_equal_transformers(engine: CTranslate2Engine, reference: TransformersEngine) -> None:
    assert isinstance(engine, Engine)
    for prompt in (PROMPT, "Hello", fmt.plugin_pass1_prompt(fmt.system_prompt(["Search"]), [], "Who is he?")):
        got, want = engine.generate(prompt, GREEDY), reference.generate(prompt, GREEDY)
        assert got.token_ids == want.token_ids
        assert (got.text, got.stop_reason, got.prompt_tokens) == (want.text, want.stop_reason, want.prompt_tokens)


def test_static_prompt_changes_nothing_but_speed(converted: Path, engine: CTranslate2Engine) -> None:
    plain = CTranslate2Engine.from_pretrained(converted, threads=1, static_prompt=False)
    try:
        assert engine._static and not plain._static
        assert engine.generate(PROMPT, GREEDY) == plain.generate(PROMPT, GREEDY)
    finally:
        plain.close()


def test_end_tokens_stop_with_their_names(engine: CTranslate2Engine) -> None:
    free = engine.generate(PROMPT, GREEDY)
    token = engine.decode([free.token_ids[2]])
    stop_id = free.token_ids[2]
    # Any single token can serve as an end token; the third generated one ends the generation there.
    engine._stop_ids[token] = stop_id
    got = engine.generate(PROMPT, GREEDY.with_(stop_tokens=(token,)))
    assert got.stop_reason == token and got.token_ids == free.token_ids[:3]
    assert got.text == engine.decode(list(free.token_ids[:2]))


def test_stop_strings_cut_and_stream_never_shows_them(engine: CTranslate2Engine) -> None:
    free = engine.generate(PROMPT, GREEDY)
    stop = free.text[4:7]
    params = GREEDY.with_(stop=(stop,))
    got = engine.generate(PROMPT, params)
    assert got.stop_reason == stop and got.text == free.text[: free.text.index(stop)]
    assert got.completion_tokens < free.completion_tokens
    deltas = list(engine.stream(PROMPT, params))
    assert "".join(d.text for d in deltas) == got.text and deltas[-1].generation == got


def test_stream_equals_generate_and_can_be_closed(engine: CTranslate2Engine) -> None:
    want = engine.generate(PROMPT, GREEDY)
    deltas = list(engine.stream(PROMPT, GREEDY))
    assert "".join(d.text for d in deltas) == want.text and deltas[-1].generation == want
    stream = engine.stream(PROMPT, GREEDY.with_(max_new_tokens=200))
    next(stream)
    stream.close()  # stops CTranslate2 at its next token
    assert engine.generate(PROMPT, GREEDY) == want


def test_batch_equals_one_by_one_with_and_without_penalty(engine: CTranslate2Engine) -> None:
    prompts = [PROMPT, "Hi", PROMPT + " And Germany?"]
    for params in (GREEDY, GREEDY.with_(repetition_penalty=1.3)):
        assert engine.generate_batch(prompts, params) == [engine.generate(p, params) for p in prompts]
    assert engine.generate_batch([], GREEDY) == []


def test_context_window_rules(engine: CTranslate2Engine) -> None:
    small = copy.copy(engine)
    small.context_window = 40
    with pytest.raises(ContextWindowExceededError):
        small.generate(PROMPT, GREEDY)
    kept = small.generate(PROMPT, GREEDY.with_(truncate="left"))
    assert kept.prompt_tokens == 40 - GREEDY.max_new_tokens
    with pytest.raises(ValueError, match="empty"):
        engine.generate("", GREEDY)
    with pytest.raises(ValueError, match="not one"):
        engine.generate(PROMPT, GREEDY.with_(stop_tokens=("two words",)))


def test_sampling_stays_valid_and_closed_engine_refuses(converted: Path) -> None:
    engine = CTranslate2Engine.from_pretrained(converted, threads=1)
    got = engine.generate(PROMPT, SamplingParams(max_new_tokens=8, stop_tokens=()))
    assert 1 <= got.completion_tokens <= 8
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.generate(PROMPT, GREEDY)


def test_chat_moss_runs_on_it(engine: CTranslate2Engine) -> None:
    from moss_agent.chat_model import ChatMoss

    reply = ChatMoss(engine=engine, do_sample=False, max_tokens=8).invoke("Hello")
    assert isinstance(reply.content, str)


def test_cli_converts_with_int8_and_refuses_quantization_elsewhere(
    source: Path, reference: TransformersEngine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from moss_agent.cli import main

    out = tmp_path / "int8"
    assert main(["convert", str(source), str(out), "--format", "ctranslate2", "--quantization", "int8"]) == 0
    assert "CTranslate2" in capsys.readouterr().out
    engine = CTranslate2Engine.from_pretrained(out, threads=1)
    try:
        got = engine.generate(PROMPT, GREEDY)
        assert got.prompt_tokens == reference.count_tokens(PROMPT) and got.completion_tokens == 16
    finally:
        engine.close()
    assert main(["convert", str(source), str(tmp_path / "g"), "--format", "gptj", "--quantization", "int8"]) != 0
    assert "--quantization is for --format ctranslate2" in capsys.readouterr().err
