"""The tiny MOSS checkpoint builder: the released layout, the tokenizer, seeding and the cache."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from moss_agent.checkpoints.files import TOKENIZER_FILES, WHITESPACE_RUNS
from moss_agent.protocol import format as fmt
from moss_agent.testing import checkpoints as ck


def _tensors(path: Path) -> dict:
    import torch

    out: dict = {}
    for f in sorted(path.glob("pytorch_model*.bin")):
        out.update(torch.load(f, weights_only=True, map_location="cpu"))
    return out


RELEASE = Path(__file__).resolve().parents[2].parent / "shared" / "moss_release"


@pytest.fixture(scope="module")
def tiny() -> Path:
    return ck.tiny_moss_checkpoint()


def test_config_has_the_released_keys(tiny: Path) -> None:
    config = json.loads((tiny / "config.json").read_text())
    assert config["model_type"] == "moss"
    assert config["architectures"] == ["MossForCausalLM"]
    assert config["auto_map"]["AutoConfig"] == "configuration_moss.MossConfig"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_moss.MossForCausalLM"
    assert (config["n_positions"], config["n_ctx"], config["n_inner"]) == (2048, 2048, None)
    assert config["activation_function"] == "gelu_new"
    assert config["torch_dtype"] == "float16"
    assert config["tie_word_embeddings"] is False
    assert (config["wbits"], config["groupsize"]) == (32, 128)  # the release's "not quantised"
    assert config["transformers_version"] == "4.25.1"
    assert config["vocab_size"] % 64 == 0


def _reference_defaults() -> dict[str, object]:
    """``MossConfig.__init__``'s keyword defaults, read from the release's source (not run)."""
    import ast

    tree = ast.parse((RELEASE / "configuration_moss.py").read_text(encoding="utf-8"))
    init = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    args = init.args.args[-len(init.args.defaults) :]
    return {a.arg: ast.literal_eval(d) for a, d in zip(args, init.args.defaults, strict=True)}


@pytest.mark.skipif(not (RELEASE / "configuration_moss.py").is_file(), reason="../shared/moss_release is absent")
def test_config_carries_every_default_of_the_reference_class(tiny: Path) -> None:
    config = json.loads((tiny / "config.json").read_text())
    defaults = _reference_defaults()
    sizes = {"vocab_size", "n_embd", "n_layer", "n_head", "rotary_dim", "bos_token_id", "eos_token_id"}
    assert set(defaults) <= set(config)
    assert {k: v for k, v in defaults.items() if k not in sizes} == {k: config[k] for k in defaults if k not in sizes}
    # and every key PretrainedConfig.to_dict() adds under transformers 4.25.1
    assert {"return_dict", "id2label", "num_beams", "max_length", "torchscript", "tokenizer_class"} <= set(config)
    assert len(config) == 81


def test_index_maps_every_tensor_to_its_shard(tiny: Path) -> None:
    index = json.loads((tiny / "pytorch_model.bin.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    tensors = _tensors(tiny)
    assert set(tensors) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for f in files:
        import torch

        shard = torch.load(tiny / f, weights_only=True)
        assert {k for k, v in index["weight_map"].items() if v == f} == set(shard)


def test_weights_use_the_moss_names_and_shapes(tiny: Path) -> None:
    import torch

    config = json.loads((tiny / "config.json").read_text())
    sd = _tensors(tiny)
    v, d = config["vocab_size"], config["n_embd"]
    assert sd["transformer.wte.weight"].shape == (v, d)
    assert sd["lm_head.weight"].shape == (v, d) and sd["lm_head.bias"].shape == (v,)
    assert not torch.equal(sd["lm_head.weight"], sd["transformer.wte.weight"])  # untied
    for i in range(config["n_layer"]):
        mask = sd[f"transformer.h.{i}.attn.causal_mask"]
        assert mask.dtype == torch.bool and mask.shape == (1, 1, 2048, 2048)
        assert torch.equal(mask[0, 0], torch.tril(torch.ones(2048, 2048, dtype=torch.bool)))
        assert sd[f"transformer.h.{i}.attn.qkv_proj.weight"].shape == (3 * d, d)
        assert sd[f"transformer.h.{i}.mlp.fc_in.weight"].shape == (4 * d, d)
        assert f"transformer.h.{i}.attn.qkv_proj.bias" not in sd
    assert all(t.dtype == torch.float16 for k, t in sd.items() if not k.endswith("causal_mask"))


def test_tokenizer_files_name_moss_tokenizer_and_load_fast(tiny: Path) -> None:
    from transformers import GPT2TokenizerFast

    tok_config = json.loads((tiny / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "MossTokenizer" and tok_config["add_bos_token"] is False
    config = json.loads((tiny / "config.json").read_text())
    added = json.loads((tiny / "added_tokens.json").read_text())
    assert list(added) == [*WHITESPACE_RUNS, *fmt.END_TOKENS]  # the release's structure: runs, then end tokens
    bos = config["bos_token_id"]
    assert list(added.values()) == list(range(bos + 1, bos + 1 + len(added)))  # right after <|endoftext|>

    tok = GPT2TokenizerFast.from_pretrained(tiny)
    assert 900 < len(tok) <= config["vocab_size"] and max(added.values()) == len(tok) - 1
    for token in (*WHITESPACE_RUNS, *fmt.END_TOKENS, ck.ENDOFTEXT):
        ids = tok.encode(token)
        assert ids == [tok.convert_tokens_to_ids(token)], token
    assert tok.eos_token == fmt.EOM and tok.eos_token_id == config["eos_token_id"] == added[fmt.EOM]
    assert tok.bos_token_id == config["bos_token_id"] == len(json.loads((tiny / "vocab.json").read_text())) - 1
    text = fmt.chat_prompt(fmt.system_prompt(["Calculate"]), [], "你好，2+2=? <eoh> café")
    ids = tok.encode(text)
    assert ids[0] != tok.bos_token_id  # add_bos_token false
    assert tok.decode(ids) == text
    assert len(ids) < len(text) / 2  # a trained BPE, not bytes


def test_tokenizer_dir_alone() -> None:
    path = ck.tiny_moss_tokenizer_dir()
    assert sorted(p.name for p in path.iterdir()) == sorted(TOKENIZER_FILES)


def test_same_seed_gives_bit_identical_weights(tmp_path: Path) -> None:
    import torch

    a = _tensors(ck.tiny_moss_checkpoint(tmp_path / "a", seed=3, n_layer=1, shards=1))
    b = _tensors(ck.tiny_moss_checkpoint(tmp_path / "b", seed=3, n_layer=1, shards=1))
    c = _tensors(ck.tiny_moss_checkpoint(tmp_path / "c", seed=4, n_layer=1, shards=1))
    assert set(a) == set(b) == set(c)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])
    for name in TOKENIZER_FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "c" / name).read_bytes()


def test_cache_is_keyed_reused_and_safe_under_races(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOSS_AGENT_CACHE", str(tmp_path))
    results: list[Path] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(ck.tiny_moss_checkpoint(n_layer=1, seed=7, shards=1))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    path = results[0]
    assert path.is_relative_to(tmp_path)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary directories left
    stamp = (path / "config.json").stat().st_mtime_ns
    assert ck.tiny_moss_checkpoint(n_layer=1, seed=7, shards=1) == path
    assert (path / "config.json").stat().st_mtime_ns == stamp
    assert ck.tiny_moss_checkpoint(n_layer=1, seed=8, shards=1) != path


@pytest.mark.parametrize(("wbits", "config_wbits"), [(4, None), (8, None), (8, 4)])
def test_gptq_variant_has_packed_tensors(wbits: int, config_wbits: int | None) -> None:
    import torch

    path = ck.tiny_gptq_checkpoint(wbits, config_wbits=config_wbits)
    config = json.loads((path / "config.json").read_text())
    assert config["wbits"] == (config_wbits or wbits) and config["groupsize"] == 128
    sd = _tensors(path)
    d = config["n_embd"]
    p = "transformer.h.0.mlp.fc_out"  # in = 4d, out = d
    assert sd[f"{p}.qweight"].shape == (4 * d // 32 * wbits, d) and sd[f"{p}.qweight"].dtype == torch.int32
    assert sd[f"{p}.qzeros"].shape == (-(-4 * d // 128), d // 32 * wbits)
    assert sd[f"{p}.scales"].shape == (-(-4 * d // 128), d) and sd[f"{p}.scales"].dtype == torch.float16
    assert torch.equal(sd[f"{p}.g_idx"], (torch.arange(4 * d) // 128).int())
    assert f"{p}.weight" not in sd and "lm_head.weight" in sd


def test_safetensors_variant(tmp_path: Path) -> None:
    from safetensors import safe_open

    path = ck.tiny_moss_checkpoint(tmp_path / "st", weights_format="safetensors", n_layer=1)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    names: set[str] = set()
    for f in set(index["weight_map"].values()):
        with safe_open(str(path / f), "pt") as handle:
            names |= set(handle.keys())
    assert names == set(index["weight_map"]) and "lm_head.bias" in names
    assert not list(path.glob("*.bin"))


@pytest.mark.parametrize(
    "kwargs",
    [{"n_embd": 60, "n_head": 4}, {"n_embd": 64, "n_head": 5}, {"rotary_dim": 32}, {"quantized": 3}],
)
def test_bad_sizes_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ck.tiny_moss_checkpoint(**kwargs)


def test_vocab_size_too_small_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        ck.tiny_moss_checkpoint(tmp_path / "x", vocab_size=100)
