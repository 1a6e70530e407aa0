"""Checkpoint files: finding a checkpoint, reading its config and tokenizer, and the one writer of its files.

Readers: :func:`resolve_checkpoint` (a directory or a hub snapshot), :func:`read_config`, :func:`check_files`,
:func:`gptq_bits` (the real bit width of a GPTQ checkpoint, from its tensors) and :func:`load_tokenizer`.
Writers, used by the tiny test checkpoints, the demonstration model and ``moss-agent convert`` alike:
:func:`write_json`, :func:`write_moss_tokenizer`, :class:`ShardWriter` and :func:`write_weights`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from moss_agent.checkpoints.spec import MossCheckpointError
from moss_agent.checkpoints.weights import (  # re-exported: the readers of a checkpoint's files
    WEIGHT_FILES,
    check_files,
    gptq_bits,
    read_json,
    read_tensors,
    weight_files,
)
from moss_agent.protocol.format import END_TOKENS, EOM
from moss_agent.settings import CONTEXT_WINDOW

__all__ = [
    "ENDOFTEXT",
    "TOKENIZER_FILES",
    "TOKENIZER_FILES_WITH_FAST",
    "WEIGHT_FILES",
    "WHITESPACE_RUNS",
    "ShardWriter",
    "check_files",
    "gptq_bits",
    "load_tokenizer",
    "looks_like_path",
    "moss_config",
    "read_config",
    "read_tensors",
    "resolve_checkpoint",
    "weight_files",
    "write_json",
    "write_moss_tokenizer",
    "write_weights",
]

ENDOFTEXT = "<|endoftext|>"
WHITESPACE_RUNS: tuple[str, ...] = tuple(" " * n for n in range(31, 1, -1)) + tuple("\t" * n for n in range(9, 1, -1))
"""CodeGen's 38 added whitespace-run tokens (31 down to 2 spaces, 9 down to 2 tabs), in id order; the MOSS
release lists them in ``added_tokens.json`` right after ``<|endoftext|>``, before the end tokens."""
TOKENIZER_FILES = ("vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json", "tokenizer_config.json")
"""The tokenizer files of the released layout, as :func:`write_moss_tokenizer` writes them."""
TOKENIZER_FILES_WITH_FAST = (*TOKENIZER_FILES, "tokenizer.json")
"""What a checkpoint's tokenizer may have: the released files and a fast ``tokenizer.json`` (copied as found)."""
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
WeightsFormat = Literal["bin", "safetensors"]
RELEASE_CONFIG_FILE = Path(__file__).with_name("release_config.json")
"""``MossConfig().to_dict()`` as the release saves it (see ``scripts/release_config.py``)."""


def _offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def looks_like_path(name: str) -> bool:
    """Whether ``name`` was meant as a folder (``./m``, ``/m``, ``~/m``, ``a/b/c``), not a hub id (``owner/name``)."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or name.endswith("/")


def resolve_checkpoint(model: str | os.PathLike[str], *, weights: bool = True) -> Path:
    """The local directory of ``model``: the directory itself, or a hub snapshot (no remote code files).

    Args:
        model: A checkpoint directory or a hub id such as ``fnlp/moss-moon-003-sft-plugin``.
        weights: Also fetch the weight files (False fetches only the JSON and text files).

    Raises:
        MossCheckpointError: When it is neither a directory nor reachable on the hub; the message says how to
            get the files.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    name = str(model)
    if looks_like_path(name):  # never "hf download ./nope"
        raise MossCheckpointError(f"no such directory: {name}" if not path.exists() else f"{name} is not a directory")
    if not _HUB_ID.fullmatch(name):
        raise MossCheckpointError(f"{name!r} is not a directory and not a hub id like 'fnlp/moss-moon-003-sft'")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.txt"] + (["*.bin", "*.safetensors"] if weights else [])
    offline = _offline()
    try:
        return Path(snapshot_download(name, allow_patterns=patterns, local_files_only=offline))
    except Exception as err:  # huggingface_hub raises many kinds for offline / missing / network errors
        how = f"download it where there is network (`hf download {name} --exclude '*.py'`) and pass the local directory"
        if offline:
            raise MossCheckpointError(
                f"{name!r} is not a local directory, HF_HUB_OFFLINE is set and no cached copy exists: {how}, "
                "or unset HF_HUB_OFFLINE"
            ) from err
        raise MossCheckpointError(f"could not fetch {name!r} from the hub ({err}): {how}") from err


def read_config(path: Path) -> dict[str, Any]:
    """``config.json`` of a checkpoint directory; :class:`MossCheckpointError` if absent or unreadable."""
    file = path / "config.json"
    if not file.is_file():
        raise MossCheckpointError(f"{path} has no config.json: is it a MOSS checkpoint directory?")
    config = read_json(file)
    if not isinstance(config, dict):
        raise MossCheckpointError(f"{file} is not a JSON object (it holds a {type(config).__name__}); re-download it")
    return config


# ---------------------------------------------------------------- tokenizer


def load_tokenizer(path: Path, tokenization: str = "release") -> tuple[Any, dict[str, int]]:
    """The fast tokenizer of a checkpoint and the ids of the MOSS end tokens.

    MOSS's files (vocab.json, merges.txt, added tokens) give a
    :class:`~moss_agent.checkpoints.tokenization.MossTokenizerFast`: the release's ids with ``tokenization``
    ``release`` (the default), plain BPE with ``plain``. Other tokenizers load as they are.

    Raises:
        MossCheckpointError: When an end token is missing or is not a single token.
        ValueError: For an unknown ``tokenization``.
    """
    from transformers import AutoTokenizer

    from moss_agent.checkpoints.tokenization import MossTokenizerFast

    tok_config = path / "tokenizer_config.json"
    settings = read_json(tok_config) if tok_config.is_file() else {}
    named = settings.get("tokenizer_class") if isinstance(settings, dict) else None
    if (path / "vocab.json").is_file():
        vocab = read_json(path / "vocab.json")
        if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
            raise MossCheckpointError(f"{path / 'vocab.json'} is not a JSON object of token -> id; re-download it")
    files = (path / "vocab.json").is_file() or (path / "tokenizer.json").is_file()
    try:
        if named in (None, "MossTokenizer", "GPT2Tokenizer", "CodeGenTokenizer", "PreTrainedTokenizerFast") and files:
            # Reads MOSS's files (or a fast save of them); never its remote code.
            tokenizer: Any = MossTokenizerFast.from_pretrained(path, tokenization=tokenization)  # type: ignore[arg-type]
        else:
            tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # tokenizers / transformers raise many kinds for unreadable files
        if isinstance(err, ValueError) and "tokenization" in str(err):
            raise
        raise MossCheckpointError(
            f"the tokenizer files in {path} cannot be read ({type(err).__name__}: {' '.join(str(err).split())[:200]}); "
            "re-download vocab.json, merges.txt and added_tokens.json"
        ) from err
    ids: dict[str, int] = {}
    for token in END_TOKENS:
        encoded = tokenizer.encode(token, add_special_tokens=False)
        if len(encoded) != 1 or encoded[0] != tokenizer.convert_tokens_to_ids(token):
            raise MossCheckpointError(
                f"the tokenizer in {path} encodes {token!r} as {encoded}, not one added token: MOSS's "
                "added_tokens.json / special tokens are missing"
            )
        ids[token] = encoded[0]
    return tokenizer, ids


# ---------------------------------------------------------------- writing: the one writer of checkpoint files


def moss_config(
    n_layer: int,
    n_embd: int,
    n_head: int,
    rotary_dim: int,
    vocab: int,
    dtype: str,
    wbits: int | None,
    name: str = "moss-agent/tiny-moss",
) -> dict[str, Any]:
    """The ``config.json`` the release writes, for these sizes (bos / eos ids left to the caller).

    Every key of ``MossConfig(...).to_dict()`` from the release's ``configuration_moss.py`` under its pinned
    transformers 4.25.1 (:data:`RELEASE_CONFIG_FILE`, 81 keys: the class's own defaults such as ``wbits: 32``
    and ``groupsize: 128``, the keys every ``PretrainedConfig`` saves, and those the released files carry from
    CodeGen), with the sizes, dtype and name replaced. ``wbits`` None writes 32, the release's "not quantised".
    """
    config: dict[str, Any] = json.loads(RELEASE_CONFIG_FILE.read_text(encoding="utf-8"))
    config.update(
        _name_or_path=name,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        rotary_dim=rotary_dim,
        vocab_size=vocab,
        n_ctx=CONTEXT_WINDOW,
        n_positions=CONTEXT_WINDOW,
        torch_dtype=dtype,
        wbits=wbits or 32,
        groupsize=128,
        bos_token_id=None,  # filled from the tokenizer
        eos_token_id=None,
    )
    return config


# ---------------------------------------------------------------- caching


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented UTF-8 JSON with a final newline."""
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def _added_token(content: str) -> dict[str, Any]:
    # The release writes its special tokens in this serialised AddedToken form.
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


def write_moss_tokenizer(
    out: Path,
    vocab: dict[str, int],
    merges: Sequence[str],
    added: Sequence[str],
    *,
    name: str,
    n_positions: int = CONTEXT_WINDOW,
) -> None:
    """Write the five MOSS tokenizer files (released layout) of a byte-level BPE into ``out``.

    ``<|endoftext|>`` is appended as the last entry of ``vocab.json`` (bos and unk, as GPT-2's and MOSS's) and
    the ``added`` tokens get the ids after it, in order, listed in ``added_tokens.json``; ``<eom>`` is eos.

    Args:
        out: The checkpoint directory.
        vocab: BPE token -> id, ids from 0 without gaps.
        merges: The BPE merges, ``"a b"`` each.
        added: Added tokens, in id order (the release's: CodeGen's whitespace runs, then the end tokens).
        name: ``name_or_path`` written into ``tokenizer_config.json``.
        n_positions: ``model_max_length``.
    """
    vocab = {**dict(sorted(vocab.items(), key=lambda kv: kv[1])), ENDOFTEXT: len(vocab)}
    special = {"bos_token": ENDOFTEXT, "eos_token": EOM, "unk_token": ENDOFTEXT}
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "auto_map": {"AutoTokenizer": ["tokenization_moss.MossTokenizer", None]},
        **{k: _added_token(v) for k, v in special.items()},
        "errors": "replace",
        "model_max_length": n_positions,
        "name_or_path": name,
        "special_tokens_map_file": None,
        "tokenizer_class": "MossTokenizer",
    }
    write_json(out / "vocab.json", vocab)
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    write_json(out / "added_tokens.json", {t: len(vocab) + i for i, t in enumerate(added)})
    write_json(out / "special_tokens_map.json", special)
    write_json(out / "tokenizer_config.json", config)


def _save_shard(file: Path, tensors: dict[str, Any]) -> None:
    if file.suffix == ".bin":
        import torch

        torch.save(tensors, file)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(file), metadata={"format": "pt"})


class ShardWriter:
    """Writes weight shards one at a time and then their index, in the released naming.

    ``pytorch_model-0000N-of-0000M.bin`` (or ``model-...safetensors``) with ``pytorch_model.bin.index.json``;
    one shard is written as ``pytorch_model.bin`` / ``model.safetensors`` with no index. Tensors are collected
    until ``limit`` bytes, or grouped explicitly with :meth:`write_group`; only one shard is held in memory.

    Args:
        out: The checkpoint directory.
        weights: ``bin`` (torch pickles of tensors, as the release) or ``safetensors``.
        limit: Bytes per shard for :meth:`add` (None: only explicit groups).
    """

    def __init__(self, out: Path, weights: WeightsFormat = "safetensors", limit: int | None = None) -> None:
        self.out, self.limit = out, limit
        self.stem, self.ext = ("pytorch_model", "bin") if weights == "bin" else ("model", "safetensors")
        self.pending: dict[str, Any] = {}
        self.pending_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total_bytes = self.parameters = 0

    def add(self, name: str, tensor: Any) -> None:
        """Add one tensor, writing the pending shard first when the tensor would take it over ``limit``."""
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.limit is not None and self.pending_bytes + size > self.limit:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size
        self.parameters += tensor.numel()

    def write_group(self, tensors: dict[str, Any]) -> None:
        """Write ``tensors`` as one shard of their own."""
        self.flush()
        for name, tensor in tensors.items():
            self.add(name, tensor)
        self.flush()

    def flush(self) -> None:
        """Write the pending tensors as a shard."""
        if not self.pending:
            return
        file = self.out / f".part-{len(self.files) + 1:05d}.{self.ext}"
        _save_shard(file, self.pending)
        self.files.append((file, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> int:
        """Give the shards their final names and write the index; returns the number of shards."""
        self.flush()
        count = len(self.files)
        if count == 1:
            self.files[0][0].rename(self.out / f"{self.stem}.{self.ext}")
            return 1
        weight_map: dict[str, str] = {}
        for n, (file, names) in enumerate(self.files, 1):
            final = f"{self.stem}-{n:05d}-of-{count:05d}.{self.ext}"
            file.rename(self.out / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        write_json(self.out / f"{self.stem}.{self.ext}.index.json", index)
        return count


def write_weights(out: Path, state_dict: dict[str, Any], shards: int, weights: WeightsFormat = "bin") -> None:
    """Write ``state_dict`` as ``shards`` files of about equal size, in order, with their index."""
    sizes = {k: v.numel() * v.element_size() for k, v in state_dict.items()}
    total = max(sum(sizes.values()), 1)
    groups: list[dict[str, Any]] = [{} for _ in range(shards)]
    seen = 0
    for name, tensor in state_dict.items():
        groups[min(shards - 1, seen * shards // total)][name] = tensor
        seen += sizes[name]
    writer = ShardWriter(out, weights)
    for group in groups:
        writer.write_group(group)
    writer.finish()
