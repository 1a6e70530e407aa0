"""Weight files of a checkpoint: which they are, whether they are complete, their tensors, and GPTQ bit widths.

Read without running pickled code (``torch.load(weights_only=True)``) and without reading a whole shard into
private memory (``mmap``; safetensors one tensor at a time).
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moss_agent.checkpoints.spec import MossCheckpointError, declared_wbits

__all__ = ["WEIGHT_FILES", "check_files", "check_present", "gptq_bits", "read_json", "read_tensors", "weight_files"]

WEIGHT_FILES = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)
"""(index, single file) of each weight layout, safetensors first."""


def read_json(file: Path) -> Any:
    """A JSON file's content; :class:`MossCheckpointError` naming the file when it is not JSON."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise MossCheckpointError(f"{file} is not valid JSON ({err}); re-download it") from None


def _weight_map(index: Path) -> dict[str, str]:
    data = read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise MossCheckpointError(f"{index} has no weight_map of tensor names to files; re-download it")
    return weight_map


def _listed_weights(path: Path) -> list[Path]:
    """The weight files a checkpoint's index (or single file) names, present or not."""
    for index, single in WEIGHT_FILES:
        if (path / index).is_file():
            return [path / f for f in dict.fromkeys(_weight_map(path / index).values())]
        if (path / single).is_file():
            return [path / single]
    raise MossCheckpointError(
        f"{path} has no weights: pytorch_model.bin.index.json with its pytorch_model-*.bin shards, or "
        "model.safetensors (with an index if sharded); re-download the checkpoint"
    )


def check_present(path: Path) -> None:
    """Check what a checkpoint directory holds so far: its index, if any, and each weight file present.

    For the plan, which may look at a directory of config and index only (a hub snapshot without weights).
    """
    for index, _ in WEIGHT_FILES:
        if (path / index).is_file():
            for file in dict.fromkeys(_weight_map(path / index).values()):
                if (path / file).is_file():
                    _check_complete(path / file)
            return


def weight_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint in index order, each checked to be complete.

    Raises:
        MossCheckpointError: No weights, an index without ``weight_map`` or not JSON, a missing or truncated shard.
    """
    files = _listed_weights(path)
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise MossCheckpointError(f"{path} is missing {', '.join(missing)}; re-download the checkpoint")
    for file in files:
        _check_complete(file)
    return files


def _check_complete(file: Path) -> None:
    """Refuse a truncated weight file cheaply: a zip needs its central directory, safetensors all its data."""
    size = file.stat().st_size
    if file.suffix == ".safetensors":
        with open(file, "rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            end = None
            try:
                header: Any = json.loads(f.read(length)) if 0 < length <= size - 8 else {}
                end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
            except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                pass
        if not length > 0 or end is None or 8 + length + end > size:
            raise MossCheckpointError(f"{file} is truncated or corrupt (its safetensors header or data is cut off)")
    elif not zipfile.is_zipfile(file):  # torch.save writes a zip since torch 1.6, as the release's shards are
        raise MossCheckpointError(f"{file} is truncated or not a torch weight file (no zip directory at its end)")


def read_tensors(file: Path) -> Iterator[tuple[str, Any]]:
    """The tensors of one weight file, without reading the whole file into private memory.

    ``.bin`` files load with ``torch.load(weights_only=True, mmap=True)``: pickled objects other than tensors
    are refused, never run.

    Raises:
        MossCheckpointError: A file that holds other objects or cannot be read.
    """
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # safe_open has keys(), not iteration
                yield name, f.get_tensor(name)
        return
    import pickle

    import torch

    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise MossCheckpointError(f"{file} holds pickled objects other than tensors; refusing to run them") from err
    except (RuntimeError, EOFError, OSError) as err:
        raise MossCheckpointError(f"{file} cannot be read as torch weights ({err}); re-download it") from err
    if not isinstance(state, dict):
        raise MossCheckpointError(f"{file} is not a dictionary of tensors")
    for name in list(state):
        yield name, state.pop(name)


def check_files(path: Path) -> None:
    """Raise one error listing every missing tokenizer or weight file, or naming a broken one."""
    missing = []
    if not (path / "tokenizer.json").is_file():
        missing += [f for f in ("vocab.json", "merges.txt") if not (path / f).is_file()]
    missing += [f.name for f in _listed_weights(path) if not f.is_file()]
    if missing:
        raise MossCheckpointError(f"{path} is missing {', '.join(missing)}; re-download the checkpoint")
    weight_files(path)


# ---------------------------------------------------------------- GPTQ checkpoints


def _tensor_shape(path: Path, name: str) -> tuple[int, ...] | None:
    """The shape of one stored tensor, read without loading the weights (safetensors header or meta)."""
    for index, single in WEIGHT_FILES:
        file = path / single
        if (path / index).is_file():
            file = path / _weight_map(path / index).get(name, single)
        if not file.is_file():
            continue
        _check_complete(file)
        if file.suffix == ".safetensors":
            with open(file, "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            return tuple(header[name]["shape"]) if name in header else None
        import torch

        tensor = torch.load(file, map_location="meta", weights_only=True, mmap=True).get(name)
        return None if tensor is None else tuple(tensor.shape)
    return None


def gptq_bits(path: Path | None, config: dict[str, Any], name: str = "") -> int | None:
    """The real bit width of a GPTQ-quantised checkpoint, or None if it is not quantised.

    The released ``moss-moon-003-sft-plugin-int8`` config says ``wbits: 4``: the packed ``qweight`` rows
    (``in_features * bits / 32``) tell the truth when the weights are at hand, the name otherwise.
    """
    declared = declared_wbits(config)
    if declared is None:
        return None
    shape = None
    for linear in ("qkv_proj", "q_proj") if path else ():  # MOSS / CodeGen, or GPT-J after conversion
        shape = shape or _tensor_shape(path, f"transformer.h.0.attn.{linear}.qweight")  # type: ignore[arg-type]
    if shape:
        return shape[0] * 32 // int(config["n_embd"])
    return 8 if "int8" in (name or (path.name if path else "")) else declared
