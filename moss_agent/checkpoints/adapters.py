"""LoRA adapters on MOSS: check an adapter directory, load it onto a loaded model, merge it into the weights.

An adapter directory is what peft writes (``adapter_config.json`` + ``adapter_model.safetensors``), with LoRA
on the four Linears of every block (``qkv_proj``, ``out_proj``, ``fc_in``, ``fc_out``), so peft, transformers
and moss-agent all read it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = [
    "ADAPTER_CONFIG",
    "LORA_TARGETS",
    "AdapterError",
    "apply_adapter",
    "check_adapter",
    "is_adapter_dir",
    "require_peft",
]

LORA_TARGETS = ("qkv_proj", "out_proj", "fc_in", "fc_out")
"""The Linears of a MOSS block that LoRA adapts."""
ADAPTER_CONFIG = "adapter_config.json"


class AdapterError(ValueError):
    """An adapter directory that is missing, broken, or made for another model."""


def require_peft() -> None:
    """Raise ImportError with the install line when peft is absent."""
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise ImportError('LoRA adapters need peft: pip install "moss-agent[train]"')


def is_adapter_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a peft adapter."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def check_adapter(adapter: str | os.PathLike[str]) -> Path:
    """The adapter directory, checked before any weight is loaded.

    Raises:
        AdapterError: When it is missing or lacks its config or weights.
    """
    path = Path(adapter).expanduser()
    if not path.is_dir():
        raise AdapterError(f"no adapter at {path}: expected a directory written by `moss-agent finetune`")
    if not is_adapter_dir(path):
        raise AdapterError(f"{path} has no {ADAPTER_CONFIG}: is it an adapter written by `moss-agent finetune`?")
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except ValueError as err:
        raise AdapterError(f"{path / ADAPTER_CONFIG} is not valid JSON: {err}") from err
    if not any((path / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
        raise AdapterError(f"{path} has no adapter_model.safetensors: the adapter weights are missing")
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{path} holds a {config.get('peft_type')} adapter; moss-agent loads LoRA adapters")
    return path


def _check_targets(path: Path, model: Any) -> None:
    config = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    targets = config.get("target_modules") or []
    if isinstance(targets, str) or not set(targets) <= names:
        raise AdapterError(f"{path} adapts modules {targets} that this model does not have")


def apply_adapter(model: Any, adapter: str | os.PathLike[str], *, merge: bool = True) -> Any:
    """Load a LoRA adapter onto a loaded model.

    Args:
        model: The base model (as loaded by :func:`~moss_agent.checkpoints.loading.load_moss`).
        adapter: The adapter directory.
        merge: Fold the LoRA update into the base weights (no extra cost per token) and return the plain model;
            False keeps the peft wrapper. Quantised (bitsandbytes) models are never merged.

    Returns:
        The adapted model, in eval mode.

    Raises:
        AdapterError: A missing or broken adapter, or one made for other modules.
        ImportError: When peft is not installed.
    """
    path = check_adapter(adapter)
    _check_targets(path, model)
    require_peft()
    from peft import PeftModel

    try:
        wrapped = PeftModel.from_pretrained(model, str(path), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as err:  # shape mismatch: an adapter of another model size
        raise AdapterError(f"the adapter in {path} does not fit this model: {err}") from err
    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    out = wrapped.merge_and_unload() if merge and not quantized else wrapped
    out.eval()
    return out
