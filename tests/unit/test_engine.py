"""TransformersEngine on a tiny random MOSS checkpoint (real layout, loaded through load_moss)."""

from __future__ import annotations

import copy
import subprocess
import sys
import threading
import warnings
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from moss_agent.checkpoints.loading import load_moss  # noqa: E402
from moss_agent.engines.base import (  # noqa: E402
    ContextWindowExceededError,
    Engine,
    Generation,
    SamplingParams,
    fit_context,
)
from moss_agent.engines.batch_steps import StepBatchable  # noqa: E402
from moss_agent.engines.decoding import TextTracker, common_prefix, next_tokens  # noqa: E402
from moss_agent.engines.transformers import TransformersEngine  # noqa: E402
from moss_agent.protocol import format as fmt  # noqa: E402
from moss_agent.testing.checkpoints import tiny_moss_checkpoint  # noqa: E402

GREEDY = SamplingParams(max_new_tokens=20, do_sample=False, stop_tokens=())
PROMPT = fmt.chat_prompt(fmt.system_prompt(), [], "What is the capital of France?")
PASS1 = fmt.plugin_pass1_prompt(fmt.system_prompt(["Search"]), [], "What is the capital of France?")


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    # A tiny model on shared cores: one thread is several times faster than contended intra-op threads.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def loaded() -> Any:
    return load_moss(tiny_moss_checkpoint())


@pytest.fixture(scope="module")
def quiet(loaded: Any) -> Any:
    """The tiny model, made never to end on its own (end tokens and bos get a large negative bias)."""
    model = copy.deepcopy(loaded.model)
    with torch.no_grad():
        for i in [*loaded.end_token_ids.values(), loaded.tokenizer.convert_tokens_to_ids("<|endoftext|>")]:
            model.lm_head.bias[i] = -1e4
    return model


@pytest.fixture
def engine(quiet: Any, loaded: Any) -> TransformersEngine:
    return TransformersEngine(quiet, loaded.tokenizer, model_name="tiny")


@pytest.fixture
def fresh(quiet: Any, loaded: Any) -> TransformersEngine:
    """The reference: recomputes every prompt in full."""
    return TransformersEngine(quiet, loaded.tokenizer, prefix_cache=False)


def _with_token_at(model: Any, loaded: Any, target: str, ids: tuple[int, ...], avoid: list[int]) -> tuple[Any, int]:
    """A copy of ``model`` that emits ``target`` where it would first emit a token not in ``avoid``.

    ``target``'s output row becomes a copy of that token's row plus a hair, so the trajectory is unchanged up to
    that step and ``target`` wins there (``target`` must not be in the prompt: the repetition penalty would
    lower it). Returns the copy and the step.
    """
    k = next(i for i in range(3, len(ids)) if ids[i] not in ids[:i] and ids[i] not in avoid)
    clone = copy.deepcopy(model)
    dst = loaded.end_token_ids.get(target) or loaded.tokenizer.convert_tokens_to_ids(target)
    with torch.no_grad():
        clone.lm_head.weight[dst] = clone.lm_head.weight[ids[k]]
        clone.lm_head.bias[dst] = clone.lm_head.bias[ids[k]] + 1e-3
    return clone, k


def _decode(loaded: Any, ids: Any) -> str:
    return str(loaded.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False))


# ---------------------------------------------------------------- stopping


def test_stop_token_ends_generation_with_its_name(quiet: Any, loaded: Any, fresh: TransformersEngine) -> None:
    base = fresh.generate(PASS1, GREEDY)
    assert base.stop_reason == "length" and base.completion_tokens == 20
    model, k = _with_token_at(quiet, loaded, "<eoc>", base.token_ids, fresh.token_ids(PASS1))
    eoc = loaded.end_token_ids["<eoc>"]
    engine = TransformersEngine(model, loaded.tokenizer)

    got = engine.generate(PASS1, GREEDY.with_(stop_tokens=("<eoc>", "<eom>")))
    assert got.stop_reason == "<eoc>"
    assert got.token_ids == (*base.token_ids[:k], eoc)
    assert got.completion_tokens == k + 1
    assert got.text == _decode(loaded, base.token_ids[:k])

    # Not a stop token this time: it is ordinary text and generation goes on.
    on = engine.generate(PASS1, GREEDY.with_(stop_tokens=("<eom>",)))
    assert on.stop_reason == "length" and "<eoc>" in on.text and len(on.token_ids) == 20


def test_eos_that_is_not_a_stop_token_reports_eos(quiet: Any, loaded: Any, fresh: TransformersEngine) -> None:
    base = fresh.generate(PASS1, GREEDY)
    model, k = _with_token_at(quiet, loaded, "<eom>", base.token_ids, fresh.token_ids(PASS1))
    got = TransformersEngine(model, loaded.tokenizer).generate(PASS1, GREEDY.with_(stop_tokens=("<eoc>",)))
    assert (got.stop_reason, got.completion_tokens) == ("eos", k + 1)
    assert got.text == _decode(loaded, base.token_ids[:k])


def test_stop_string_cuts_text_before_it(engine: TransformersEngine, fresh: TransformersEngine) -> None:
    base = fresh.generate(PROMPT, GREEDY.with_(max_new_tokens=30))
    at = next(i for i in range(4, len(base.text) - 3) if base.text.find(base.text[i : i + 3]) == i)
    stop = base.text[at : at + 3]
    got = engine.generate(PROMPT, GREEDY.with_(max_new_tokens=30, stop=("never seen", stop)))
    assert (got.text, got.stop_reason) == (base.text[:at], stop)
    assert got.completion_tokens < 30
    deltas = list(engine.stream(PROMPT, GREEDY.with_(max_new_tokens=30, stop=(stop,))))
    assert "".join(d.text for d in deltas) == base.text[:at]


def test_max_new_tokens_gives_length(engine: TransformersEngine) -> None:
    got = engine.generate(PROMPT, GREEDY.with_(max_new_tokens=7))
    assert (got.stop_reason, got.completion_tokens, len(got.token_ids)) == ("length", 7, 7)
    assert got.prompt_tokens == engine.count_tokens(PROMPT)


def test_multi_token_stop_token_is_a_clear_error(engine: TransformersEngine) -> None:
    with pytest.raises(ValueError, match=r"stop token 'Hello world' is \d+ tokens.*SamplingParams.stop"):
        engine.generate(PROMPT, GREEDY.with_(stop_tokens=("Hello world",)))


def test_padding_rows_of_the_embedding_are_never_picked(quiet: Any, loaded: Any) -> None:
    assert quiet.config.vocab_size > len(loaded.tokenizer)  # the checkpoint pads, as the release does
    model = copy.deepcopy(quiet)
    with torch.no_grad():
        model.lm_head.bias[len(loaded.tokenizer) :] = 1e4
    got = TransformersEngine(model, loaded.tokenizer).generate(PROMPT, GREEDY.with_(max_new_tokens=5))
    assert max(got.token_ids) < len(loaded.tokenizer)


# ---------------------------------------------------------------- sampling


def test_greedy_is_deterministic(engine: TransformersEngine, fresh: TransformersEngine) -> None:
    a, b = fresh.generate(PROMPT, GREEDY), fresh.generate(PROMPT, GREEDY)
    assert a == b and len(set(a.token_ids)) > 1


def test_seeded_sampling_is_reproducible(fresh: TransformersEngine) -> None:
    params = SamplingParams(max_new_tokens=20, stop_tokens=(), seed=7)
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (0.7, 0.8, 40, 1.02)
    first, again = fresh.generate(PROMPT, params), fresh.generate(PROMPT, params)
    other = fresh.generate(PROMPT, params.with_(seed=8))
    assert first.token_ids == again.token_ids
    assert other.token_ids != first.token_ids
    assert first.token_ids != fresh.generate(PROMPT, GREEDY).token_ids
    # Sampling from the single most likely token is greedy decoding.
    assert fresh.generate(PROMPT, params.with_(top_k=1)).token_ids == fresh.generate(PROMPT, GREEDY).token_ids


def test_logits_processing_matches_transformers() -> None:
    from transformers import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

    from moss_agent.engines.decoding import _repetition_penalty, _top_k, _top_p

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=gen) * 3
    ids = torch.randint(0, 50, (3, 12), generator=gen)
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter(1, ids, True)
    want = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    assert torch.equal(_repetition_penalty(logits, seen, 1.3), want)
    assert torch.equal(_top_k(logits, 5), TopKLogitsWarper(5)(ids, logits.clone()))
    assert torch.equal(_top_p(logits, 0.8), TopPLogitsWarper(0.8)(ids, logits.clone()))


def test_sampling_stays_in_the_nucleus() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    params = SamplingParams(temperature=1.0, top_p=0.8, top_k=0, repetition_penalty=1.0)
    seen = torch.zeros(1, 4, dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    picks = {int(next_tokens(probs.log(), seen, params, gen, 4)[0]) for _ in range(200)}
    assert picks == {0, 1}


# ---------------------------------------------------------------- streaming


@pytest.mark.parametrize(
    "params",
    [GREEDY, GREEDY.with_(max_new_tokens=3), GREEDY.with_(stop=("H H",)), GREEDY.with_(stop_tokens=("<eom>",))],
)
def test_stream_equals_generate(engine: TransformersEngine, fresh: TransformersEngine, params: Any) -> None:
    want = fresh.generate(PROMPT, params)
    deltas = list(engine.stream(PROMPT, params))
    assert all(d.generation is None for d in deltas[:-1])
    final = deltas[-1].generation
    assert final is not None
    assert "".join(d.text for d in deltas) == final.text == want.text
    assert (final.token_ids, final.stop_reason) == (want.token_ids, want.stop_reason)


def test_text_tracker_never_splits_a_character(loaded: Any) -> None:
    text = "MOSS 说：𝄞 乐谱 🙂 ok"
    ids = loaded.tokenizer.encode(text, add_special_tokens=False)
    # The tiny BPE does not know these characters: some tokens are partial UTF-8 on their own.
    assert any("\ufffd" in _decode(loaded, [i]) for i in ids)
    tracker = TextTracker(lambda i: _decode(loaded, i), ())
    pieces = []
    for i in ids:
        tracker.push(i)
        pieces.append(tracker.ready())
    tracker.flush()
    pieces.append(tracker.ready(final=True))
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == text


def test_text_tracker_holds_back_a_possible_stop_string(loaded: Any) -> None:
    tracker = TextTracker(lambda i: _decode(loaded, i), ("<|Results|>", "zzz"))
    out = []
    # Generated ids, one at a time: a model may emit the "\n" after <eot> that encoding strips.
    generated = [loaded.tokenizer.encode(t, add_special_tokens=False) for t in ("Sure<eot>", "\n<|Res")]
    for i in generated[0] + generated[1]:
        tracker.push(i)
        out.append(tracker.ready())
    assert "".join(out) == "Sure<eot>\n"  # "<|Res" might begin the stop string: held
    for i in loaded.tokenizer.encode("ults|>: x", add_special_tokens=False):
        tracker.push(i)
    assert (tracker.stop, tracker.text, tracker.ready(final=True)) == ("<|Results|>", "Sure<eot>\n", "")


def test_abandoned_or_paused_streams_do_not_block(engine: TransformersEngine) -> None:
    stream = engine.stream(PROMPT, GREEDY)
    next(stream)
    # A call while a stream is paused runs (from scratch: the stream holds the cache).
    assert engine.generate("<|Human|>: hi<eoh>\n", GREEDY).cached_tokens == 0
    stream.close()  # hands its cache back
    assert engine.generate(PROMPT, GREEDY).cached_tokens == engine.count_tokens(PROMPT) - 1
    # A stream finalised while its thread holds the engine (garbage collection can do that) must not wait
    # for the lock: it drops its cache instead.
    stream = engine.stream(PROMPT, GREEDY)
    next(stream)
    with engine.lock:
        stream.close()
    assert engine.generate(PROMPT, GREEDY).cached_tokens == 0


# ---------------------------------------------------------------- prefix cache


def _chain(engine: TransformersEngine, fresh: TransformersEngine, prompts: list[str]) -> list[Generation]:
    """Generate each prompt in turn with the caching engine; each must equal a full recompute."""
    out = []
    for prompt in prompts:
        got, want = engine.generate(prompt, GREEDY), fresh.generate(prompt, GREEDY)
        assert (got.token_ids, got.text, got.stop_reason) == (want.token_ids, want.text, want.stop_reason)
        assert got.prompt_tokens == want.prompt_tokens and want.cached_tokens == 0
        out.append(got)
    return out


def test_cache_reuse_on_plugin_pass_two(engine: TransformersEngine, fresh: TransformersEngine) -> None:
    pass1 = fmt.plugin_pass1_prompt(fmt.system_prompt(["Search"]), [], "Who wrote Hamlet?")
    first = engine.generate(pass1, GREEDY.with_(stop_tokens=("<eoc>",)))
    pass2 = pass1 + first.text + "<eot>\n<|Commands|>: None<eoc>\n<|Results|>:\nNone\n<eor>\n<|MOSS|>:"
    got, want = engine.generate(pass2, GREEDY), fresh.generate(pass2, GREEDY)
    assert got.token_ids == want.token_ids
    held = engine.token_ids(pass1) + list(first.token_ids[:-1])
    assert got.cached_tokens == common_prefix(engine.token_ids(pass2), held)
    assert got.cached_tokens > first.prompt_tokens  # the prompt and some of the output were reused


def test_cache_reuse_over_conversation_turns(engine: TransformersEngine, fresh: TransformersEngine) -> None:
    system = fmt.system_prompt()
    turns: list[fmt.MossTurn] = []
    prompts = []
    for human in ["Hi there", "Tell me a joke about cats.", "Thank you for your help!"]:
        prompts.append(fmt.chat_prompt(system, turns, human))
        got = fresh.generate(prompts[-1], GREEDY)
        turns.append(fmt.MossTurn(human, got.text.strip()))
    gens = _chain(engine, fresh, prompts)
    assert gens[0].cached_tokens == 0
    assert all(g.cached_tokens >= engine.count_tokens(p) for g, p in zip(gens[1:], prompts, strict=False))


@pytest.mark.parametrize("case", ["same", "strict_prefix", "diverges_midway", "extends", "unrelated"])
def test_cache_equals_recompute(engine: TransformersEngine, fresh: TransformersEngine, case: str) -> None:
    first = PROMPT
    ids = engine.token_ids(first)
    second = {
        "same": first,
        "strict_prefix": first[: len(first) // 2],
        "diverges_midway": first[: len(first) * 2 // 3] + " Something else entirely.<eoh>\n<|MOSS|>:",
        "extends": first + " Sure. Let me think.",
        "unrelated": "<|Human|>: 你好<eoh>\n<|MOSS|>:",
    }[case]
    _, got = _chain(engine, fresh, [first, second])
    new = engine.token_ids(second)
    expected = min(common_prefix(ids, new), len(new) - 1)
    assert got.cached_tokens == expected
    assert (expected > 0) == (case != "unrelated")


def test_cache_can_be_reset_or_disabled(engine: TransformersEngine) -> None:
    engine.generate(PROMPT, GREEDY)
    engine.reset_cache()
    assert engine.generate(PROMPT, GREEDY).cached_tokens == 0
    assert engine.generate(PROMPT, GREEDY).cached_tokens > 0


def test_concurrent_calls_equal_sequential(engine: TransformersEngine, fresh: TransformersEngine) -> None:
    prompts = [PROMPT, PROMPT + " Yes", "<|Human|>: hi<eoh>\n<|MOSS|>:", PROMPT[:100]]
    want = [fresh.generate(p, GREEDY).token_ids for p in prompts]
    got: dict[int, tuple[int, ...]] = {}

    def work(i: int) -> None:
        got[i] = engine.generate(prompts[i], GREEDY).token_ids

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [got[i] for i in range(len(prompts))] == want


# ---------------------------------------------------------------- batching


def test_batch_equals_one_by_one(quiet: Any, loaded: Any, fresh: TransformersEngine) -> None:
    base = fresh.generate(PASS1, GREEDY)
    model, _ = _with_token_at(quiet, loaded, "<eoc>", base.token_ids, fresh.token_ids(PASS1))
    engine = TransformersEngine(model, loaded.tokenizer, prefix_cache=False)
    prompts = [PASS1, "<|Human|>: 你好<eoh>\n<|MOSS|>:", "Hello", PROMPT[:150], PROMPT + " The"]
    params = GREEDY.with_(stop_tokens=("<eoc>",), stop=("H H H",))
    one_by_one = [engine.generate(p, params) for p in prompts]
    assert engine.generate_batch(prompts, params) == one_by_one
    assert len({(g.stop_reason, g.completion_tokens) for g in one_by_one}) >= 3  # rows stop independently
    assert engine.generate_batch([], params) == []


def test_the_engine_offers_the_step_batching_api(engine: TransformersEngine, loaded: Any) -> None:
    assert isinstance(engine, StepBatchable) and isinstance(engine, Engine)
    ids, stop_ids = engine.prepare(PROMPT, GREEDY.with_(stop_tokens=("<eom>",)))
    assert ids == engine.token_ids(PROMPT) and list(stop_ids.values()) == ["<eom>"]
    assert engine.decode(engine.token_ids("The capital of France?")) == "The capital of France?"
    assert engine.vocab_limit == len(loaded.tokenizer)
    assert engine.pad_id in {loaded.tokenizer.pad_token_id, *engine.eos_ids, 0}
    with engine.lock, torch.inference_mode():
        cache, reused = engine.shared_cache(ids, 3, len(ids) + 8)  # the prefix ids[:-1], repeated for 3 rows
    assert reused == 0 and engine.runner.cached_ids == ids[:-1]
    assert cache.get_seq_length() == len(ids) - 1


def test_batch_prefills_the_shared_prefix_once(engine: TransformersEngine, fresh: TransformersEngine) -> None:
    system = fmt.system_prompt()
    asked = ["What is the capital of France?", "Hi", "Tell me a long story about a cat and a dog, please.", "Hi"]
    prompts = [fmt.chat_prompt(system, [], q) for q in asked]
    params = GREEDY.with_(max_new_tokens=8)
    want = [fresh.generate(p, params) for p in prompts]
    shared = min(common_prefix(engine.token_ids(prompts[0]), engine.token_ids(p)) for p in prompts)
    assert shared > 100  # the system prompt and the Human tag
    calls: list[int] = []
    forward = engine.runner.forward
    engine.runner.forward = lambda ids, *a: calls.append(ids.numel()) or forward(ids, *a)  # type: ignore[method-assign]
    engine.generate(system[:200], params)  # the kept cache now holds part of the shared prefix
    kept = engine.runner.cached_ids
    calls.clear()
    got = engine.generate_batch(prompts, params)
    assert [(g.text, g.token_ids, g.stop_reason, g.prompt_tokens) for g in got] == [
        (g.text, g.token_ids, g.stop_reason, g.prompt_tokens) for g in want
    ]
    reused = common_prefix(kept, engine.token_ids(prompts[0]))
    assert 0 < reused < shared
    assert [g.cached_tokens for g in got] == [reused] + [shared] * 3
    longest = max(engine.count_tokens(p) for p in prompts) - shared
    assert calls[:2] == [shared - reused, len(prompts) * longest]  # the prefix once, then the padded suffixes
    assert engine.runner.cached_ids == engine.token_ids(prompts[0])[:shared]  # kept for the next prompt
    after = engine.generate(prompts[1], params)
    assert after.cached_tokens == shared and after.token_ids == want[1].token_ids
    no_cache = fresh.generate_batch(prompts, params)  # prefix_cache=False: the prefix is prefilled, not kept
    assert [g.token_ids for g in no_cache] == [g.token_ids for g in want]
    assert [g.cached_tokens for g in no_cache] == [0] + [shared] * 3 and fresh.runner.cached_ids == []


# ---------------------------------------------------------------- context window


def test_context_window_error_names_the_numbers(quiet: Any, loaded: Any) -> None:
    engine = TransformersEngine(quiet, loaded.tokenizer, context_window=64)
    prompt = " the" * 60
    assert engine.count_tokens(prompt) == 60
    with pytest.raises(ContextWindowExceededError, match=r"60 tokens.*max_new_tokens=10.*70.*64.*truncate='left'"):
        engine.generate(prompt, GREEDY.with_(max_new_tokens=10))
    with pytest.raises(ContextWindowExceededError):
        next(engine.stream(prompt, GREEDY.with_(max_new_tokens=10)))
    cut = engine.generate(prompt, GREEDY.with_(max_new_tokens=10, truncate="left"))
    assert cut.prompt_tokens == 54
    assert cut.token_ids == engine.generate(" the" * 54, GREEDY.with_(max_new_tokens=10)).token_ids
    batch = engine.generate_batch([prompt, "Hello"], GREEDY.with_(max_new_tokens=10, truncate="left"))
    assert [g.prompt_tokens for g in batch] == [54, engine.count_tokens("Hello")]


def test_fit_context_rules() -> None:
    params = SamplingParams(max_new_tokens=4)
    assert fit_context([1, 2, 3], params, 8) == [1, 2, 3]
    assert fit_context(list(range(10)), params.with_(truncate="left"), 8) == [6, 7, 8, 9]
    with pytest.raises(ContextWindowExceededError):
        fit_context(list(range(5)), params, 8)
    with pytest.raises(ContextWindowExceededError):
        fit_context([1], params.with_(max_new_tokens=8, truncate="left"), 8)
    with pytest.raises(ValueError, match="empty"):
        fit_context([], params, 8)
    with pytest.raises(ValueError, match="max_new_tokens"):
        fit_context([1], params.with_(max_new_tokens=0), 8)


def test_context_window_cannot_exceed_positions(quiet: Any, loaded: Any) -> None:
    with pytest.raises(ValueError, match="beyond the model's 2048 positions"):
        TransformersEngine(quiet, loaded.tokenizer, context_window=4096)
    assert TransformersEngine(quiet, loaded.tokenizer).context_window == 2048


# ---------------------------------------------------------------- the protocol and loading


def test_engine_protocol_and_tokens(engine: TransformersEngine, loaded: Any) -> None:
    assert isinstance(engine, Engine)
    assert engine.model_name == "tiny"
    for token, i in loaded.end_token_ids.items():
        assert engine.token_ids(token) == [i]
    text = "<|Human|>: 你好<eoh>\n"
    assert engine.count_tokens(text) == len(engine.token_ids(text)) == len(loaded.tokenizer.encode(text))


def test_from_pretrained_loads_through_load_moss() -> None:
    path = tiny_moss_checkpoint()
    engine = TransformersEngine.from_pretrained(path, precision="fp32")
    assert engine.model_name == path.name and engine.context_window == 2048
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no cache-keyword deprecation or other warning on the hot path
        got = engine.generate(PROMPT, GREEDY.with_(max_new_tokens=4))
        engine.generate(PROMPT + " Yes", GREEDY.with_(max_new_tokens=4))
        engine.generate_batch([PROMPT, "Hi"], GREEDY.with_(max_new_tokens=4))
    assert got.completion_tokens <= 4


def test_importing_does_not_import_torch() -> None:
    code = (
        "import sys, moss_agent.engines.base, moss_agent.testing.engines; "
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
