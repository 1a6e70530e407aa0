"""``moss-agent convert``: a MOSS checkpoint as a standard GPT-J / CodeGen checkpoint for serving engines."""

from __future__ import annotations

import argparse
from typing import Any

from moss_agent.engines.ctranslate2 import QUANTIZATIONS
from moss_agent.settings import DTYPES

__all__ = ["add_convert_parser", "add_parser"]


def _cmd_convert(args: argparse.Namespace) -> int:
    from moss_agent.checkpoints.convert import ConversionError, convert

    if args.format == "ctranslate2":
        from moss_agent.engines.ctranslate2 import convert_ctranslate2

        path = convert_ctranslate2(args.src, args.dst, quantization=args.quantization, overwrite=args.overwrite)
        print(f"wrote {path}: CTranslate2, {args.quantization or 'weights as in the source'}")
        return 0
    if args.quantization is not None:
        raise ConversionError("--quantization is for --format ctranslate2 (use --dtype for gptj / codegen)")
    report = convert(
        args.src,
        args.dst,
        format=args.format,
        dtype=args.dtype,
        max_shard_size=int(args.max_shard_size * 1024**3),
        overwrite=args.overwrite,
        verify=args.verify,
        keep_quantization=args.keep_quantization,
    )
    print(
        f"wrote {report.path}: {report.format}, {report.dtype}, {report.parameters:,} parameters in "
        f"{report.shards} shard(s), {report.total_bytes / 1024**3:.2f} GiB, {report.seconds:.1f} s"
    )
    if report.max_abs_diff is not None:
        print(
            f"verified: largest logit difference {report.max_abs_diff:.3g}, "
            f"top token agrees at {report.argmax_agreement:.0%} of probe positions"
        )
    return 0


def add_convert_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``convert SRC DST --format gptj|codegen [--dtype ...] [--verify]`` to ``moss-agent``'s subcommands.

    Args:
        subparsers: The object ``ArgumentParser.add_subparsers()`` returned.

    Returns:
        The new subparser (its ``func`` default runs the conversion and returns the exit code).
    """
    p = subparsers.add_parser(
        "convert",
        help="write a MOSS checkpoint as a standard GPT-J / CodeGen checkpoint (safetensors, fast tokenizer)",
        description="Convert a MOSS checkpoint for serving engines (vLLM: --format gptj) with no remote code.",
    )
    p.add_argument("src", help="MOSS checkpoint directory or hub id")
    p.add_argument("dst", help="directory to write")
    p.add_argument(
        "--format",
        default="gptj",
        choices=["gptj", "codegen", "ctranslate2"],
        help="target: gptj (vLLM), codegen, or ctranslate2 (a CTranslate2 model; needs the ctranslate2 extra)",
    )
    p.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        help="--format ctranslate2 only: weight type (int8 is the fast one on a CPU; default: the source's)",
    )
    p.add_argument(
        "--dtype",
        choices=list(DTYPES),
        help="floating-point dtype to write (default: the source's; a GPTQ source is dequantised into it, fp16)",
    )
    p.add_argument(
        "--keep-quantization",
        action="store_true",
        help="GPTQ sources (-int4 / -int8): write standard GPTQ tensors + quantization_config (transformers, vLLM)",
    )
    p.add_argument("--max-shard-size", type=float, default=2.0, help="GiB per output shard (bounds memory)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--verify", action="store_true", help="compare logits with the source on a probe afterwards")
    p.set_defaults(func=_cmd_convert)
    return p


add_parser = add_convert_parser
