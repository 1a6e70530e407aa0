"""GPTQ checkpoints as the -int4 / -int8 releases store them: planned, loaded dequantised, and converted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from moss_agent.checkpoints import gptq  # noqa: E402
from moss_agent.checkpoints import loading as loading_module  # noqa: E402
from moss_agent.checkpoints import plan as plan_module  # noqa: E402
from moss_agent.checkpoints.files import read_tensors, weight_files  # noqa: E402
from moss_agent.checkpoints.hardware import Hardware  # noqa: E402
from moss_agent.checkpoints.loading import load_moss  # noqa: E402
from moss_agent.checkpoints.plan import plan_load  # noqa: E402
from moss_agent.testing.checkpoints import tiny_gptq_checkpoint  # noqa: E402

CPU = Hardware.simulated(cpu_gib=16)
SIZES = {"n_embd": 128, "n_head": 4}  # 128 inputs: one full group of the release's 128
IDS = list(range(3, 60))


@pytest.fixture(scope="module", params=[(4, None), (8, 4)], ids=["int4", "int8-config-says-4"])
def ckpt(request: pytest.FixtureRequest) -> tuple[Path, int]:
    bits, says = request.param
    return tiny_gptq_checkpoint(bits, config_wbits=says, **SIZES), bits


def _formula(parts: dict[str, Any], bits: int) -> Any:
    """``W[n, k] = scales[g[k], n] * (q[k, n] - z[g[k], n])`` with the shifts written out, input by input."""
    p, maxq = 32 // bits, 2**bits - 1
    qweight, qzeros, scales, g_idx = (parts[k].long() if k != "scales" else parts[k].float() for k in gptq.PARTS)
    n_in, n_out = g_idx.shape[0], qweight.shape[1]
    cols = torch.arange(n_out)
    zeros = (qzeros[:, cols // p] >> (bits * (cols % p))) & maxq  # (groups, out)
    weight = torch.empty(n_out, n_in)
    for k in range(n_in):
        q = (qweight[k // p] >> (bits * (k % p))) & maxq
        weight[:, k] = scales[g_idx[k]] * (q - (zeros[g_idx[k]] + 1))
    return weight


def _reference_codegen(path: Path, bits: int) -> Any:
    """transformers' CodeGen holding the weights the formula gives, built without the loader."""
    from transformers import CodeGenConfig, CodeGenForCausalLM

    config = json.loads((path / "config.json").read_text())
    keys = "vocab_size n_positions n_ctx n_embd n_layer n_head rotary_dim n_inner activation_function".split()
    model = CodeGenForCausalLM(CodeGenConfig(**{k: config[k] for k in keys})).eval()
    stored = {k: v for f in weight_files(path) for k, v in read_tensors(f)}
    state = {}
    for name in model.state_dict():
        stem = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and f"{stem}.qweight" in stored:
            state[name] = _formula({p: stored[f"{stem}.{p}"] for p in gptq.PARTS}, bits)
        else:
            state[name] = stored[name].float()
    model.load_state_dict(state)
    return model


def test_bits_come_from_the_tensors(ckpt: tuple[Path, int]) -> None:
    path, bits = ckpt
    plan = plan_load(path, CPU)
    assert plan.spec.wbits == bits and plan.precision == "fp32"
    assert "dequantised exactly" in plan.describe() and "gptq" in dict(plan.alternatives)


def test_fp32_logits_equal_a_codegen_holding_the_dequantised_weights(ckpt: tuple[Path, int]) -> None:
    path, bits = ckpt
    loaded = load_moss(path, precision="fp32", hardware=CPU)
    ids = torch.tensor([IDS])
    with torch.no_grad():
        ours = loaded.model(ids).logits
        reference = _reference_codegen(path, bits)(ids).logits
    assert loaded.plan.spec.wbits == bits
    assert float((ours - reference).abs().max()) <= 1e-5


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precisions_round_the_exact_weights_once(ckpt: tuple[Path, int], precision: str) -> None:
    path, _ = ckpt
    exact = load_moss(path, precision="fp32", hardware=CPU).model
    half = load_moss(path, precision=precision, hardware=CPU).model
    w32 = exact.transformer.h[0].mlp.fc_in.weight
    w16 = half.transformer.h[0].mlp.fc_in.weight
    assert w16.dtype == getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[precision])
    assert torch.equal(w16, w32.to(w16.dtype))


def test_bitsandbytes_precisions_are_refused_for_gptq(ckpt: tuple[Path, int]) -> None:
    with pytest.raises(plan_module.UnsupportedCheckpointError, match='precision="gptq"'):
        load_moss(ckpt[0], precision="int4", hardware=CPU)


def test_gptq_route_says_what_to_install(ckpt: tuple[Path, int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading_module, "gptq_available", lambda: False)
    with pytest.raises(ImportError, match="pip install gptqmodel optimum"):
        load_moss(ckpt[0], precision="gptq", hardware=CPU)


def test_gptq_route_hands_transformers_the_standard_config(
    ckpt: tuple[Path, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import CodeGenForCausalLM

    seen: dict[str, Any] = {}

    def capture(path: Path, **kwargs: Any) -> Any:
        seen.update(kwargs)
        raise RuntimeError("stop before reading weights")

    monkeypatch.setattr(loading_module, "gptq_available", lambda: True)
    monkeypatch.setattr(CodeGenForCausalLM, "from_pretrained", capture)
    with pytest.raises(RuntimeError, match="stop"):
        load_moss(ckpt[0], precision="gptq", hardware=CPU)
    quant = seen["config"].quantization_config
    assert quant == {**gptq.quantization_config(ckpt[1]), "bits": ckpt[1]}
    assert quant["checkpoint_format"] == "gptq" and quant["desc_act"] is False and quant["sym"] is False
    assert seen["dtype"] == torch.float16 and "quantization_config" not in seen


# ---------------------------------------------------------------- convert


def _stored(path: Path) -> dict[str, Any]:
    return {k: v for f in weight_files(path) for k, v in read_tensors(f)}


def _dequantized_linears(path: Path) -> dict[str, Any]:
    return {
        name: gptq.dequantize(item)
        for name, item in gptq.packed_linears(_stored(path).items())
        if isinstance(item, gptq.PackedLinear)
    }


@pytest.mark.parametrize("target", ["gptj", "codegen"])
def test_keep_quantization_writes_standard_gptq_equal_when_dequantised(
    ckpt: tuple[Path, int], target: str, tmp_path: Path
) -> None:
    from moss_agent.checkpoints.convert import convert, split_qkv

    path, bits = ckpt
    report = convert(path, tmp_path / "out", format=target, keep_quantization=True, verify=True)  # type: ignore[arg-type]
    config = json.loads((report.path / "config.json").read_text())
    assert config["quantization_config"] == gptq.quantization_config(bits) and config["model_type"] == target
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4 and report.argmax_agreement == 1.0
    source, converted = _dequantized_linears(path), _dequantized_linears(report.path)
    for name, weight in source.items():
        if target == "gptj" and name.endswith("qkv_proj"):
            base = name[: -len("qkv_proj")]
            for part, expected in zip(("q_proj", "k_proj", "v_proj"), split_qkv(weight), strict=True):
                assert torch.equal(converted[base + part], expected), base + part
        else:
            assert torch.equal(converted[name], weight), name
    assert len(converted) == len(source) + (2 * len(source) // 4 if target == "gptj" else 0)


def test_dequantised_conversion_equals_the_exact_weights(ckpt: tuple[Path, int], tmp_path: Path) -> None:
    from moss_agent.checkpoints.convert import convert, split_qkv

    path, _ = ckpt
    report = convert(path, tmp_path / "fp32", dtype="fp32", verify=True)
    assert report.dtype == "float32" and report.max_abs_diff is not None and report.max_abs_diff <= 1e-5
    written = _stored(report.path)
    assert not any(k.endswith("qweight") for k in written) and "quantization_config" not in json.loads(
        (report.path / "config.json").read_text()
    )
    exact = _dequantized_linears(path)["transformer.h.1.attn.qkv_proj"]
    assert torch.equal(written["transformer.h.1.attn.k_proj.weight"], split_qkv(exact)[1])


def test_command_line_keeps_the_quantization(ckpt: tuple[Path, int], tmp_path: Path) -> None:
    from moss_agent.cli import main

    assert main(["convert", str(ckpt[0]), str(tmp_path / "kept"), "--keep-quantization"]) == 0
    assert "quantization_config" in json.loads((tmp_path / "kept" / "config.json").read_text())
    assert main(["convert", str(ckpt[0]), str(tmp_path / "bad"), "--keep-quantization", "--dtype", "bf16"]) == 2


def test_the_release_s_fp16_rotary_table_drifts_as_documented() -> None:
    """The figures in moss_agent.checkpoints.loading's docstring: the int4 / int8 path built the table under
    torch.set_default_dtype(torch.half), as MossForCausalLM.__init__ does, rounding the inverse frequencies."""

    def table(num_pos: int = 2048, dim: int = 64) -> tuple[Any, Any]:
        inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2) / dim))
        angles = torch.einsum("i , j -> i j", torch.arange(num_pos, dtype=torch.float), inv_freq).float()
        return torch.cat((torch.sin(angles), torch.cos(angles)), dim=1), inv_freq

    exact, inv32 = table()
    torch.set_default_dtype(torch.half)
    try:
        rounded, inv16 = table()
    finally:
        torch.set_default_dtype(torch.float32)
    assert inv16.dtype == torch.float16 and rounded.dtype == torch.float32
    assert float(((inv16.float() - inv32) / inv32).abs().max()) == pytest.approx(5.8e-4, abs=0.05e-4)
    drift = (rounded - exact).abs()
    assert float(drift[:65].max()) == pytest.approx(0.024, abs=0.002)
    assert float(drift[:513].max()) == pytest.approx(0.19, abs=0.01)
    angle = (torch.arange(2048.0)[:, None] * (inv16.float() - inv32)).abs().max()
    assert float(angle) == pytest.approx(0.78, abs=0.01)


@pytest.mark.slow
@pytest.mark.skipif(not plan_module.gptq_available(), reason="gptqmodel and optimum are not installed")
def test_kept_packed_route_matches_the_exact_dequantisation(ckpt: tuple[Path, int]) -> None:
    path, bits = ckpt
    exact = load_moss(path, precision="fp32", device_map="cpu").model
    kept = load_moss(path, precision="gptq")
    ids = torch.tensor([IDS])
    with torch.no_grad():
        reference = exact(ids).logits
        logits = kept.model(ids.to(next(kept.model.parameters()).device)).logits.float().cpu()
    assert kept.plan.precision == "gptq" and kept.plan.spec.wbits == bits
    assert float((logits - reference).abs().max()) < 3e-3  # fp16 kernels: measured 1e-3
    assert torch.equal(logits.argmax(-1), reference.argmax(-1))
