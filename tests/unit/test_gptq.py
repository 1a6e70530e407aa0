"""GPTQ-for-LLaMa packing: unpack, dequantise, repack, and the release's own QuantLinear.pack as an oracle."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from unittest import mock

import pytest

torch = pytest.importorskip("torch")

from moss_agent.checkpoints import gptq  # noqa: E402

RELEASE = Path(__file__).resolve().parents[2].parent / "shared" / "moss_release"


def _loop_dequantize(t: dict[str, torch.Tensor], bits: int, cols: range) -> torch.Tensor:
    """The issue's formula, element by element (an independent reference for a few output columns)."""
    p, maxq = 32 // bits, 2**bits - 1
    qw, qz, sc, gi = (t[k].tolist() for k in gptq.PARTS)
    out = torch.empty(len(cols), len(gi))
    for i, n in enumerate(cols):
        for k, g in enumerate(gi):
            q = (qw[k // p][n] >> (bits * (k % p))) & maxq
            z = ((qz[g][n // p] >> (bits * (n % p))) & maxq) + 1
            out[i, k] = sc[g][n] * (q - z)
    return out


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_and_unpack_invert_each_other(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 2**bits, (64, 40), generator=gen, dtype=torch.int32)
    packed = gptq.pack_rows(values, bits)
    assert packed.shape == (64 * bits // 32, 40) and packed.dtype == torch.int32
    assert torch.equal(gptq.unpack_rows(packed, bits), values)
    assert torch.equal(gptq.unpack_cols(gptq.pack_cols(values.t(), bits), bits), values.t())
    # the first value sits in the lowest bits, as QuantLinear.pack puts it
    assert int(packed[0, 0]) & (2**bits - 1) == int(values[0, 0])


def test_pack_refuses_values_that_do_not_fit() -> None:
    with pytest.raises(gptq.GPTQError, match="outside"):
        gptq.pack_rows(torch.full((8, 1), 16, dtype=torch.int32), 4)
    with pytest.raises(gptq.GPTQError, match="whole"):
        gptq.pack_rows(torch.zeros((7, 1), dtype=torch.int32), 4)


@pytest.mark.parametrize("bits", [4, 8])
def test_dequantize_follows_the_formula_and_is_close_to_the_weight(bits: int) -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 256, generator=gen) * 0.02
    layer = gptq.quantize(weight, torch.randn(48, generator=gen), bits)
    assert layer.bits == gptq.bits_of(layer.qweight.shape[0], 256) == bits
    exact = gptq.dequantize(layer)
    cols = range(0, 48, 5)
    assert torch.equal(exact[list(cols)], _loop_dequantize(layer.tensors(), bits, cols))
    step = (weight.max() - weight.min()) / (2**bits - 1)
    assert (exact - weight).abs().max() <= step  # round to nearest: within one step
    assert torch.equal(gptq.dequantize(layer, torch.float16), exact.half())  # rounded once from the exact value


def test_select_outputs_repacks_the_zeros_along_the_outputs() -> None:
    gen = torch.Generator().manual_seed(3)
    layer = gptq.quantize(torch.randn(96, 128, generator=gen), None, 4)
    index = torch.cat([torch.arange(64, 80), torch.arange(0, 16)])
    part = gptq.select_outputs(layer, index)
    assert torch.equal(gptq.dequantize(part), gptq.dequantize(layer)[index])
    assert part.qzeros.shape == (1, 32 * 4 // 32)


def test_from_tensors_names_what_is_wrong() -> None:
    layer = gptq.quantize(torch.randn(32, 128), None, 4)
    t = layer.tensors()
    with pytest.raises(gptq.GPTQError, match=r"h\.0\.attn\.qkv_proj lacks qzeros"):
        gptq.PackedLinear.from_tensors({k: v for k, v in t.items() if k != "qzeros"}, "h.0.attn.qkv_proj")
    with pytest.raises(gptq.GPTQError, match="not 2, 4 or 8 bits"):
        gptq.PackedLinear.from_tensors({**t, "qweight": t["qweight"][:3]}, "x")
    with pytest.raises(gptq.GPTQError, match="do not fit"):
        gptq.PackedLinear.from_tensors({**t, "scales": t["scales"][:, :5]}, "x")


def _release_quantization() -> types.ModuleType:
    """The release's quantization.py, importable without Triton or CUDA (its kernels are never called)."""
    triton = mock.MagicMock()
    triton.jit = lambda f: f
    autotune = types.ModuleType("models.custom_autotune")
    autotune.autotune = lambda **_: lambda f: f  # type: ignore[attr-defined]
    autotune.__all__ = ["autotune"]  # type: ignore[attr-defined]
    stubs = {
        "triton": triton,
        "triton.language": triton.language,
        "models": types.ModuleType("models"),
        "models.custom_autotune": autotune,
    }
    with mock.patch.dict(sys.modules, stubs), mock.patch.object(sys, "path", [str(RELEASE), *sys.path]):
        sys.modules.pop("quantization", None)
        import quantization  # type: ignore[import-not-found]

        sys.modules.pop("quantization", None)
    return quantization


@pytest.mark.skipif(not (RELEASE / "quantization.py").is_file(), reason="../shared/moss_release is absent")
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_packs_bit_for_bit_as_the_release(bits: int) -> None:
    release = _release_quantization()
    gen = torch.Generator().manual_seed(bits)
    linear = torch.nn.Linear(256, 96)
    linear.weight.data = torch.randn(96, 256, generator=gen) * 0.02
    mine = gptq.quantize(linear.weight.data, linear.bias.data, bits)
    # GPTQ hands pack() the quantised weight and the per-(output, group) scale and zero it chose
    scale = mine.scales.float().t().contiguous()  # (out, groups)
    zero = gptq.unpack_cols(mine.qzeros, bits).t().float() + 1
    fake = torch.nn.Linear(256, 96)
    fake.weight.data = gptq.dequantize(mine)
    fake.bias.data = linear.bias.data.clone()
    theirs = release.QuantLinear(bits, 128, 256, 96, True)
    theirs.pack(fake, scale, zero.clone())
    for part in gptq.PARTS:
        assert torch.equal(getattr(theirs, part), getattr(mine, part)), part
    assert torch.equal(theirs.bias, mine.bias)
