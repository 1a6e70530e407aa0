"""``moss-agent merge MODEL ADAPTER OUT``: fold a LoRA adapter into a checkpoint in the released layout."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["merge_adapter"]


def merge_adapter(
    model: str | os.PathLike[str],
    adapter: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    dtype: str = "float16",
) -> Path:
    """Write ``model`` with ``adapter`` merged into its weights as a new checkpoint.

    The result has the base's config (``model_type: "moss"`` and all its keys) and tokenizer files and
    ``pytorch_model-*.bin`` shards in ``dtype`` (``float16`` as released), so that ``load_moss``, ``convert``
    and the release's own code read it like a downloaded checkpoint.

    Args:
        model: The base checkpoint directory or hub id.
        adapter: The adapter directory (from ``moss-agent finetune``).
        out: The new checkpoint directory (must not hold a checkpoint already).
        dtype: ``float16``, ``bfloat16`` or ``float32``.

    Returns:
        ``out``.

    Raises:
        AdapterError: A missing or mismatched adapter.
        FileExistsError: When ``out`` already holds a checkpoint.
    """
    from moss_agent.checkpoints.adapters import apply_adapter, check_adapter
    from moss_agent.checkpoints.loading import load_moss
    from moss_agent.finetune.export import write_checkpoint

    if dtype not in ("float16", "bfloat16", "float32"):
        raise ValueError(f"dtype must be float16, bfloat16 or float32, not {dtype!r}")
    target = Path(out).expanduser()
    if (target / "config.json").exists():
        raise FileExistsError(f"{target} already holds a checkpoint; choose an empty directory")
    check_adapter(adapter)  # before minutes of loading
    precision = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}[dtype]
    loaded = load_moss(model, precision=precision, device_map="cpu")  # in the written dtype: half the RAM of fp32
    merged = apply_adapter(loaded.model, adapter, merge=True)
    write_checkpoint(merged, loaded.path, target, dtype=dtype)
    return target
