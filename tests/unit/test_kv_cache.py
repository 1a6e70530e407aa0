"""The preallocated KV cache: the same logits as transformers' DynamicCache, without a copy per step."""

from __future__ import annotations

import copy
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from moss_agent.checkpoints.loading import load_moss  # noqa: E402
from moss_agent.engines.kv_cache import ModelRunner, preallocated_cache, reserve  # noqa: E402
from moss_agent.testing.checkpoints import tiny_moss_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    torch.manual_seed(0)
    return ModelRunner(load_moss(tiny_moss_checkpoint(dtype="float32"), precision="fp32").model)


def _dynamic(runner: ModelRunner) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=runner.model.config)


def _steps(runner: ModelRunner, cache: Any, ids: list[int], start: int = 0, batch: int = 1) -> list[Any]:
    """Prefill ``ids`` then feed 4 greedy tokens one at a time; every step's logits."""
    out = []
    with torch.inference_mode():
        x = torch.tensor([ids] * batch)
        logits = runner.forward(x, torch.arange(start, start + len(ids)).expand(batch, -1), cache)
        out.append(logits)
        pos = start + len(ids)
        for _ in range(4):
            token = logits.argmax(-1, keepdim=True)
            logits = runner.forward(token, torch.full((batch, 1), pos), cache)
            out.append(logits)
            pos += 1
    return out


def _layers(cache: Any) -> list[Any]:
    layers = getattr(cache, "layers", None)
    if not layers or not hasattr(layers[0], "reserve"):
        pytest.skip("this transformers has no cache layers: the plain DynamicCache is used")
    return layers  # type: ignore[no-any-return]


def test_same_logits_as_dynamic_cache_and_no_copy_per_step(runner: ModelRunner) -> None:
    ids = list(range(5, 35))
    cache = preallocated_cache(runner.model.config, len(ids) + 4)
    want = _steps(runner, _dynamic(runner), ids)
    got = _steps(runner, cache, ids)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    layer = _layers(cache)[0]
    assert layer._kbuf.shape[-2] == len(ids) + 4  # the reservation, never outgrown
    assert layer.keys.data_ptr() == layer._kbuf.data_ptr() and cache.get_seq_length() == len(ids) + 4


def test_growing_past_the_reservation_and_cropping(runner: ModelRunner) -> None:
    ids = list(range(5, 25))
    cache = preallocated_cache(runner.model.config)  # nothing reserved: grows by doubling
    _steps(runner, cache, ids)
    cache.crop(-10)  # as the prefix cache does for a prompt sharing the first 14 tokens
    assert cache.get_seq_length() == 14
    got = _steps(runner, cache, list(range(40, 50)), start=14)
    want_cache = _dynamic(runner)
    _steps(runner, want_cache, ids)
    want_cache.crop(-10)
    want = _steps(runner, want_cache, list(range(40, 50)), start=14)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_batch_operations_and_deepcopy_keep_it_right(runner: ModelRunner) -> None:
    ids = list(range(7, 19))
    cache = preallocated_cache(runner.model.config, 64)
    want_cache = _dynamic(runner)
    for c in (cache, want_cache):
        _steps(runner, c, ids)
    copied = copy.deepcopy(cache)
    for c in (copied, want_cache):
        c.batch_repeat_interleave(3)
        c.batch_select_indices(torch.tensor([0, 2]))
    reserve(copied, 80)
    got = _steps(runner, copied, [3, 4, 5], start=len(ids) + 4, batch=2)
    want = _steps(runner, want_cache, [3, 4, 5], start=len(ids) + 4, batch=2)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert _layers(cache)[0].keys.shape[0] == 1  # the original is untouched


def test_lean_step_gives_the_models_logits_bit_for_bit(runner: ModelRunner) -> None:
    from moss_agent.engines.codegen_step import lean_step, supports_lean_step

    assert supports_lean_step(runner.model)
    ids = list(range(9, 40))
    ours, theirs = preallocated_cache(runner.model.config, 64), _dynamic(runner)
    with torch.inference_mode():
        for cache in (ours, theirs):
            runner._model_forward(torch.tensor([ids]), torch.arange(len(ids)).unsqueeze(0), cache, None)
        token = torch.tensor([[5]])
        for pos in range(len(ids), len(ids) + 5):
            got = lean_step(runner.model, token, torch.tensor([[pos]]), ours)
            want = runner._model_forward(token, torch.tensor([[pos]]), theirs, None)
            assert torch.equal(got, want)
            token = got.argmax(-1, keepdim=True)


def test_runner_turns_the_lean_step_on_only_when_it_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    import moss_agent.engines.kv_cache as kv

    model = load_moss(tiny_moss_checkpoint(dtype="float32"), precision="fp32").model
    good = ModelRunner(model)
    assert good._lean is None
    want = _steps(good, preallocated_cache(model.config, 40), list(range(5, 15)))
    assert good._lean is True
    monkeypatch.setattr(kv, "lean_step", lambda *args: torch.zeros(1, model.config.vocab_size))
    bad = ModelRunner(model)
    got = _steps(bad, preallocated_cache(model.config, 40), list(range(5, 15)))
    assert bad._lean is False and all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
