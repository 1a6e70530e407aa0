"""Loading tiny checkpoints in the released MOSS layout into transformers' CodeGen, and the loader's errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from moss_agent.checkpoints.hardware import Hardware
from moss_agent.checkpoints.loading import (
    InsufficientMemoryError,
    LoadedMoss,
    MossCheckpointError,
    load_moss,
)
from moss_agent.protocol.format import END_TOKENS
from moss_agent.testing.checkpoints import tiny_moss_checkpoint

CPU = Hardware.simulated(cpu_gib=16)
PROMPT = "<|Human|>: 你好, what is 2+2?<eoh>\n<|MOSS|>:"


@pytest.fixture(scope="module")
def tiny() -> Path:
    return tiny_moss_checkpoint()


@pytest.fixture(scope="module")
def loaded(tiny: Path) -> LoadedMoss:
    return load_moss(tiny, hardware=CPU)


def _logits(loaded: LoadedMoss, text: str = PROMPT) -> Any:
    import torch

    ids = loaded.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return loaded.model(ids).logits.float()


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_moss_dir_loads_into_builtin_codegen(loaded: LoadedMoss, tiny: Path) -> None:
    import torch
    from transformers import CodeGenForCausalLM

    assert type(loaded.model) is CodeGenForCausalLM
    assert loaded.plan.precision == "fp32" and loaded.plan.hf_device_map() == {"": "cpu"}
    assert loaded.path == tiny and not loaded.model.training
    files: dict[str, torch.Tensor] = {}
    for shard in sorted(tiny.glob("pytorch_model-*.bin")):
        files.update(torch.load(shard, weights_only=True))
    state = loaded.model.state_dict()
    assert not [k for k in state if "causal_mask" in k]  # the release's non-learned buffers are dropped
    assert set(state) == {k for k in files if not k.endswith("causal_mask")}
    for key in ("transformer.wte.weight", "transformer.h.1.attn.qkv_proj.weight", "lm_head.bias"):
        assert torch.equal(state[key], files[key].float()), key


def test_logits_finite_and_greedy_generation_runs(loaded: LoadedMoss) -> None:
    import torch

    logits = _logits(loaded)
    assert logits.shape[-1] == json.loads((loaded.path / "config.json").read_text())["vocab_size"]
    assert torch.isfinite(logits).all()
    ids = loaded.tokenizer(PROMPT, return_tensors="pt").input_ids
    first = loaded.model.generate(ids, max_new_tokens=6, do_sample=False)
    again = loaded.model.generate(ids, max_new_tokens=6, do_sample=False)
    assert first.shape[1] == ids.shape[1] + 6 and torch.equal(first, again)
    assert first[0, ids.shape[1]].item() == logits[0, -1].argmax().item()


def test_end_tokens_are_single_ids_looked_up(loaded: LoadedMoss) -> None:
    added = json.loads((loaded.path / "added_tokens.json").read_text())
    assert loaded.end_token_ids == {t: added[t] for t in END_TOKENS}
    for token, token_id in loaded.end_token_ids.items():
        assert loaded.tokenizer.encode(f"x{token}\n", add_special_tokens=False)[1] == token_id
    assert loaded.tokenizer.eos_token_id == loaded.end_token_ids["<eom>"]


def test_safetensors_variant_gives_the_same_model(loaded: LoadedMoss, tmp_path: Path) -> None:
    import torch

    path = tiny_moss_checkpoint(tmp_path / "st", weights_format="safetensors")
    assert not list(path.glob("*.bin"))
    assert torch.equal(_logits(load_moss(path, hardware=CPU)), _logits(loaded))


def test_standard_codegen_dir_loads(loaded: LoadedMoss, tmp_path: Path) -> None:
    import torch

    loaded.model.save_pretrained(tmp_path / "cg")
    loaded.tokenizer.save_pretrained(tmp_path / "cg")
    assert json.loads((tmp_path / "cg" / "config.json").read_text())["model_type"] == "codegen"
    again = load_moss(tmp_path / "cg", hardware=CPU)
    assert torch.equal(_logits(again), _logits(loaded))


def test_gptj_dir_loads(loaded: LoadedMoss, tmp_path: Path) -> None:
    import torch
    from transformers import GPTJConfig, GPTJForCausalLM

    rows = loaded.model.config.vocab_size  # every id of the tokenizer saved beside it
    config = GPTJConfig(
        vocab_size=rows, n_positions=2048, n_embd=64, n_layer=2, n_head=4, rotary_dim=16, bos_token_id=0
    )
    torch.manual_seed(0)
    GPTJForCausalLM(config).save_pretrained(tmp_path / "gptj")
    loaded.tokenizer.save_pretrained(tmp_path / "gptj")
    gptj = load_moss(tmp_path / "gptj", hardware=CPU)
    assert type(gptj.model) is GPTJForCausalLM and torch.isfinite(_logits(gptj)).all()


def test_disk_offload_from_the_plan_matches(loaded: LoadedMoss, tiny: Path, tmp_path: Path) -> None:
    import torch

    est = loaded.plan.estimate
    cap = est.turn - est.load // 3  # RAM for the activations and a part of the weights: the rest goes to disk
    offloaded = load_moss(
        tiny, precision="fp32", hardware=CPU, max_memory={"cpu": cap}, offload_folder=tmp_path / "off"
    )
    values = set(offloaded.plan.device_map.values())
    assert values == {"cpu", "disk"} and offloaded.plan.offloaded
    assert torch.allclose(_logits(offloaded), _logits(loaded), atol=1e-5)


def test_bin_is_read_with_weights_only(tiny: Path, tmp_path: Path) -> None:
    import torch

    path = _copy(tiny, tmp_path / "evil")
    sentinel = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> Any:
            return (Path.touch, (sentinel,))

    shard = path / "pytorch_model-00002-of-00002.bin"
    torch.save({**torch.load(shard, weights_only=True), "extra": Payload()}, shard)
    with pytest.raises(MossCheckpointError, match="weights_only"):
        load_moss(path, hardware=CPU)
    assert not sentinel.exists()


def test_missing_files_are_named(tiny: Path, tmp_path: Path) -> None:
    path = _copy(tiny, tmp_path / "partial")
    (path / "pytorch_model-00002-of-00002.bin").unlink()
    (path / "merges.txt").unlink()
    with pytest.raises(MossCheckpointError, match=r"merges\.txt, pytorch_model-00002-of-00002\.bin"):
        load_moss(path, hardware=CPU)
    (path / "config.json").unlink()
    with pytest.raises(MossCheckpointError, match=r"no config\.json"):
        load_moss(path, hardware=CPU)


def test_wrong_model_type_is_refused(tiny: Path, tmp_path: Path) -> None:
    path = _copy(tiny, tmp_path / "llama")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(MossCheckpointError, match="model_type is 'llama'"):
        load_moss(path, hardware=CPU)


def test_tokenizer_without_an_end_token_is_refused(tiny: Path, tmp_path: Path) -> None:
    path = _copy(tiny, tmp_path / "notok")
    added = json.loads((path / "added_tokens.json").read_text())
    del added["<eoc>"]
    (path / "added_tokens.json").write_text(json.dumps(added))
    with pytest.raises(MossCheckpointError, match="'<eoc>'"):
        load_moss(path, hardware=CPU)


def test_too_little_memory_is_refused_before_reading_weights(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    def no_read(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("weights were read")

    monkeypatch.setattr(transformers.CodeGenForCausalLM, "from_pretrained", no_read)
    with pytest.raises(InsufficientMemoryError, match="does not fit"):
        load_moss(tiny, hardware=Hardware.simulated(cpu_gib=2.001))


def test_hub_id_offline_says_how_to_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MossCheckpointError, match=r"HF_HUB_OFFLINE.*hf download moss-agent-test/absent"):
        load_moss("moss-agent-test/absent", hardware=CPU)
    with pytest.raises(MossCheckpointError, match="no such directory: /no/such/moss/dir"):
        load_moss("/no/such/moss/dir", hardware=CPU)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_bitsandbytes_on_cpu(loaded: LoadedMoss, tiny: Path, precision: str) -> None:
    import bitsandbytes as bnb
    import torch

    quant = load_moss(tiny, precision=precision, hardware=CPU)
    assert quant.plan.quantization == precision
    fc_in = quant.model.transformer.h[0].mlp.fc_in
    if precision == "int8":
        assert isinstance(fc_in, bnb.nn.Linear8bitLt) and quant.plan.dtype == "float16"
    else:
        assert isinstance(fc_in, bnb.nn.Linear4bit) and isinstance(quant.model.lm_head, bnb.nn.Linear4bit)
        assert isinstance(quant.model.get_input_embeddings(), bnb.nn.EmbeddingNF4)
    logits, reference = _logits(quant)[0, -1], _logits(loaded)[0, -1]
    assert torch.isfinite(logits).all()
    assert torch.corrcoef(torch.stack([logits, reference]))[0, 1] > 0.9  # quantised, not garbage
    ids = quant.tokenizer(PROMPT, return_tensors="pt").input_ids
    assert quant.model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
