"""Sampling and load settings with their defaults: the one home for the faces, the CLI, the server and convert.

Light to import (no torch, no LangChain): everything here is plain data and small functions.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "CALL_OPTIONS",
    "CONTEXT_WINDOW",
    "DTYPES",
    "MAX_NEW_TOKENS",
    "PRECISIONS",
    "PRECISION_ALIASES",
    "RELEASE_SAMPLING",
    "REPETITION_PENALTY",
    "TEMPERATURE",
    "TOP_K",
    "TOP_P",
    "cache_dir",
    "normalize_precision",
]

# ---------------------------------------------------------------- sampling: the MOSS release's defaults

MAX_NEW_TOKENS = 256
"""Tokens generated per pass (the release's README; its server allowed 512)."""
TEMPERATURE = 0.7
TOP_P = 0.8
TOP_K = 40
REPETITION_PENALTY = 1.02
CONTEXT_WINDOW = 2048
"""Prompt plus generated tokens of the moss-moon-003 models (``n_positions``)."""

RELEASE_SAMPLING: dict[str, object] = {
    "do_sample": True,
    "temperature": TEMPERATURE,
    "top_p": TOP_P,
    "top_k": TOP_K,
    "repetition_penalty": REPETITION_PENALTY,
}
"""The release's sampling as ``generation_config.json`` keys."""

CALL_OPTIONS: dict[str, str] = {
    "max_tokens": "max_new_tokens",
    "max_new_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "repetition_penalty": "repetition_penalty",
    "do_sample": "do_sample",
    "seed": "seed",
}
"""Per-call keyword arguments (``invoke(..., temperature=0)``) and the sampling field each one sets."""

# ---------------------------------------------------------------- loading

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16", "int8", "int4", "gptq")
"""What a checkpoint can be loaded as (besides ``auto``, which lets the load plan choose); ``gptq`` keeps a GPTQ
checkpoint's packed weights (transformers' GPTQ integration)."""

PRECISION_ALIASES: dict[str, str] = {
    "float32": "fp32",
    "float16": "fp16",
    "half": "fp16",
    "bfloat16": "bf16",
    "8bit": "int8",
    "4bit": "int4",
}

DTYPES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""The torch dtype name of each floating-point precision."""


def normalize_precision(precision: str) -> str:
    """``auto`` or one of :data:`PRECISIONS` (aliases such as ``float16`` or ``4bit`` accepted).

    Raises:
        ValueError: For anything else, naming the choices.
    """
    p = PRECISION_ALIASES.get(precision.lower(), precision.lower())
    if p != "auto" and p not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose auto, {', '.join(PRECISIONS)}")
    return p


def cache_dir() -> Path:
    """Where moss-agent caches what it builds: ``$MOSS_AGENT_CACHE`` or ``~/.cache/moss-agent``."""
    return Path(os.environ.get("MOSS_AGENT_CACHE") or Path.home() / ".cache" / "moss-agent")
