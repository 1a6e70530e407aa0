"""GPU readiness: ``python -m benchmarks.gpu [--json PATH] [--precisions fp16,int8,int4]``.

Builds a CodeGen model of the exact MOSS 16B shape (34 layers x 6144, 24 heads, rotary 64, 107,008 rows) with
random weights directly on the GPU (no download, no host copy), and measures for each precision:

- prefill tokens/s: one ``prompt``-token prompt through moss-agent's model runner;
- decode tokens/s: ``new_tokens`` greedy steps after it, on moss-agent's preallocated KV cache;
- the bandwidth bound of decoding: weight bytes (plus the KV cache) read per step against the card's memory
  bandwidth (from a table of known cards, else measured with a device-to-device copy), and the share of it
  reached.

Precisions: ``fp16``; ``int8`` and ``int4`` through bitsandbytes (``Linear8bitLt``, ``Linear4bit`` nf4, as
``moss-agent``'s ``precision="int8"/"int4"`` loads). GPTQ checkpoints load dequantised in plain torch here (no
fast kernel lands with this version), so they would only repeat the fp16 row. Without CUDA the script prints
why it skipped and exits 0; :func:`measure` also runs a tiny shape on the CPU for the tests.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moss_agent.checkpoints.files import write_json

__all__ = ["CARD_BANDWIDTH_GBS", "MOSS_16B", "bandwidth_gbs", "build_model", "main", "measure"]

MOSS_16B = {"n_layer": 34, "n_embd": 6144, "n_head": 24, "rotary_dim": 64, "vocab_size": 107008, "n_positions": 2048}
"""The shape of every moss-moon-003 checkpoint (see ``checkpoints.plan.MOSS_16B_CONFIG``)."""

CARD_BANDWIDTH_GBS = {
    "H200": 4800.0,
    "H100 SXM": 3350.0,
    "H100 80GB HBM3": 3350.0,
    "H100 PCIe": 2000.0,
    "H100 NVL": 3900.0,
    "A100-SXM4-80GB": 2039.0,
    "A100 80GB PCIe": 1935.0,
    "A100-SXM4-40GB": 1555.0,
    "A100-PCIE-40GB": 1555.0,
    "L40S": 864.0,
    "A10": 600.0,
    "L4": 300.0,
    "RTX 4090": 1008.0,
    "RTX 3090": 936.0,
}
"""Published memory bandwidth (GB/s) by a substring of ``torch.cuda.get_device_name()``; first match wins."""

_BITS = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4}


def bandwidth_gbs(device: str) -> tuple[float, str]:
    """The device's memory bandwidth in GB/s and where the figure comes from (``table`` or ``measured``)."""
    import torch

    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        for card, gbs in CARD_BANDWIDTH_GBS.items():
            if card in name:
                return gbs, "table"
    size = (256 if device.startswith("cuda") else 32) * 1024**2  # floats
    src = torch.empty(size, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(5):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / min(times) / 1e9, "measured"  # a copy reads and writes every byte


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def build_model(shape: dict[str, int], precision: str, device: str) -> Any:
    """A random CodeGen of ``shape`` on ``device`` in ``precision`` (fp32, fp16, bitsandbytes int8 / int4).

    The weights are allocated on the device and filled there (normal, std 0.02); for int8 / int4 each block's
    linear layers are quantised one block at a time, so the fp16 model is never on the device twice.
    """
    import torch
    from transformers import CodeGenConfig, CodeGenForCausalLM

    end = shape["vocab_size"] - 1  # any id in the vocabulary: nothing here stops at it
    config = CodeGenConfig(
        n_ctx=shape["n_positions"], tie_word_embeddings=False, bos_token_id=end, eos_token_id=end, **shape
    )
    dtype = torch.float32 if precision == "fp32" else torch.float16
    with torch.device("meta"):
        model = CodeGenForCausalLM(config).to(dtype)  # no memory yet: the dtype is set before allocation
    model = model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_f.weight")):
                tensor.fill_(1.0)
            elif tensor.dim() == 1:
                tensor.zero_()
            else:
                tensor.normal_(0.0, 0.02, generator=generator)
        for name, buffer in model.named_buffers():  # rotary tables: rebuilt, as from_pretrained would
            if name.endswith("embed_positions"):
                from transformers.models.codegen.modeling_codegen import create_sinusoidal_positions

                buffer.copy_(create_sinusoidal_positions(buffer.shape[0], buffer.shape[1]).to(buffer))
    if precision in ("int8", "int4"):
        for block in model.transformer.h:
            _quantize_block(block, precision, device)
        torch.cuda.empty_cache()
    return model.eval()


def _quantize_block(block: Any, precision: str, device: str) -> None:
    import bitsandbytes as bnb
    import torch

    for parent in (block.attn, block.mlp):
        for name, linear in list(parent.named_children()):
            if not isinstance(linear, torch.nn.Linear):
                continue
            bias = linear.bias is not None
            if precision == "int8":
                new: Any = bnb.nn.Linear8bitLt(
                    linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False, threshold=6.0
                )
                new.weight = bnb.nn.Int8Params(linear.weight.data.cpu(), requires_grad=False, has_fp16_weights=False)
            else:
                new = bnb.nn.Linear4bit(
                    linear.in_features, linear.out_features, bias=bias, compute_dtype=torch.float16, quant_type="nf4"
                )
                new.weight = bnb.nn.Params4bit(linear.weight.data.cpu(), requires_grad=False, quant_type="nf4")
            if bias:
                new.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
            setattr(parent, name, new.to(device))
            del linear


def measure(
    shape: dict[str, int] = MOSS_16B,
    precisions: Sequence[str] = ("fp16", "int8", "int4"),
    device: str = "cuda",
    prompt: int = 512,
    new_tokens: int = 32,
) -> dict[str, Any]:
    """Prefill and decode speed of each precision on ``device``, with the bandwidth bound of decoding.

    Returns:
        ``device``, ``bandwidth_gbs`` (and its source), ``shape`` and one row per precision: ``prefill_tok_s``,
        ``decode_tok_s``, ``weight_gib``, ``bound_decode_tok_s`` and ``bound_share`` (decode / bound); a
        precision that cannot run there has ``skipped`` with the reason instead.
    """
    import torch

    from moss_agent.engines.kv_cache import ModelRunner, preallocated_cache

    gbs, source = bandwidth_gbs(device)
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    report: dict[str, Any] = {"device": name, "bandwidth_gbs": round(gbs, 1), "bandwidth_source": source}
    report |= {"shape": dict(shape), "prompt_tokens": prompt, "new_tokens": new_tokens, "rows": {}}
    for precision in precisions:
        if precision in ("int8", "int4") and not device.startswith("cuda"):
            report["rows"][precision] = {"skipped": "bitsandbytes int8 / int4 kernels need CUDA here"}
            continue
        start = time.perf_counter()
        model = build_model(shape, precision, device)
        built = time.perf_counter() - start
        runner = ModelRunner(model)
        ids = torch.randint(0, shape["vocab_size"], (1, prompt), device=device)
        row = _time_generation(runner, preallocated_cache, ids, new_tokens, device)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        layers, width = shape["n_layer"], shape["n_embd"]
        kv_bytes = 2 * layers * width * (prompt + new_tokens // 2) * (4 if precision == "fp32" else 2)
        bound = gbs * 1e9 / (weight_bytes + kv_bytes)
        row |= {
            "weight_gib": round(weight_bytes / 1024**3, 2),
            "build_s": round(built, 1),
            "bound_decode_tok_s": round(bound, 1),
            "bound_share": round(row["decode_tok_s"] / bound, 3),
        }
        if device.startswith("cuda"):
            row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 1024**3, 2)
            torch.cuda.reset_peak_memory_stats(device)
        report["rows"][precision] = row
        del model, runner
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return report


def _time_generation(runner: Any, new_cache: Any, ids: Any, new_tokens: int, device: str) -> dict[str, Any]:
    """Prefill ``ids`` then decode greedily, twice (the first warms up); the second run's speeds."""
    import torch

    n = ids.shape[1]
    out: dict[str, Any] = {}
    with torch.inference_mode():
        for _ in range(2):
            cache = new_cache(runner.model.config, n + new_tokens)
            _sync(device)
            start = time.perf_counter()
            logits = runner.forward(ids, torch.arange(n, device=device).unsqueeze(0), cache)
            token = logits.argmax(-1, keepdim=True)
            _sync(device)
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            for step in range(new_tokens):
                position = torch.tensor([[n + step]], device=device)
                token = runner.forward(token, position, cache).argmax(-1, keepdim=True)
            _sync(device)
            decode = time.perf_counter() - start
            out = {"prefill_tok_s": round(n / prefill, 1), "decode_tok_s": round(new_tokens / decode, 2)}
    return out


def table(report: dict[str, Any]) -> str:
    """The report as a Markdown table."""
    lines = [
        f"{report['device']}, memory bandwidth {report['bandwidth_gbs']:.0f} GB/s ({report['bandwidth_source']}); "
        f"{report['prompt_tokens']}-token prompt, {report['new_tokens']} new tokens, batch 1",
        "",
        "| precision | weights GiB | prefill tok/s | decode tok/s | bandwidth bound tok/s | share of bound |",
        "|---|---|---|---|---|---|",
    ]
    for precision, row in report["rows"].items():
        if "skipped" in row:
            lines.append(f"| {precision} | skipped: {row['skipped']} | | | | |")
            continue
        lines.append(
            f"| {precision} | {row['weight_gib']:.1f} | {row['prefill_tok_s']:.0f} | {row['decode_tok_s']:.1f} | "
            f"{row['bound_decode_tok_s']:.1f} | {row['bound_share']:.0%} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments, measure on CUDA (or say why not), print the table, write the JSON."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description="MOSS 16B-shape GPU speeds")
    parser.add_argument("--precisions", default="fp16,int8,int4", help="comma-separated: fp16, int8, int4")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens (default 512)")
    parser.add_argument("--new-tokens", type=int, default=32, help="decoded tokens (default 32)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    unknown = [p for p in precisions if p not in _BITS]
    if unknown:
        parser.error(f"unknown precision(s) {', '.join(unknown)}: choose from {', '.join(_BITS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if not torch.cuda.is_available():
        reason = "no CUDA device: the GPU benchmark needs one (nothing measured)"
        print(f"skipped: {reason}")
        report: dict[str, Any] = {"skipped": reason}
    else:
        report = measure(precisions=precisions, prompt=args.prompt, new_tokens=args.new_tokens)
        print(table(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
