"""What a checkpoint is: its sizes (:class:`ModelSpec`, read from ``config.json``) and the errors of loading one.

Pure data (no torch), shared by the files, the plan, the loader and convert.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from moss_agent.settings import CONTEXT_WINDOW

__all__ = [
    "NF4_BYTES",
    "REFERENCE_CONTEXT",
    "GiB",
    "InsufficientMemoryError",
    "ModelSpec",
    "MossCheckpointError",
    "UnsupportedCheckpointError",
    "declared_wbits",
]

GiB = 1024**3
REFERENCE_CONTEXT = CONTEXT_WINDOW
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
"""Bytes per matrix entry of bitsandbytes NF4 with double quantisation (blocks of 64, scales in blocks of 256)."""
_BLOCK_CLASS = {"moss": "CodeGenBlock", "codegen": "CodeGenBlock", "gptj": "GPTJBlock"}


class MossCheckpointError(ValueError):
    """A checkpoint directory or config that cannot be loaded; the message says how to fix it."""


class UnsupportedCheckpointError(MossCheckpointError):
    """A checkpoint or precision not loaded here (bitsandbytes on GPTQ, ...); the message names the alternative."""


class InsufficientMemoryError(MemoryError):
    """The model does not fit this hardware as requested; the message names the numbers and the options."""


NOT_QUANTIZED_WBITS = 32
"""``wbits`` of the release's configs that are not quantised: its config class writes 32 into every config."""


def declared_wbits(config: Mapping[str, Any], name: str = "config.json") -> int | None:
    """The GPTQ bits a config declares: None for ``wbits`` 32 (the release's "not quantised") or absent.

    Only a hint: the tensors tell the real width (the plugin-int8 release declares 4 over 8-bit tensors).

    Raises:
        MossCheckpointError: When ``wbits`` is not an integer.
    """
    quant = config.get("quantization_config")
    if isinstance(quant, Mapping) and quant.get("quant_method") == "gptq":  # a standard GPTQ checkpoint
        wbits = quant.get("bits")
    else:
        wbits = config.get("wbits")
    if wbits is None:
        return None
    if isinstance(wbits, bool) or not isinstance(wbits, int) or wbits < 1:
        raise MossCheckpointError(f"{name}: wbits must be a positive integer (32: not quantised), got {wbits!r}")
    return None if wbits >= 16 else wbits


@dataclass(frozen=True)
class ModelSpec:
    """The sizes of a CodeGen-architecture checkpoint, read from its config.

    Attributes:
        name: Checkpoint name for messages.
        model_type: ``moss``, ``codegen`` or ``gptj``.
        n_layer: Transformer blocks.
        n_embd: Hidden size.
        n_head: Attention heads.
        n_inner: MLP width.
        vocab_size: Embedding rows.
        n_positions: Context window.
        wbits: GPTQ bits when the checkpoint is pre-quantised (None when not; the tensors' width once known).
    """

    name: str
    model_type: str
    n_layer: int
    n_embd: int
    n_head: int
    n_inner: int
    vocab_size: int
    n_positions: int = REFERENCE_CONTEXT
    wbits: int | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any], name: str = "") -> ModelSpec:
        """Sizes from a ``config.json`` mapping; :class:`MossCheckpointError` if it is not CodeGen-like."""
        model_type = config.get("model_type")
        if model_type not in _BLOCK_CLASS:
            raise MossCheckpointError(
                f"{name or 'checkpoint'}: config model_type is {model_type!r}; moss-agent loads MOSS "
                "checkpoints "
                f"(model_type 'moss', as fnlp/moss-moon-003-sft) and CodeGen / GPT-J ones ('codegen', 'gptj')"
            )
        where = f"{name or 'checkpoint'} config.json"

        def size(key: str, default: int | None = None) -> int:
            value = config.get(key)
            if value is None and default is not None:
                return default
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MossCheckpointError(f"{where}: {key} must be a positive integer, got {value!r}")
            return value

        d = size("n_embd")
        return cls(
            name=name or str(config.get("_name_or_path") or "model"),
            model_type=model_type,
            n_layer=size("n_layer"),
            n_embd=d,
            n_head=size("n_head"),
            n_inner=size("n_inner", 4 * d),
            vocab_size=size("vocab_size"),
            n_positions=size("n_positions", REFERENCE_CONTEXT),
            wbits=declared_wbits(config, where),
        )

    @property
    def block_class(self) -> str:
        """The transformers module class of one block (never split across devices)."""
        return _BLOCK_CLASS[self.model_type]

    def modules(self) -> list[str]:
        """The device-map units in execution order."""
        blocks = [f"transformer.h.{i}" for i in range(self.n_layer)]
        return ["transformer.wte", *blocks, "transformer.ln_f", "lm_head"]

    def _parts(self, module: str) -> tuple[int, int, int]:
        """(matrix entries, matrix rows, small parameters) of a module."""
        d, inner, v = self.n_embd, self.n_inner, self.vocab_size
        if module == "transformer.wte":
            return v * d, v, 0
        if module == "lm_head":
            return v * d, v, v
        if module == "transformer.ln_f":
            return 0, 0, 2 * d
        return 4 * d * d + 2 * d * inner, 4 * d + inner + d, inner + 3 * d  # a block

    @property
    def n_params(self) -> int:
        """Learned parameters."""
        return sum(m + s for m, _, s in (self._parts(x) for x in self.modules()))

    def _gptq_block_bytes(self) -> int:
        """A block as the GPTQ releases store it: packed Linears with fp16 scales, packed zeros and int32 g_idx."""
        d, inner, bits = self.n_embd, self.n_inner, self.wbits or 4
        total = 2 * 2 * d  # ln_1
        for n_in, n_out, bias in ((d, 3 * d, False), (d, d, False), (d, inner, True), (inner, d, True)):
            groups = -(-n_in // 128)
            total += n_in * n_out * bits // 8 + groups * n_out * (16 + bits) // 8 + 4 * n_in + 2 * n_out * bias
        return total

    def module_bytes(self, module: str, precision: str, offloaded: bool = False) -> int:
        """Stored bytes of ``module``; modules offloaded by bitsandbytes stay unquantised, as it keeps them."""
        mat, rows, small = self._parts(module)
        if precision == "gptq":  # kept packed wherever it is; wte, the norms and lm_head in fp16
            return self._gptq_block_bytes() if module.startswith("transformer.h.") else 2 * (mat + small)
        if precision == "fp32":
            return 4 * (mat + small)
        if precision in ("bf16", "fp16") or offloaded:
            return 2 * (mat + small)
        if precision == "int8":
            if module in ("transformer.wte", "lm_head"):  # LLM.int8 keeps these in 16 bits
                return 2 * (mat + small)
            return mat + 4 * rows + 2 * small
        return int(mat * NF4_BYTES) + 2 * small
