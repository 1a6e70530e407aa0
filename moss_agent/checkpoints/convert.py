"""MOSS checkpoints to standard Hugging Face GPT-J or CodeGen checkpoints, shard by shard.

The result needs no remote code: safetensors shards with an index, ``config.json`` with ``model_type`` ``gptj`` or
``codegen``, ``generation_config.json`` with ``<eom>`` as eos and the release's sampling defaults, and a fast
tokenizer (``tokenizer.json`` + ``tokenizer_config.json``) with MOSS's added tokens. GPT-J is the format serving
engines know (vLLM registers ``GPTJForCausalLM``, not CodeGen).

CodeGen's fused ``qkv_proj`` rows come in 4 model-parallel groups, each ``[q | v | k]`` of ``n_embd / 4`` rows;
taking each kind's rows out of every group and concatenating them gives GPT-J's ``q_proj`` / ``k_proj`` /
``v_proj`` exactly (the heads keep their order). Every other tensor keeps its name, but the ``lm_head`` bias of
the vocabulary's padding rows, which no token uses, becomes :data:`PADDING_BIAS`: the local engine never picks
those rows, and now no server does either.

Memory: source ``.bin`` shards are memory-mapped (``torch.load(mmap=True)``), safetensors shards are read one
tensor at a time, and an output shard is written (safetensors writes from the tensors' memory, no copy) as soon
as it reaches ``max_shard_size``. Private memory therefore stays near one output shard plus the tensor being
cast or split; mapped source pages are clean page cache that the kernel reclaims under pressure.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from moss_agent.checkpoints.files import ShardWriter, read_tensors, weight_files, write_json
from moss_agent.checkpoints.gptq import PackedLinear, dequantized, packed_linears, quantization_config, select_outputs
from moss_agent.protocol import format as fmt
from moss_agent.settings import CONTEXT_WINDOW, DTYPES, RELEASE_SAMPLING

if TYPE_CHECKING:
    import torch

__all__ = [
    "DTYPES",
    "PADDING_BIAS",
    "PROBE",
    "ConversionError",
    "ConversionReport",
    "convert",
    "split_qkv",
    "verify_conversion",
]

Format = Literal["gptj", "codegen"]
MP_NUM = 4
"""Model-parallel groups of CodeGen's fused qkv projection (fixed in CodeGen's and MOSS's code)."""
DEFAULT_SHARD_SIZE = 2 * 1024**3
PROBE = (
    fmt.system_prompt(["Search", "Calculate"])
    + fmt.segment(fmt.HUMAN, "What is 2+2? 请用中文回答。")
    + fmt.segment(fmt.THOUGHTS, "The user asks a sum.")
    + f'{fmt.COMMANDS}: Calculate("2+2"){fmt.EOC}\n{fmt.MOSS}: 2+2=4{fmt.EOM}\n'
)
"""The text whose logits :func:`verify_conversion` compares: MOSS layout, English, Chinese, end tokens."""
_DROPPED = (".attn.causal_mask", ".attn.masked_bias", ".attn.bias")  # non-learned buffers of the MOSS code
_CONFIG_KEYS = (
    "vocab_size n_positions n_embd n_layer n_head rotary_dim n_inner activation_function resid_pdrop embd_pdrop "
    "attn_pdrop layer_norm_epsilon initializer_range use_cache"
).split()
PADDING_BIAS = -1e4
"""``lm_head`` bias written for the padding rows of the vocabulary (107008 rows for 106072 tokens in the release):
the local engine never picks a row without a token, and with this bias no server does either."""
_TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}
"""Largest logit difference allowed by verification, relative to the largest source logit (at least 1)."""


class ConversionError(ValueError):
    """A checkpoint that cannot be converted, a destination in the way, or a failed verification."""


@dataclass(frozen=True)
class ConversionReport:
    """What :func:`convert` wrote.

    Attributes:
        path: The converted checkpoint directory.
        format: ``gptj`` or ``codegen``.
        dtype: Torch name of the floating-point dtype written.
        parameters: Parameters written.
        total_bytes: Bytes of tensor data written.
        shards: Safetensors files written.
        seconds: Wall time of the conversion (verification excluded).
        max_abs_diff: Largest logit difference on :data:`PROBE` when verified, else None.
        argmax_agreement: Fraction of probe positions whose top token agrees, when verified.
    """

    path: Path
    format: str
    dtype: str
    parameters: int
    total_bytes: int
    shards: int
    seconds: float
    max_abs_diff: float | None = None
    argmax_agreement: float | None = None


# ---------------------------------------------------------------- tensors


def split_qkv(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CodeGen's fused ``qkv_proj`` weight ``(3 * n_embd, n_embd)`` as GPT-J's ``(q, k, v)`` weights.

    Raises:
        ConversionError: When the shape is not ``(3 * n, n)`` with ``n`` divisible by 4.
    """
    rows, cols = weight.shape
    if rows != 3 * cols or cols % MP_NUM:
        raise ConversionError(f"qkv_proj weight of shape {tuple(weight.shape)} is not (3n, n) with n divisible by 4")
    groups = weight.reshape(MP_NUM, 3, cols // MP_NUM, cols)  # group, [q | v | k], rows of the group
    q, v, k = (groups[:, i].reshape(cols, cols).contiguous() for i in range(3))
    return q, k, v


def _qkv_outputs(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The output rows of CodeGen's fused qkv that make GPT-J's q, k and v (as :func:`split_qkv` takes them)."""
    import torch

    rows = torch.arange(3 * n).reshape(MP_NUM, 3, n // MP_NUM)  # group, [q | v | k], rows of the group
    q, v, k = (rows[:, i].reshape(n) for i in range(3))
    return q, k, v


def _packed(stem: str, layer: PackedLinear, target: Format) -> list[tuple[str, torch.Tensor]]:
    """The standard GPTQ tensors of one packed Linear; GPT-J's q / k / v repacked along the output features."""
    if target == "gptj" and stem.endswith(".attn.qkv_proj"):
        base = stem[: -len("qkv_proj")]
        parts = zip(("q_proj", "k_proj", "v_proj"), _qkv_outputs(layer.in_features), strict=True)
        return [item for name, rows in parts for item in select_outputs(layer, rows).tensors(f"{base}{name}.").items()]
    return list(layer.tensors(f"{stem}.").items())


def _rename(name: str, tensor: torch.Tensor, target: Format) -> list[tuple[str, torch.Tensor]]:
    """The target tensors for one source tensor (none for the non-learned buffers)."""
    if name.endswith(_DROPPED):
        return []
    if target == "gptj" and name.endswith(".attn.qkv_proj.weight"):
        stem = name[: -len("qkv_proj.weight")]
        q, k, v = split_qkv(tensor)
        return [(f"{stem}q_proj.weight", q), (f"{stem}k_proj.weight", k), (f"{stem}v_proj.weight", v)]
    return [(name, tensor)]


# ---------------------------------------------------------------- config and tokenizer


def _model_config(source: dict[str, Any], target: Format, dtype: str, bos: int | None, eos: int) -> dict[str, Any]:
    from transformers import __version__

    config: dict[str, Any] = {
        "architectures": ["GPTJForCausalLM" if target == "gptj" else "CodeGenForCausalLM"],
        "model_type": target,
    }
    config.update({k: source[k] for k in _CONFIG_KEYS if k in source})
    if target == "codegen":
        config["n_ctx"] = source.get("n_ctx", source["n_positions"])
    config.update(bos_token_id=bos, eos_token_id=eos, tie_word_embeddings=False, torch_dtype=dtype)
    config["transformers_version"] = __version__
    return config


def _write_tokenizer(src: Path, out: Path, n_positions: int) -> tuple[int | None, int, int]:
    """Write ``tokenizer.json`` and ``tokenizer_config.json``; returns the bos and ``<eom>`` ids and the token count."""
    from moss_agent.checkpoints.loading import load_tokenizer
    from moss_agent.checkpoints.tokenization import SAVED_STRIPS_KEY, MossTokenizerFast

    tokenizer, end_ids = load_tokenizer(src)  # MOSS's vocab.json / merges.txt / added tokens, never remote code
    # The added tokens carry the release's stripping as lstrip / rstrip, so that servers reading tokenizer.json
    # with plain BPE get (nearly) the release's ids; MossTokenizerFast.release_backend_json says where not.
    moss = isinstance(tokenizer, MossTokenizerFast)  # else a tokenizer the source names: kept as it is
    backend = tokenizer.release_backend_json() if moss else tokenizer.backend_tokenizer.to_str()
    (out / "tokenizer.json").write_text(backend, encoding="utf-8")
    special = {"bos_token": tokenizer.bos_token, "eos_token": fmt.EOM, "unk_token": tokenizer.unk_token}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # tokenizer.json as it is, in transformers 4.x and 5.x
        **special,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,  # decode must give back the exact text
        "model_max_length": n_positions,
    }
    if moss:  # load_tokenizer strips as the source did (on its own cuts the flags have no effect)
        config[SAVED_STRIPS_KEY] = tokenizer.saved_strips()
    write_json(out / "tokenizer_config.json", config)
    write_json(out / "special_tokens_map.json", special)
    return tokenizer.bos_token_id, end_ids[fmt.EOM], len(tokenizer)


def _check_source(src: Path, config: dict[str, Any]) -> int | None:
    """The GPTQ bits of a source (None when not quantised); ConversionError for what does not convert."""
    from moss_agent.checkpoints.files import gptq_bits

    kind = config.get("model_type")
    if kind == "gptj":
        raise ConversionError(f"{src} is already a GPT-J checkpoint; serve it as it is")
    if kind not in ("moss", "codegen"):
        raise ConversionError(
            f"{src} has model_type {kind!r}: only MOSS (moss-moon-003) and CodeGen checkpoints convert"
        )
    return gptq_bits(src, config, src.name)


# ---------------------------------------------------------------- conversion


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    format: Format = "gptj",  # the CLI's and the name for it
    dtype: str | None = None,
    max_shard_size: int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    verify: bool = False,
    keep_quantization: bool = False,
) -> ConversionReport:
    """Convert a MOSS checkpoint to a standard GPT-J or CodeGen checkpoint that needs no remote code.

    Args:
        src: A MOSS checkpoint directory (or hub id, fetched through huggingface_hub; no remote code).
        dst: The directory to write; written to a temporary sibling and renamed into place when complete.
        format: ``gptj`` (for vLLM and other serving engines) or ``codegen``.
        dtype: ``fp16``, ``bf16`` or ``fp32`` (or a torch name); None keeps the source dtype.
        max_shard_size: Bytes per output shard; bounds the private memory of the conversion.
        overwrite: Replace ``dst`` if it exists.
        verify: Compare the converted model's logits with the source's on :data:`PROBE` (loads each model once,
            one after the other; GPTQ sides are dequantised exactly, so they must agree as closely as fp16 ones).
        keep_quantization: For a GPTQ source (the -int4 / -int8 releases): write standard GPTQ tensors with a
            ``quantization_config`` (transformers' GPTQ integration, vLLM) instead of dequantised weights in
            ``dtype``; GPT-J's q / k / v are unpacked and repacked along the output features.

    Returns:
        What was written, with the verification figures when ``verify``.

    Raises:
        ConversionError: A source that is not a MOSS / CodeGen checkpoint, an existing ``dst``, a bad argument,
            or logits that differ beyond tolerance.
    """
    import torch

    from moss_agent.checkpoints.loading import read_config, resolve_checkpoint

    if format not in ("gptj", "codegen"):
        raise ConversionError(f"format must be 'gptj' or 'codegen', got {format!r}")
    torch_dtype = None if dtype is None else getattr(torch, DTYPES.get(dtype, dtype), None)
    if dtype is not None and not (isinstance(torch_dtype, torch.dtype) and torch_dtype.is_floating_point):
        raise ConversionError(f"dtype must be one of {', '.join(DTYPES)} (or a torch float name), got {dtype!r}")
    source = resolve_checkpoint(src)
    config = read_config(source)
    bits = _check_source(source, config)
    if keep_quantization and not bits:
        raise ConversionError(f"{source} is not a GPTQ checkpoint: keep_quantization applies to the -int4 / -int8 ones")
    if keep_quantization and torch_dtype not in (None, torch.float16):
        raise ConversionError("GPTQ tensors keep float16 scales: leave the dtype out or choose fp16")
    if bits and torch_dtype is None:
        torch_dtype = torch.float16  # as the release's GPTQ checkpoints hold wte, norms and lm_head
    target = Path(dst).expanduser()
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise ConversionError(f"{target} exists and is not empty: choose another directory or pass overwrite=True")
    files = weight_files(source)

    started = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        bos, eos, n_tokens = _write_tokenizer(source, tmp, int(config.get("n_positions", CONTEXT_WINDOW)))
        writer = ShardWriter(tmp, "safetensors", max_shard_size)
        written_dtype: torch.dtype | None = torch_dtype
        tensors: Iterator[tuple[str, Any]] = (item for file in files for item in read_tensors(file))
        if bits and not keep_quantization:
            tensors = dequantized(tensors, torch_dtype or torch.float16)
        elif bits:
            tensors = (
                pair
                for name, item in packed_linears(tensors)
                for pair in (_packed(name, item, format) if isinstance(item, PackedLinear) else [(name, item)])
            )
        for name, tensor in tensors:
            for out_name, out in _rename(name, tensor, format):
                if out.is_floating_point():
                    out = out if torch_dtype is None else out.to(torch_dtype)
                    written_dtype = written_dtype or out.dtype
                if out_name == "lm_head.bias" and out.shape[0] > n_tokens:
                    out = out.clone()  # never write into the mapped source
                    out[n_tokens:] = PADDING_BIAS
                writer.add(out_name, out)
            del tensor
        shards = writer.finish()
        dtype_name = str(written_dtype or torch.float16).removeprefix("torch.")
        model_config = _model_config(config, format, dtype_name, bos, eos)
        if keep_quantization:
            model_config["quantization_config"] = quantization_config(bits or 4)
        write_json(tmp / "config.json", model_config)
        generation = {"bos_token_id": bos, "eos_token_id": eos, **RELEASE_SAMPLING, "max_new_tokens": 512}
        write_json(tmp / "generation_config.json", generation)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = ConversionReport(
        target, format, dtype_name, writer.parameters, writer.total_bytes, shards, time.perf_counter() - started
    )
    if verify:
        diff, agreement = verify_conversion(source, target)
        report = dataclasses.replace(report, max_abs_diff=diff, argmax_agreement=agreement)
    return report


def _probe_logits(path: Path, precision: str, probe: str) -> torch.Tensor:
    """The logits of the tokens (not of the vocabulary's padding rows) at every position of ``probe``."""
    import torch

    from moss_agent.checkpoints.loading import load_moss

    loaded = load_moss(path, precision=precision)
    ids = torch.tensor([loaded.tokenizer.encode(probe, add_special_tokens=False)])
    device = next(loaded.model.parameters()).device
    with torch.inference_mode():
        logits = loaded.model(input_ids=ids.to(device)).logits[0, :, : len(loaded.tokenizer)].float().cpu()
    del loaded
    gc.collect()
    return logits


def verify_conversion(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    probe: str = PROBE,
    tolerance: float | None = None,
) -> tuple[float, float]:
    """Check that a converted checkpoint computes what its source computes.

    Loads the source, then the converted model (one at a time, both at the converted dtype, placed by the load
    plan), runs ``probe`` through each and compares the logits of every token (the padding rows of the vocabulary
    are masked by the conversion, see :data:`PADDING_BIAS`).

    Args:
        src: The source MOSS checkpoint.
        dst: The converted checkpoint.
        probe: The text to compare on.
        tolerance: Largest allowed logit difference relative to the largest source logit (at least 1); by
            default 1e-4 for fp32, 1e-2 for fp16, 3e-2 for bf16.

    Returns:
        The largest absolute logit difference and the fraction of positions whose top token agrees.

    Raises:
        ConversionError: When the difference exceeds the tolerance.
    """
    from moss_agent.checkpoints.loading import read_config, resolve_checkpoint

    converted = Path(dst)
    from moss_agent.checkpoints.spec import declared_wbits

    target_config = read_config(converted)
    dtype = str(target_config.get("torch_dtype", "float32"))
    precision = {v: k for k, v in DTYPES.items()}.get(dtype, "fp32")
    if declared_wbits(target_config):  # both sides dequantised exactly: compare in fp32
        dtype, precision = "float32", "fp32"
    reference = _probe_logits(resolve_checkpoint(src), precision, probe)
    logits = _probe_logits(converted, precision, probe)
    diff = float((logits - reference).abs().max())
    agreement = float((logits.argmax(-1) == reference.argmax(-1)).float().mean())
    allowed = (tolerance if tolerance is not None else _TOLERANCE.get(dtype, 1e-2)) * max(
        1.0, float(reference.abs().max())
    )
    if diff > allowed:
        raise ConversionError(
            f"{converted}: logits differ from the source's by up to {diff:.3g} on the probe (allowed {allowed:.3g}, "
            f"top token agrees at {agreement:.0%} of positions): the conversion is wrong; please report it"
        )
    return diff, agreement
