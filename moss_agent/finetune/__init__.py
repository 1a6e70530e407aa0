"""Fine-tune MOSS: SFT data in three formats, the release's loss spans, LoRA / QLoRA / full training, adapters.

``finetune(MODEL, DATA, OUT, method="lora", steps=40)`` is ``moss-agent finetune`` as a function; the adapter
it writes loads back with ``load_moss(MODEL, adapter=OUT)``, ``ChatMoss(model=MODEL, adapter=OUT)``,
``MossLLM`` and ``moss-agent chat|serve|demo --adapter OUT``; :func:`merge_adapter` folds it into a
checkpoint in the released layout; :func:`plugin_dataset` writes training conversations that teach MOSS a new
tool. Importing this package is light: torch and peft load when training starts.
"""

from moss_agent.checkpoints.adapters import LORA_TARGETS, AdapterError, apply_adapter, is_adapter_dir
from moss_agent.finetune.data import (
    MalformedDataError,
    Problem,
    Sample,
    load_samples,
    sample_from_conversation,
    write_jsonl,
)
from moss_agent.finetune.merge import merge_adapter
from moss_agent.finetune.plan import METHODS, TrainPlan, plan_training
from moss_agent.finetune.plugin_data import ToolExample, plugin_dataset
from moss_agent.finetune.spans import IGNORE, Encoded, EncodeStats, encode_sample, encode_samples
from moss_agent.finetune.train import FinetuneResult, finetune

__all__ = [
    "IGNORE",
    "LORA_TARGETS",
    "METHODS",
    "AdapterError",
    "EncodeStats",
    "Encoded",
    "FinetuneResult",
    "MalformedDataError",
    "Problem",
    "Sample",
    "ToolExample",
    "TrainPlan",
    "apply_adapter",
    "encode_sample",
    "encode_samples",
    "finetune",
    "is_adapter_dir",
    "load_samples",
    "merge_adapter",
    "plan_training",
    "plugin_dataset",
    "sample_from_conversation",
    "write_jsonl",
]
