"""The demonstration model: trained here, in the released MOSS layout, and it really writes plugin commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moss_agent.demo import model as demo_model
from moss_agent.protocol import format as fmt

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # training runs about 3 minutes on two cores


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    """The default demonstration model (trained once into the cache, a few minutes on two cores)."""
    return demo_model.demo_checkpoint()


@pytest.fixture(scope="module")
def short_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Three 3-step trainings: seed 0 twice, seed 1 once."""
    root = tmp_path_factory.mktemp("demo")
    return (
        demo_model.demo_checkpoint(root / "a", steps=3),
        demo_model.demo_checkpoint(root / "b", steps=3),
        demo_model.demo_checkpoint(root / "c", steps=3, seed=1),
    )


def _weights(path: Path) -> dict[str, object]:
    import torch

    out: dict[str, object] = {}
    for shard in sorted(path.glob("pytorch_model-*.bin")):
        out.update(torch.load(shard, weights_only=True))
    return out


def test_same_seed_same_weights(short_runs: tuple[Path, Path, Path]) -> None:
    a, b, c = (_weights(p) for p in short_runs)
    assert a.keys() == b.keys() == c.keys()
    assert all(a[k].equal(b[k]) for k in a)  # type: ignore[attr-defined]
    assert not all(a[k].equal(c[k]) for k in a)  # type: ignore[attr-defined]


def test_layout_is_the_released_one(short_runs: tuple[Path, Path, Path]) -> None:
    path = short_runs[0]
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "pytorch_model.bin.index.json", "vocab.json", "merges.txt", "added_tokens.json"} <= names
    assert {"pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"} <= names
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "moss" and config["architectures"] == ["MossForCausalLM"]
    index = json.loads((path / "pytorch_model.bin.index.json").read_text())
    assert "transformer.h.0.attn.causal_mask" in index["weight_map"]
    assert set(index["weight_map"]) == set(_weights(path))


def test_tokenizer_keeps_numbers_and_names_copyable(short_runs: tuple[Path, Path, Path]) -> None:
    import re

    from moss_agent.checkpoints.loading import load_tokenizer

    tokenizer, end_ids = load_tokenizer(short_runs[0])
    assert sorted(end_ids) == sorted(fmt.END_TOKENS)
    for tag in fmt.ROLE_TAGS:
        assert len(tokenizer.encode(tag, add_special_tokens=False)) == 1
    text = 'Who is Velsapry? Calculate("12+7*(3-1)") gives x = 1234.'
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode(text, add_special_tokens=False)]
    # A space joins only a lowercase word; digits join only digits; punctuation stays alone.
    assert all(re.fullmatch(r" ?[a-z]+|[A-Z][a-zA-Z]*|[0-9]+|[^A-Za-z0-9]", p) for p in pieces), pieces
    # A made-up name is the same tokens after a space as inside Search("...").
    name = tokenizer.encode("Velsapry", add_special_tokens=False)
    asked = tokenizer.encode("Who is Velsapry?", add_special_tokens=False)
    command = tokenizer.encode('Search("Velsapry")', add_special_tokens=False)
    assert asked[-len(name) - 1 : -1] == name and command[-len(name) - 2 : -2] == name
    text = fmt.system_prompt(["search"]) + "<|Human|>: 12 + 7 = ?<eoh>\n"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_training_forward_is_codegens(short_runs: tuple[Path, Path, Path]) -> None:
    import torch

    from moss_agent.checkpoints.loading import load_moss

    model = load_moss(short_runs[0], precision="fp32", device_map="cpu").model
    ids = torch.randint(0, 800, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        whole, _ = demo_model._forward(model, ids)
        _, prefix = demo_model._forward(model, ids[:1, :25])
        rest, _ = demo_model._forward(model, ids[:, 25:], prefix)
    assert torch.allclose(model.lm_head(whole), expected, atol=1e-4)
    assert torch.allclose(model.lm_head(rest[:1]), expected[:1, 25:], atol=1e-4)


def test_demo_model_uses_plugins_on_unseen_questions(checkpoint: Path) -> None:
    report = demo_model.evaluate_demo_model(checkpoint, n=50)
    print(report)
    # Measured with 100 questions per kind (greedy): commands 90 / 98 / 95 / 100 / 100 / 50 %,
    # replies 97 / 94 / 89 / 100 / 94 / 99 %.
    commands = {"calculator": 0.75, "solver": 0.85, "search": 0.8, "chat": 0.9, "memory": 0.9, "followup": 0.25}
    replies = {"calculator": 0.8, "solver": 0.8, "search": 0.7, "chat": 0.9, "memory": 0.8, "followup": 0.8}
    for kind in commands:
        assert report.command[kind] >= commands[kind], (kind, report.command[kind], report.samples[kind])
        assert report.reply[kind] >= replies[kind], (kind, report.reply[kind], report.samples[kind])


def test_cached_checkpoint_is_reused(checkpoint: Path) -> None:
    stamp = (checkpoint / "config.json").stat().st_mtime_ns
    assert demo_model.demo_checkpoint() == checkpoint
    assert (checkpoint / "config.json").stat().st_mtime_ns == stamp


def test_bad_steps_raise() -> None:
    with pytest.raises(ValueError, match="positive"):
        demo_model.demo_checkpoint(steps=0)
