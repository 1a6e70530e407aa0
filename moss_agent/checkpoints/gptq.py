"""GPTQ-for-LLaMa (GPTQ v1) packed Linears, as the ``-int4`` / ``-int8`` MOSS releases store them: pure torch.

A quantised Linear of ``in`` inputs and ``out`` outputs is four tensors (and an fp16 ``bias`` where the Linear has
one). With ``bits`` 4 or 8, ``p = 32 // bits`` values per int32 word and ``maxq = 2**bits - 1``::

    qweight  (in / p, out)  int32    q[k, n] = (qweight[k // p, n] >> (bits * (k % p))) & maxq
    qzeros   (groups, out / p) int32 z[g, n] = ((qzeros[g, n // p] >> (bits * (n % p))) & maxq) + 1
    scales   (groups, out)  float16
    g_idx    (in,)          int32    the group of input k (k // 128 in the release: no act-order)

and the weight is ``W[n, k] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n])``: what the release's Triton kernel
computes, and what transformers' GPTQ integration reads as ``checkpoint_format="gptq"`` (zeros stored minus one).

The product of an fp16 scale and an integer of at most 9 bits is exact in float32, so :func:`dequantize` in float32
is exact, and in float16 it rounds once, as the kernel does. The bits come from the tensors, never from a config:
the released ``moss-moon-003-sft-plugin-int8`` config says ``wbits: 4`` over 8-bit tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "GROUP_SIZE",
    "QUANTIZED_LINEARS",
    "GPTQError",
    "PackedLinear",
    "bits_of",
    "dequantize",
    "dequantized",
    "is_quantized_part",
    "pack_cols",
    "pack_rows",
    "packed_linears",
    "quantization_config",
    "quantize",
    "select_outputs",
    "unpack_cols",
    "unpack_rows",
]

GROUP_SIZE = 128
"""Inputs per quantisation group in the MOSS releases."""
QUANTIZED_LINEARS = (
    *("attn.qkv_proj", "attn.out_proj", "mlp.fc_in", "mlp.fc_out"),
    *("attn.q_proj", "attn.k_proj", "attn.v_proj"),
)
"""The Linears of each block that the releases quantise (and GPT-J's q / k / v after conversion); wte, the layer
norms and lm_head stay fp16."""
PARTS = ("qweight", "qzeros", "scales", "g_idx")
_BIASED = ("mlp.fc_in", "mlp.fc_out")  # CodeGen's attention Linears have no bias


class GPTQError(ValueError):
    """Packed tensors that do not fit together (shapes, bits)."""


def bits_of(qweight_rows: int, in_features: int) -> int:
    """Bits per value from the packed ``qweight`` rows: ``rows * 32 / in_features``.

    Raises:
        GPTQError: When that is not 2, 4 or 8.
    """
    bits, rest = divmod(qweight_rows * 32, max(in_features, 1))
    if rest or bits not in (2, 4, 8):
        raise GPTQError(f"qweight has {qweight_rows} rows for {in_features} inputs: not 2, 4 or 8 bits per value")
    return bits


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """``(rows, n)`` int32 words -> ``(rows * 32 / bits, n)`` int32 values, low bits first (``qweight``)."""
    import torch

    p = 32 // bits
    shifts = (torch.arange(p, dtype=torch.int32) * bits).view(1, p, 1)
    values = (packed.to(torch.int32).unsqueeze(1) >> shifts) & (2**bits - 1)  # arithmetic shift; masked
    return values.reshape(packed.shape[0] * p, packed.shape[1])


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """``(g, cols)`` int32 words -> ``(g, cols * 32 / bits)`` int32 values, low bits first (``qzeros``)."""
    return unpack_rows(packed.t(), bits).t().contiguous()


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of :func:`unpack_rows`: ``(k, n)`` values in ``[0, 2**bits)`` -> ``(k * bits / 32, n)`` int32.

    Raises:
        GPTQError: When ``k`` is not a multiple of ``32 / bits`` or a value does not fit ``bits``.
    """
    import torch

    p = 32 // bits
    if values.shape[0] % p:
        raise GPTQError(f"{values.shape[0]} values do not fill whole {bits}-bit words of {p}")
    if values.numel() and (int(values.min()) < 0 or int(values.max()) > 2**bits - 1):
        raise GPTQError(f"values outside [0, {2**bits - 1}] cannot be packed in {bits} bits")
    shifts = (torch.arange(p, dtype=torch.int64) * bits).view(1, p, 1)
    grouped = values.to(torch.int64).reshape(values.shape[0] // p, p, values.shape[1])
    words = (grouped << shifts).sum(dim=1)  # disjoint bit fields: the sum is their OR
    words = torch.where(words >= 2**31, words - 2**32, words)  # the same 32 bits, as a signed int32
    return words.to(torch.int32)


def pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of :func:`unpack_cols`."""
    return pack_rows(values.t(), bits).t().contiguous()


@dataclass(frozen=True)
class PackedLinear:
    """One GPTQ-packed Linear.

    Attributes:
        qweight: ``(in * bits / 32, out)`` int32.
        qzeros: ``(groups, out * bits / 32)`` int32, zeros minus one.
        scales: ``(groups, out)`` float16.
        g_idx: ``(in,)`` int32 group of each input.
        bias: ``(out,)`` or None.
        bits: Bits per value, from the tensors.
    """

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    bias: torch.Tensor | None
    bits: int

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], name: str = "") -> PackedLinear:
        """From ``qweight``/``qzeros``/``scales``/``g_idx`` (and ``bias``), checking that they fit together.

        Raises:
            GPTQError: A missing tensor or shapes that disagree, naming ``name``.
        """
        missing = [p for p in PARTS if p not in tensors]
        if missing:
            raise GPTQError(f"{name or 'GPTQ Linear'} lacks {', '.join(missing)}")
        qweight, qzeros, scales, g_idx = (tensors[p] for p in PARTS)
        try:
            bits = bits_of(qweight.shape[0], g_idx.shape[0])
        except GPTQError as err:
            raise GPTQError(f"{name}: {err}") from None
        out, groups = qweight.shape[1], scales.shape[0]
        if scales.shape[1] != out or tuple(qzeros.shape) != (groups, out * bits // 32):
            raise GPTQError(
                f"{name}: scales {tuple(scales.shape)} / qzeros {tuple(qzeros.shape)} do not fit qweight "
                f"{tuple(qweight.shape)} at {bits} bits"
            )
        if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
            raise GPTQError(f"{name}: g_idx points outside the {groups} groups")
        return cls(qweight, qzeros, scales, g_idx, tensors.get("bias"), bits)

    @property
    def in_features(self) -> int:
        """Inputs."""
        return int(self.g_idx.shape[0])

    @property
    def out_features(self) -> int:
        """Outputs."""
        return int(self.qweight.shape[1])

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The stored tensors under ``prefix`` (``...qkv_proj.``), bias included when present."""
        out = {f"{prefix}{p}": getattr(self, p) for p in PARTS}
        if self.bias is not None:
            out[f"{prefix}bias"] = self.bias
        return out


def dequantize(layer: PackedLinear, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The ``(out, in)`` weight, exact in float32 (the default) and rounded once in float16 / bfloat16."""
    import torch

    q = unpack_rows(layer.qweight, layer.bits)  # (in, out)
    z = unpack_cols(layer.qzeros, layer.bits) + 1  # (groups, out)
    g = layer.g_idx.long()
    weight = layer.scales.float()[g] * (q - z[g]).float()
    return weight.t().contiguous().to(dtype or torch.float32)


def select_outputs(layer: PackedLinear, index: torch.Tensor) -> PackedLinear:
    """The Linear restricted to the outputs ``index`` (GPT-J's q / k / v out of CodeGen's fused ``qkv_proj``).

    Columns of ``qweight`` / ``scales`` are taken as they are; ``qzeros`` is unpacked and repacked along the outputs.

    Raises:
        GPTQError: When ``len(index)`` does not fill whole words of ``32 / bits`` zeros.
    """
    zeros = unpack_cols(layer.qzeros, layer.bits)[:, index]
    return PackedLinear(
        layer.qweight[:, index].contiguous(),
        pack_cols(zeros, layer.bits),
        layer.scales[:, index].contiguous(),
        layer.g_idx.clone(),
        None if layer.bias is None else layer.bias[index].contiguous(),
        layer.bits,
    )


def quantize(
    weight: torch.Tensor, bias: torch.Tensor | None = None, bits: int = 4, group_size: int = GROUP_SIZE
) -> PackedLinear:
    """Round-to-nearest asymmetric min-max quantisation packed as the release packs (for tiny test checkpoints).

    Per output row and group of ``group_size`` inputs: ``scale = (max - min) / maxq`` over a range that includes
    zero, ``zero = round(-min / scale)``, ``q = clamp(round(w / scale) + zero, 0, maxq)``: GPTQ-for-LLaMa's
    quantiser without the error-compensating updates of GPTQ itself.

    Raises:
        GPTQError: When ``in`` is not a multiple of ``32 / bits``, or ``bits`` is not 2, 4 or 8.
    """
    import torch

    out, inn = weight.shape
    if bits not in (2, 4, 8) or inn % (32 // bits):
        raise GPTQError(f"{inn} inputs do not fill whole {bits}-bit words (bits must be 2, 4 or 8)")
    maxq = 2**bits - 1
    w = weight.float()
    groups = -(-inn // group_size)  # the last group may be short, as QuantLinear allows
    padded = torch.nn.functional.pad(w, (0, groups * group_size - inn))  # zeros: the range includes 0 anyway
    grouped = padded.reshape(out, groups, group_size)
    lo = grouped.min(-1).values.clamp(max=0)
    hi = grouped.max(-1).values.clamp(min=0)
    scale = ((hi - lo) / maxq).clamp(min=1e-8)  # (out, groups), float32
    zero = torch.round(-lo / scale).clamp(1, maxq)  # 0 would wrap in the release's packer: keep it from 1
    g_idx = torch.arange(inn, dtype=torch.int32) // group_size
    g = g_idx.long()
    q = (torch.round(w / scale[:, g]) + zero[:, g]).clamp(0, maxq).to(torch.int32)  # (out, in)
    return PackedLinear(
        pack_rows(q.t().contiguous(), bits),
        pack_cols((zero - 1).t().contiguous().to(torch.int32), bits),
        scale.t().contiguous().half(),
        g_idx,
        None if bias is None else bias.half(),
        bits,
    )


def quantization_config(bits: int) -> dict[str, object]:
    """The standard ``quantization_config`` of a checkpoint in this packing, for transformers and vLLM."""
    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": GROUP_SIZE,
        "desc_act": False,
        "sym": False,
        "checkpoint_format": "gptq",  # GPTQ v1: zeros stored minus one, as the release stores them
    }


def is_quantized_part(name: str) -> bool:
    """Whether ``name`` is a tensor of a quantised Linear (``...fc_in.qweight``, ``...fc_in.bias``, ...)."""
    stem, _, part = name.rpartition(".")
    return stem.endswith(QUANTIZED_LINEARS) and part in (*PARTS, "bias") and ".h." in f".{stem}"


def packed_linears(
    tensors: Iterable[tuple[str, torch.Tensor]],
) -> Iterator[tuple[str, PackedLinear | torch.Tensor]]:
    """Group the tensors of each quantised Linear into a :class:`PackedLinear`; others pass through.

    A Linear comes under its module name (``transformer.h.0.mlp.fc_in``) as soon as its parts are complete;
    the parts of one Linear may come from different shards.

    Raises:
        GPTQError: When a quantised Linear is incomplete at the end, or its tensors disagree.
    """
    waiting: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors:
        if not is_quantized_part(name):
            yield name, tensor
            continue
        stem, _, part = name.rpartition(".")
        parts = waiting.setdefault(stem, {})
        parts[part] = tensor
        if all(p in parts for p in PARTS) and ("bias" in parts or not stem.endswith(_BIASED)):
            yield stem, PackedLinear.from_tensors(waiting.pop(stem), stem)
    for stem, parts in waiting.items():  # incomplete, a Linear without its bias, or the bias of a plain Linear
        if set(parts) == {"bias"}:
            yield f"{stem}.bias", parts["bias"]
            continue
        missing = [p for p in PARTS if p not in parts]
        if missing:
            raise GPTQError(f"{stem} lacks {', '.join(missing)} in the weight files")
        yield stem, PackedLinear.from_tensors(parts, stem)


def dequantized(tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors with every quantised Linear as ``weight`` (and ``bias``); floating-point ones in ``dtype``."""
    for name, item in packed_linears(tensors):
        if isinstance(item, PackedLinear):
            yield f"{name}.weight", dequantize(item, dtype)
            if item.bias is not None:
                yield f"{name}.bias", item.bias.to(dtype)
        else:
            yield name, item.to(dtype) if item.is_floating_point() else item
