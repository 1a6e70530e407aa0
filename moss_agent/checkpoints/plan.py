"""The load plan: dtype, quantisation, device map and memory needs, decided before any weight is read.

Pure arithmetic over the checkpoint's config and a :class:`~moss_agent.checkpoints.hardware.Hardware` (no torch),
so that ``moss-agent plan MODEL`` runs anywhere and a plan that cannot fit is refused before minutes of loading.

Memory model (bytes; ``s`` tokens of context, batch ``b``, activation width ``a`` = 2 bytes, 4 for fp32)::

    weights  W   = sum over modules of their stored bytes (fp16/bf16: 2 per parameter; fp32: 4;
                   int8 = bitsandbytes LLM.int8: 1 per block-matrix entry + a float32 scale per row, embedding
                   and lm_head kept in 16 bits; int4 = NF4 with double quantisation on every matrix, lm_head
                   and embedding included: 0.5 + 1/64 + 4/16384 per entry; biases and norms in 16 bits)
    need(s)  = W + KV + attention + MLP + logits + margin
      KV        = b * 2 * n_layer * s * n_embd * a
      attention = b * n_head * s * s * (4 + 4 + a)      CodeGen's eager attention scores in float32
      MLP       = b * s * (2 * n_inner + 4 * n_embd) * a
      logits    = b * s * vocab * (a + 4)               full-sequence logits and their float32 copy
      margin    = MARGIN * W * s / 2048                 allocator and workspace overhead, calibrated

"load" is ``W``, "one turn" is ``need(TURN_TOKENS)`` and "full context" ``need(2048)``. The margin is the one
calibrated term: the published MOSS figures (fp16 31/42/81, int8 16/24/46, int4 7.8/12/26 GB) carry
overheads of roughly 1.5 x the weights at 2048 tokens on top of the tensors above, which no
precision-independent activation term reproduces; ``MARGIN = 1.5`` puts every estimate within 8 % of the
table (see ``tests/unit/test_plan.py``).
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import astuple, dataclass, field, replace
from pathlib import Path
from typing import Any

from moss_agent.checkpoints.files import gptq_bits, resolve_checkpoint
from moss_agent.checkpoints.hardware import Hardware
from moss_agent.checkpoints.spec import (
    REFERENCE_CONTEXT,
    GiB,
    InsufficientMemoryError,
    ModelSpec,
    MossCheckpointError,
    UnsupportedCheckpointError,
)
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
    "gptq_error",
    "normalize_precision",
    "plan_load",
]

TURN_TOKENS = 512
"""Tokens of one turn as the release measured it: meta instruction and switches, a question and a reply."""
MARGIN = 1.5
GPU_RESERVE = GiB // 2
"""Kept free on every GPU for the CUDA context, cuBLAS workspace and kernels."""
CPU_RESERVE = 2 * GiB
"""Kept free in CPU RAM for Python, torch and the operating system."""
Device = int | str


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes needed on one device: after loading, for one turn, and for the full context."""

    load: int
    turn: int
    full: int

    def gib(self) -> tuple[float, float, float]:
        """The three figures in GiB."""
        return self.load / GiB, self.turn / GiB, self.full / GiB


@dataclass(frozen=True)
class Placement:
    """What one device holds under a plan.

    Attributes:
        device: ``cuda:N``, ``cpu`` or ``disk``.
        modules: Device-map units placed there.
        weights: Bytes of those weights.
        turn: Bytes needed there during one turn.
        full: Bytes needed there at the full context.
        capacity: Bytes available there (``None`` for disk).
    """

    device: str
    modules: tuple[str, ...]
    weights: int
    turn: int
    full: int
    capacity: int | None


def _act_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def _workspace(spec: ModelSpec, s: int, a: int, batch: int) -> int:
    """Attention scores and MLP activations of one block at a time."""
    return batch * (spec.n_head * s * s * (8 + a) + s * (2 * spec.n_inner + 4 * spec.n_embd) * a)


def _per_module(spec: ModelSpec, module: str, weights: int, s: int, a: int, batch: int, resident: bool = True) -> int:
    """Context-dependent bytes a module adds where it runs: KV cache, logits, and (if resident) the margin."""
    extra = int(MARGIN * weights * s / REFERENCE_CONTEXT) if resident else 0
    if module.startswith("transformer.h."):
        extra += batch * 2 * s * spec.n_embd * a
    if module == "lm_head":
        extra += batch * s * spec.vocab_size * (a + 4)
    return extra


def estimate(
    spec: ModelSpec,
    precision: str,
    *,
    turn_tokens: int = TURN_TOKENS,
    context: int = REFERENCE_CONTEXT,
    batch: int = 1,
) -> MemoryEstimate:
    """Load / one turn / full context bytes with every module on one device (as the published table)."""
    a = _act_bytes(precision)
    weights = {m: spec.module_bytes(m, precision) for m in spec.modules()}

    def need(s: int) -> int:
        per = sum(_per_module(spec, m, w, s, a, batch) for m, w in weights.items())
        return sum(weights.values()) + _workspace(spec, s, a, batch) + per

    return MemoryEstimate(sum(weights.values()), need(turn_tokens), need(context))


# ---------------------------------------------------------------- placement


@dataclass
class _Budget:
    """Device capacities for one planning run."""

    gpus: list[tuple[int, int]]
    cpu: int
    disk: bool


def _offload_reserve(spec: ModelSpec, precision: str, s: int, batch: int) -> int:
    """Room on the execution device for streamed modules: the largest one, every KV cache and the logits."""
    a = _act_bytes(precision)
    off = {m: spec.module_bytes(m, precision, offloaded=True) for m in spec.modules()}
    return max(off.values()) + sum(_per_module(spec, m, w, s, a, batch, False) for m, w in off.items())


def _layout(
    spec: ModelSpec, precision: str, budget: _Budget, s: int, batch: int, offload: bool
) -> dict[str, Device] | None:
    """A device map for ``precision`` that holds ``s`` tokens, or None.

    Modules go in execution order onto the GPUs (or the CPU without GPUs), each device filled before the next
    and no module split; with ``offload``, the rest goes to CPU RAM and then disk, and the first execution
    device keeps room for the streamed modules.
    """
    if offload and not budget.gpus and precision in ("int8", "int4"):
        return None  # bitsandbytes leaves every module of a CPU + disk map unquantised
    devices: list[tuple[Device, int | None]] = list(budget.gpus) or [("cpu", budget.cpu)]
    caps = dict(devices)
    filling = dict(caps)  # while filling execution devices, the first keeps room for what is streamed later
    if offload:
        filling[devices[0][0]] = (caps[devices[0][0]] or 0) - _offload_reserve(spec, precision, s, batch)
        devices += [("cpu", budget.cpu)] if budget.gpus else []
        devices += [("disk", None)] if budget.disk else []
        caps = {**dict(devices), **caps}
    mapping: dict[str, Device] = {}
    i = 0
    for module in spec.modules():
        while i < len(devices):
            trial = {**mapping, module: devices[i][0]}
            limits = filling if devices[i][0] in filling else caps
            need = _needs(spec, precision, trial, s, batch)
            if all(limits.get(d) is None or n <= limits[d] for d, n in need.items()):  # type: ignore[operator]
                mapping = trial
                break
            i += 1
        else:
            return None
    return mapping


def _needs(spec: ModelSpec, precision: str, mapping: Mapping[str, Device], s: int, batch: int) -> dict[Device, int]:
    """Bytes each device of a map needs at ``s`` tokens; streamed modules run on the first executing one."""
    a = _act_bytes(precision)
    gpus = any(isinstance(d, int) for d in mapping.values())
    streamed = {m for m, d in mapping.items() if d == "disk" or (gpus and d == "cpu")}
    execs = [d for m, d in mapping.items() if m not in streamed] or ["cpu"]
    needs: dict[Device, int] = dict.fromkeys(mapping.values(), 0)
    for dev in dict.fromkeys(execs):
        needs[dev] = _workspace(spec, s, a, batch)
    for m, dev in mapping.items():
        w = spec.module_bytes(m, precision, offloaded=m in streamed)
        needs[dev] += w
        run = execs[0] if m in streamed else dev
        needs[run] += _per_module(spec, m, w, s, a, batch, resident=m not in streamed)
    if streamed:  # the buffer a streamed module occupies while it runs
        needs[execs[0]] += max(spec.module_bytes(m, precision, offloaded=True) for m in streamed)
    return needs


def _placements(
    spec: ModelSpec,
    precision: str,
    mapping: Mapping[str, Device],
    budget: _Budget,
    turn: int,
    full: int,
    batch: int,
) -> tuple[Placement, ...]:
    """Per-device weights and needs for a device map."""
    turn_needs, full_needs = (_needs(spec, precision, mapping, s, batch) for s in (turn, full))
    gpus = any(isinstance(d, int) for d in mapping.values())
    caps: dict[Device, int | None] = {"cpu": budget.cpu, "disk": None, **dict(budget.gpus)}
    out = []
    for dev in dict.fromkeys(mapping.values()):
        mods = tuple(m for m, d in mapping.items() if d == dev)
        off = dev == "disk" or (gpus and dev == "cpu")
        weights = sum(spec.module_bytes(m, precision, offloaded=off) for m in mods)
        name = f"cuda:{dev}" if isinstance(dev, int) else dev
        out.append(Placement(name, mods, weights, turn_needs[dev], full_needs[dev], caps.get(dev)))
    return tuple(out)


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
        """``int8``, ``int4`` or None."""
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
    if m[1]:  # as released: the plugin-int8 config says 4 bits
        config |= {"wbits": 4 if name.endswith("plugin-int8") else int(m[1]), "groupsize": 128}
    return config


def _spec_and_path(source: ModelSpec | Mapping[str, Any] | str | Path) -> tuple[ModelSpec, Path | None]:
    if isinstance(source, ModelSpec):
        return source, None
    if isinstance(source, Mapping):
        return ModelSpec.from_config(source), None
    if hasattr(source, "to_dict"):  # a transformers PretrainedConfig
        return ModelSpec.from_config(source.to_dict()), None
    path = Path(source)
    if path.is_file():
        path = path.parent
    if (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        return ModelSpec.from_config(config, name=path.name), path
    known = _known_config(str(source))
    if known is not None:
        return ModelSpec.from_config(known, name=str(source)), None

    path = resolve_checkpoint(str(source), weights=False)
    return _spec_and_path(path)[0], path


def _budget(hardware: Hardware, max_memory: Mapping[Any, int | str] | None, offload_folder: str | None) -> _Budget:
    limits = {(_gpu_key(k)): _parse_size(v) for k, v in (max_memory or {}).items()}
    gpus = []
    for g in hardware.gpus:
        cap = min(g.free_bytes, limits[g.index]) if g.index in limits else g.free_bytes - GPU_RESERVE
        if g.index in limits or not limits:
            gpus.append((g.index, max(cap, 0)))
    cpu = min(hardware.cpu_ram_bytes, limits["cpu"]) if "cpu" in limits else hardware.cpu_ram_bytes - CPU_RESERVE
    return _Budget(gpus, max(cpu, 0), offload_folder is not None)


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


def _candidates(hardware: Hardware, budget: _Budget) -> tuple[list[str], list[str]]:
    """Precisions to try without offload, best first, and with offload, least offload first."""
    quant = ["int8", "int4"] if importlib.util.find_spec("bitsandbytes") else []
    if budget.gpus:
        half = "bf16" if all(g.bf16 for g in hardware.gpus) else "fp16"
        return [half, *quant], [*reversed(quant), half]
    return ["fp32", "bf16", *quant], ["bf16"]


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
    spec, path = _spec_and_path(config_or_path)
    if spec.wbits:
        raise gptq_error(spec, path)
    if hardware is None:
        from moss_agent.checkpoints.hardware import inspect_hardware

        hardware = inspect_hardware()
    wanted = normalize_precision(precision)
    context = min(context, spec.n_positions)
    turn_tokens = min(turn_tokens, context)
    budget = _budget(hardware, max_memory, None if offload_folder is None else str(offload_folder))
    plain, offloading = _candidates(hardware, budget)
    if wanted != "auto":
        plain, offloading = [wanted], [wanted]
    choice = next(((p, m) for p in plain if (m := _layout(spec, p, budget, turn_tokens, batch, False))), None)
    choice = choice or next(
        ((p, m) for p in offloading if (m := _layout(spec, p, budget, turn_tokens, batch, True))), None
    )
    alternatives = tuple(
        (p, estimate(spec, p, turn_tokens=turn_tokens, context=context, batch=batch)) for p in PRECISIONS
    )
    if choice is None:
        raise InsufficientMemoryError(_refusal(spec, wanted, plain, hardware, budget, dict(alternatives), turn_tokens))
    chosen, mapping = choice
    placements = _placements(spec, chosen, mapping, budget, turn_tokens, context, batch)
    bf16 = not budget.gpus or all(g.bf16 for g in hardware.gpus)
    # LLM.int8 computes in float16 (it casts anything else); NF4 takes bfloat16 where the hardware has it
    dtype = DTYPES.get(chosen) or ("float16" if chosen == "int8" or not bf16 else "bfloat16")
    plan = LoadPlan(
        spec,
        chosen,
        dtype,
        mapping,
        placements,
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
    budget: _Budget,
    estimates: Mapping[str, MemoryEstimate],
    turn_tokens: int,
) -> str:
    gpus = ", ".join(_size(c) for _, c in budget.gpus) or "none"
    needs = "; ".join(f"{p}: load {_size(estimates[p].load)}, one turn {_size(estimates[p].turn)}" for p in tried)
    options = [f'precision="{p}" (one turn {_size(estimates[p].turn)})' for p in ("int8", "int4") if p not in tried]
    options += ["more or larger GPUs", "max_memory={...} to raise the per-device limits"]
    if not budget.disk:
        options.append('offload_folder="..." to offload weights to disk (slow)')
    return (
        f"{spec.name} ({_count(spec.n_params)} parameters) does not fit one {turn_tokens}-token turn "
        f"{'in ' + wanted if wanted != 'auto' else 'in any precision'} on this machine. Needed: {needs}. "
        f"Available: GPUs [{gpus}], CPU RAM {_size(budget.cpu)} (after reserves). "
        f"Options: {'; '.join(options)}."
    )


def gptq_error(spec: ModelSpec, path: Path | None = None, bits: int | None = None) -> UnsupportedCheckpointError:
    """The refusal for a GPTQ checkpoint: what it is, and the fp16 checkpoint + bitsandbytes instead."""
    declared = spec.wbits
    if bits is None:
        bits = gptq_bits(path, {"wbits": declared, "n_embd": spec.n_embd}, spec.name)
    fp16 = "fnlp/moss-moon-003-sft-plugin" if "plugin" in spec.name else "fnlp/moss-moon-003-sft"
    lie = f" (its config says wbits {declared}; the packed weights are {bits}-bit)" if bits != declared else ""
    backend = (
        f" gptqmodel is installed: it may read this GPTQ-for-LLaMa (GPTQ v1) packing as a codegen model "
        f"given a quantize_config.json with bits {bits} and group_size 128; moss-agent does not load GPTQ "
        "weights itself."
        if importlib.util.find_spec("gptqmodel")
        else ""
    )
    return UnsupportedCheckpointError(
        f"{spec.name} is a GPTQ {bits}-bit checkpoint{lie}, whose Triton kernels need Linux + CUDA and do "
        f'not split across GPUs.{backend} Load the fp16 checkpoint {fp16!r} with precision="int{bits}" instead: '
        "bitsandbytes quantises it while loading, needs about the same memory, and runs on any GPU or the "
        "CPU."
    )
