"""Fresh LoRA weights on a MOSS model for training (loading adapters back is :mod:`moss_agent.checkpoints.adapters`)."""

from __future__ import annotations

from typing import Any

from moss_agent.checkpoints.adapters import LORA_TARGETS, require_peft

__all__ = ["lora_model"]


def lora_model(model: Any, *, r: int = 8, alpha: int = 16, dropout: float = 0.05) -> Any:
    """Wrap ``model`` with fresh LoRA weights on :data:`~moss_agent.checkpoints.adapters.LORA_TARGETS`.

    Only the LoRA weights train; the base weights are frozen.

    Args:
        model: A loaded CodeGen / MOSS model.
        r: LoRA rank.
        alpha: LoRA scaling numerator (the update is scaled by ``alpha / r``).
        dropout: Dropout on the LoRA input.

    Returns:
        The peft model.
    """
    require_peft()
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(LORA_TARGETS), bias="none",
        task_type="CAUSAL_LM",
    )  # fmt: skip
    return get_peft_model(model, config)
