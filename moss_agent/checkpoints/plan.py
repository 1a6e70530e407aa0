"""The load plan: dtype, quantisation, device map and memory needs, decided before any weight is read.

Pure arithmetic over the checkpoint's config and a :class:`~moss_agent.checkpoints.hardware.Hardware` (no torch),
so that ``moss-agent plan MODEL`` runs anywhere and a plan that cannot fit is refused before minutes of loading.

The memory arithmetic and the placement of modules on devices are in :mod:`moss_agent.checkpoints.placement`.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Mapping, Sequence
from dataclasses import astuple, dataclass, field, replace
from pathlib import Path
from typing import Any

from moss_agent.checkpoints.files import gptq_bits, read_config, resolve_checkpoint
from moss_agent.checkpoints.hardware import Hardware
from moss_agent.checkpoints.placement import (
    TURN_TOKENS,
    Budget,
    Device,
    MemoryEstimate,
    Placement,
    estimate,
    layout,
    placements,
)
from moss_agent.checkpoints.spec import (
    REFERENCE_CONTEXT,
    GiB,
    InsufficientMemoryError,
    ModelSpec,
    MossCheckpointError,
    UnsupportedCheckpointError,
)
from moss_agent.checkpoints.weights import check_present
from moss_agent.settings import DTYPES, PRECISIONS, normalize_precision

__all__ = [
    "GiB",
    "InsufficientMemoryError",
    "LoadPlan",
    "MemoryEstimate",
    "ModelSpec",
    "MossCheckpointError",
    "Placement",
    "UnsupportedCheckpointError",
    "gptq_available",
    "normalize_precision",
    "plan_load",
]

GPU_RESERVE = GiB // 2
"""Kept free on every GPU for the CUDA context, cuBLAS workspace and kernels."""
CPU_RESERVE = 2 * GiB
"""Kept free in CPU RAM for Python, torch and the operating system."""


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class LoadPlan:
    """How a checkpoint will be loaded on given hardware, and what it will need.

    Attributes:
        spec: The model's sizes.
        precision: ``fp32``, ``bf16``, ``fp16``, ``int8`` (bitsandbytes LLM.int8) or ``int4`` (NF4).
        dtype: The torch dtype name of unquantised weights and of computation.
        device_map: Device-map unit -> GPU index, ``cpu`` or ``disk``.
        placements: What each device holds and needs.
        estimate: Load / one turn / full context bytes with everything on one device.
        hardware: The hardware planned for.
        turn_tokens: Tokens of "one turn".
        context: Tokens of "full context".
        offload_folder: Folder for disk offload.
        alternatives: The single-device estimate of every precision, for comparison.
        notes: Warnings, e.g. that the full context will not fit.
    """

    spec: ModelSpec
    precision: str
    dtype: str
    device_map: dict[str, Device]
    placements: tuple[Placement, ...]
    estimate: MemoryEstimate
    hardware: Hardware
    turn_tokens: int = TURN_TOKENS
    context: int = REFERENCE_CONTEXT
    offload_folder: str | None = None
    alternatives: tuple[tuple[str, MemoryEstimate], ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def quantization(self) -> str | None:
        """``int8`` or ``int4`` when bitsandbytes quantises while loading, else None (``gptq`` is pre-quantised)."""
        return self.precision if self.precision in ("int8", "int4") else None

    @property
    def offloaded(self) -> list[str]:
        """Modules whose weights live off the execution devices (streamed in for each forward pass)."""
        gpus = any(isinstance(d, int) for d in self.device_map.values())
        return [m for m, d in self.device_map.items() if d == "disk" or (gpus and d == "cpu")]

    @property
    def fits_full_context(self) -> bool:
        """Whether every device also holds the full context."""
        return all(p.capacity is None or p.full <= p.capacity for p in self.placements)

    def hf_device_map(self) -> dict[str, Device]:
        """The map for ``from_pretrained(device_map=...)``; ``{"": device}`` when one device holds all."""
        devices = set(self.device_map.values())
        return {"": devices.pop()} if len(devices) == 1 else dict(self.device_map)

    def describe(self) -> str:
        """A readable table of the plan (GiB, or MiB for small models)."""
        s = self.spec
        unit, scale = ("GiB", GiB) if max(e.full for _, e in self.alternatives) >= GiB else ("MiB", 1024**2)
        quant = {"int8": " (bitsandbytes LLM.int8)", "int4": " (bitsandbytes NF4, double quantisation)"}
        if s.wbits:  # a GPTQ checkpoint: kept packed, or dequantised
            quant = {"gptq": f" (GPTQ {s.wbits}-bit kept packed, gptqmodel kernels)"}
            quant |= {p: f" (GPTQ {s.wbits}-bit dequantised exactly)" for p in DTYPES}
        hw = ", ".join(f"cuda:{g.index} {_size(g.free_bytes)} free" for g in self.hardware.gpus)
        lines = [
            f"Load plan for {s.name}: {_count(s.n_params)} parameters "
            f"({s.model_type}, {s.n_layer} x {s.n_embd}, {s.n_head} heads, vocab {s.vocab_size})",
            f"hardware    {hw or 'no GPU'}; CPU RAM {_size(self.hardware.cpu_ram_bytes)}",
            f"precision   {self.precision}{quant.get(self.precision, '')}, dtype {self.dtype}",
            "",
            f"{'':11} {'load':>8} {f'turn ({self.turn_tokens})':>12} {f'full ({self.context})':>12}   {unit}",
        ]
        for name, est in self.alternatives:
            figures = (f"{x / scale:>{w}.1f}" for x, w in zip(astuple(est), (8, 12, 12), strict=True))
            lines.append(f"{'*' if name == self.precision else ' '} {name:<9} " + " ".join(figures))
        lines += ["", f"{'device':<8} {'weights':>8} {'turn':>8} {'full':>8} {'capacity':>9}   modules ({unit})"]
        for p in self.placements:
            cap = "-" if p.capacity is None else f"{p.capacity / scale:.1f}"
            row = " ".join(f"{x / scale:>8.2f}" for x in (p.weights, p.turn, p.full))
            lines.append(f"{p.device:<8} {row} {cap:>9}   {_span(p.modules)}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _size(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB / 10 else f"{n / 1024**2:.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 10**8 else f"{n / 1e6:.2f} M"


def _span(modules: Sequence[str]) -> str:
    """``wte, h.0-h.20, ln_f`` for a list of module names."""
    names = [m.removeprefix("transformer.") for m in modules]
    blocks = [int(n[2:]) for n in names if n.startswith("h.")]
    rest = [n for n in names if not n.startswith("h.")]
    if blocks:
        span = f"h.{blocks[0]}" if len(blocks) == 1 else f"h.{blocks[0]}-h.{blocks[-1]}"
        rest.insert(1 if rest and rest[0] == "wte" else 0, span)
    return ", ".join(rest)


MOSS_16B_CONFIG: dict[str, Any] = {
    "model_type": "moss",
    "n_layer": 34,
    "n_embd": 6144,
    "n_head": 24,
    "n_inner": None,
    "rotary_dim": 64,
    "n_positions": 2048,
    "vocab_size": 107008,
}
"""The sizes shared by every moss-moon-003 checkpoint, for planning without a download."""


def _known_config(name: str) -> dict[str, Any] | None:
    m = re.fullmatch(r"(?:fnlp/)?moss-moon-003-[\w-]*?(?:-int(4|8))?", name)
    if not m:
        return None
    config = {**MOSS_16B_CONFIG, "_name_or_path": name}
    if m[1]:  # the bits of the tensors (the plugin-int8 release's config says 4 over 8-bit tensors)
        config |= {"wbits": int(m[1]), "groupsize": 128}
    return config


def _spec_and_path(source: ModelSpec | Mapping[str, Any] | str | Path) -> tuple[ModelSpec, Path | None]:
    if isinstance(source, ModelSpec):
        return source, None
    if isinstance(source, Mapping):
        return ModelSpec.from_config(source), None
    if hasattr(source, "to_dict"):  # a transformers PretrainedConfig
        return ModelSpec.from_config(source.to_dict()), None
    path = Path(source).expanduser()
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        known = _known_config(str(source))
        if known is not None:
            return ModelSpec.from_config(known, name=str(source)), None
        path = resolve_checkpoint(str(source), weights=False)  # a hub id: fetch config.json only
    config = read_config(path)  # names the directory when it has none
    check_present(path)  # a broken index or a truncated shard is named now, not after minutes of loading
    spec = ModelSpec.from_config(config, name=path.name)
    if spec.wbits:  # the tensors tell the real width (the plugin-int8 release declares 4)
        spec = replace(spec, wbits=gptq_bits(path, config, path.name))
    return spec, path


def _budget(hardware: Hardware, max_memory: Mapping[Any, int | str] | None, offload_folder: str | None) -> Budget:
    limits = {(_gpu_key(k)): _parse_size(v) for k, v in (max_memory or {}).items()}
    gpus = []
    for g in hardware.gpus:
        cap = min(g.free_bytes, limits[g.index]) if g.index in limits else g.free_bytes - GPU_RESERVE
        if g.index in limits or not limits:
            gpus.append((g.index, max(cap, 0)))
    cpu = min(hardware.cpu_ram_bytes, limits["cpu"]) if "cpu" in limits else hardware.cpu_ram_bytes - CPU_RESERVE
    return Budget(gpus, max(cpu, 0), offload_folder is not None)


def _gpu_key(key: Any) -> int | str:
    text = str(key)
    return int(text.removeprefix("cuda:")) if text.removeprefix("cuda:").isdigit() else text


def _parse_size(value: int | str) -> int:
    """Bytes from ``20GiB``, ``20GB``, ``512MiB`` or an int."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", value, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read memory size {value!r}; write e.g. '20GiB' or a number of bytes")
    base = 1024 if m[3] else 1000
    return int(float(m[1]) * base ** " KMGT".index((m[2] or " ").upper()))


def _candidates(spec: ModelSpec, hardware: Hardware, budget: Budget) -> tuple[list[str], list[str]]:
    """Precisions to try without offload, best first, and with offload, least offload first.

    On GPUs, MOSS checkpoints take fp16 as the release ran them (bf16 stays a choice); a GPTQ checkpoint keeps
    its packing where gptqmodel is installed, and is dequantised otherwise.
    """
    half = "fp16" if spec.model_type == "moss" or not all(g.bf16 for g in hardware.gpus) else "bf16"
    if spec.wbits:
        gptq = ["gptq"] if gptq_available() else []
        return ([*gptq, half], [half]) if budget.gpus else (["fp32", "bf16", *gptq], ["bf16"])
    quant = ["int8", "int4"] if importlib.util.find_spec("bitsandbytes") else []
    if budget.gpus:
        return [half, *quant], [*reversed(quant), half]
    return ["fp32", "bf16", *quant], ["bf16"]


def gptq_available() -> bool:
    """Whether transformers' GPTQ integration can run here (gptqmodel and optimum installed)."""
    return all(importlib.util.find_spec(m) is not None for m in ("gptqmodel", "optimum"))


def _check_precision(spec: ModelSpec, wanted: str) -> None:
    if spec.wbits and wanted in ("int8", "int4"):
        raise UnsupportedCheckpointError(
            f'{spec.name} is already a GPTQ {spec.wbits}-bit checkpoint; precision="{wanted}" (bitsandbytes) '
            'quantises fp16 weights. Choose precision="gptq" (kept packed; needs gptqmodel) or fp16 / bf16 / '
            "fp32 (dequantised exactly)"
        )
    if not spec.wbits and wanted == "gptq":
        raise UnsupportedCheckpointError(
            f'precision="gptq" loads GPTQ checkpoints (such as fnlp/moss-moon-003-sft-int4); {spec.name} is not '
            "one: choose fp16, bf16, fp32, int8 or int4"
        )


def plan_load(
    config_or_path: ModelSpec | Mapping[str, Any] | str | Path,
    hardware: Hardware | None = None,
    precision: str = "auto",
    *,
    max_memory: Mapping[Any, int | str] | None = None,
    offload_folder: str | Path | None = None,
    context: int = REFERENCE_CONTEXT,
    turn_tokens: int = TURN_TOKENS,
    batch: int = 1,
) -> LoadPlan:
    """Plan a load before reading any weight.

    Args:
        config_or_path: A checkpoint directory, a ``config.json`` mapping, a hub id (the moss-moon-003 ids are
            known without a download) or a :class:`ModelSpec`.
        hardware: The hardware; inspected when None.
        precision: ``auto`` (the best that fits one turn) or one of ``fp32 bf16 fp16 int8 int4``.
        max_memory: Caps per device (``{0: "20GiB", "cpu": "30GiB"}``), replacing the reserves.
        offload_folder: Allows offloading to disk there.
        context: Tokens of the full context (at most the model's window).
        turn_tokens: Tokens of one turn.
        batch: Sequences generated together.

    Returns:
        The plan.

    Raises:
        InsufficientMemoryError: When the requested (or any) precision cannot hold one turn.
        UnsupportedCheckpointError: For GPTQ-quantised checkpoints.
        MossCheckpointError: For configs that are not CodeGen-like.
    """
    spec, _ = _spec_and_path(config_or_path)
    wanted = normalize_precision(precision)
    _check_precision(spec, wanted)
    if hardware is None:
        from moss_agent.checkpoints.hardware import inspect_hardware

        hardware = inspect_hardware()
    context = min(context, spec.n_positions)
    turn_tokens = min(turn_tokens, context)
    budget = _budget(hardware, max_memory, None if offload_folder is None else str(offload_folder))
    if spec.wbits:  # dequantised tensors are placed as they are made: no disk offload
        budget = replace(budget, disk=False)
    plain, offloading = _candidates(spec, hardware, budget)
    if wanted != "auto":
        plain, offloading = [wanted], [wanted]
    choice = next(((p, m) for p in plain if (m := layout(spec, p, budget, turn_tokens, batch, False))), None)
    choice = choice or next(
        ((p, m) for p in offloading if (m := layout(spec, p, budget, turn_tokens, batch, True))), None
    )
    kinds = ("gptq", "fp32", "bf16", "fp16") if spec.wbits else [p for p in PRECISIONS if p != "gptq"]
    alternatives = tuple((p, estimate(spec, p, turn_tokens=turn_tokens, context=context, batch=batch)) for p in kinds)
    if choice is None:
        raise InsufficientMemoryError(_refusal(spec, wanted, plain, hardware, budget, dict(alternatives), turn_tokens))
    chosen, mapping = choice
    where = placements(spec, chosen, mapping, budget, turn_tokens, context, batch)
    bf16 = not budget.gpus or all(g.bf16 for g in hardware.gpus)
    # LLM.int8 computes in float16 (it casts anything else); NF4 takes bfloat16 where the hardware has it
    dtype = DTYPES.get(chosen) or ("float16" if chosen in ("int8", "gptq") or not bf16 else "bfloat16")
    plan = LoadPlan(
        spec,
        chosen,
        dtype,
        mapping,
        where,
        dict(alternatives)[chosen],
        hardware,
        turn_tokens,
        context,
        None if offload_folder is None else str(offload_folder),
        alternatives,
    )
    return _with_notes(plan)


def _with_notes(plan: LoadPlan) -> LoadPlan:
    notes = []
    for p in plan.placements:
        if p.capacity is not None and p.full > p.capacity:
            notes.append(
                f"the full {plan.context}-token context needs {_size(p.full)} on {p.device} "
                f"({_size(p.capacity)} available): long conversations may run out of memory; "
                "keep the context shorter or choose a smaller precision"
            )
    if plan.offloaded:
        notes.append(
            f"{len(plan.offloaded)} modules are offloaded and streamed in for every token: expect slow generation"
        )
    return replace(plan, notes=tuple(notes))


def _refusal(
    spec: ModelSpec,
    wanted: str,
    tried: Sequence[str],
    hardware: Hardware,
    budget: Budget,
    estimates: Mapping[str, MemoryEstimate],
    turn_tokens: int,
) -> str:
    gpus = ", ".join(_size(c) for _, c in budget.gpus) or "none"
    needs = "; ".join(f"{p}: load {_size(estimates[p].load)}, one turn {_size(estimates[p].turn)}" for p in tried)
    smaller = ("gptq", "fp16") if spec.wbits else ("int8", "int4")
    options = [f'precision="{p}" (one turn {_size(estimates[p].turn)})' for p in smaller if p not in tried]
    options += ["more or larger GPUs", "max_memory={...} to raise the per-device limits"]
    if not budget.disk:
        options.append('offload_folder="..." to offload weights to disk (slow)')
    return (
        f"{spec.name} ({_count(spec.n_params)} parameters) does not fit one {turn_tokens}-token turn "
        f"{'in ' + wanted if wanted != 'auto' else 'in any precision'} on this machine. Needed: {needs}. "
        f"Available: GPUs [{gpus}], CPU RAM {_size(budget.cpu)} (after reserves). "
        f"Options: {'; '.join(options)}."
    )
