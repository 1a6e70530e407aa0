"""Writing what training produced: the adapter, or a whole checkpoint in the released layout."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from moss_agent.checkpoints.files import TOKENIZER_FILES_WITH_FAST
from moss_agent.settings import CONTEXT_WINDOW

__all__ = ["save_trained", "write_checkpoint"]

SHARD_BYTES = 10 * 1000**3
"""About the shard size of the released fp16 checkpoints."""


def write_checkpoint(model: Any, base: Path, out: Path, dtype: str = "float16") -> None:
    """Write ``model``'s weights as a checkpoint in the released layout, with ``base``'s config and tokenizer.

    The config keeps every key of ``base`` (``model_type: "moss"``, ``wbits: 32`` ...) with ``torch_dtype`` set
    to ``dtype``; the weights go in ``pytorch_model-*.bin`` shards under the MOSS names, with the
    ``attn.causal_mask`` buffers the release stores.
    """
    import torch

    from moss_agent.checkpoints.files import ShardWriter, read_config, write_json

    out.mkdir(parents=True, exist_ok=True)
    config = read_config(base)
    config["torch_dtype"] = dtype
    write_json(out / "config.json", config)
    for name in TOKENIZER_FILES_WITH_FAST:
        if (base / name).is_file():
            shutil.copyfile(base / name, out / name)
    n = int(config.get("n_positions") or CONTEXT_WINDOW)
    mask = torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n)
    writer = ShardWriter(out, "bin", limit=SHARD_BYTES)
    target = getattr(torch, dtype)
    for name, tensor in model.state_dict().items():
        writer.add(name, tensor.detach().to("cpu", target))
        if name.endswith(".attn.qkv_proj.weight") and config.get("model_type") == "moss":
            writer.add(name.replace("qkv_proj.weight", "causal_mask"), mask)
    writer.finish()


def save_trained(model: Any, method: str, loaded: Any, out: Path) -> None:
    """Save the result of a run into ``out``: the peft adapter, or (``full``) a released-layout checkpoint."""
    out.mkdir(parents=True, exist_ok=True)
    if method == "full":
        write_checkpoint(model, loaded.path, out, dtype=str(loaded.model.dtype).removeprefix("torch."))
        return
    model.save_pretrained(str(out), save_embedding_layers=False)  # LoRA only: no lookup of the base config
