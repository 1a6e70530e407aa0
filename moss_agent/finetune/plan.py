"""The training plan: memory a fine-tuning run needs, checked against the hardware before any weight is read.

Estimates, not measurements. Per device: the weights there (NF4 for QLoRA), the trainable state (LoRA weights in
fp32 with their gradients and two AdamW moments, 16 bytes per parameter; for full fine-tuning gradients and both
moments in the weights' dtype, so four copies of every weight), the block inputs that gradient checkpointing keeps
(one hidden state per block and sequence), one block's recomputed activations and attention scores, and the
logits with their gradient on the device holding ``lm_head``. Blocks fill the GPUs in order and are never split.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from moss_agent.checkpoints.hardware import Hardware
from moss_agent.checkpoints.spec import GiB, InsufficientMemoryError, ModelSpec
from moss_agent.settings import CONTEXT_WINDOW, normalize_precision

__all__ = [
    "METHODS",
    "TrainPlan",
    "check_options",
    "describe_training",
    "load_for_training",
    "model_spec",
    "plan_training",
]

METHODS = ("lora", "qlora", "full")
"""Fine-tuning methods: LoRA adapters, LoRA on a 4-bit base (CUDA), or every weight."""

GPU_OVERHEAD = GiB
"""CUDA context and allocator slack per GPU."""
CPU_OVERHEAD = 2 * GiB
_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int4": 2}


@dataclass(frozen=True)
class TrainPlan:
    """Where a fine-tuning run goes and what it needs.

    Attributes:
        method: ``lora``, ``qlora`` or ``full``.
        precision: The base weights' precision.
        devices: Devices used, in order (``cuda:0`` ... or ``cpu``).
        need: Bytes needed on each device.
        capacity: Bytes available on each device.
        trainable: Trainable parameters.
        fits: Whether every device has room.
    """

    method: str
    precision: str
    devices: tuple[str, ...]
    need: tuple[int, ...]
    capacity: tuple[int, ...]
    trainable: int
    fits: bool

    def describe(self) -> str:
        """One line per device: need / available."""
        rows = [f"{self.method} in {self.precision}: {self.trainable / 1e6:.1f} M trainable parameters"]
        for dev, need, cap in zip(self.devices, self.need, self.capacity, strict=True):
            mark = "ok" if need <= cap else "too small"
            rows.append(f"  {dev}: needs {need / GiB:.1f} GiB of {cap / GiB:.1f} GiB ({mark})")
        return "\n".join(rows)


def lora_parameters(spec: ModelSpec, r: int) -> int:
    """LoRA parameters on qkv_proj, out_proj, fc_in and fc_out of every block."""
    d, inner = spec.n_embd, spec.n_inner
    return spec.n_layer * r * ((d + 3 * d) + (d + d) + (d + inner) + (inner + d))


def _pieces(
    spec: ModelSpec, method: str, precision: str, batch: int, length: int, r: int
) -> tuple[list[int], int, int]:
    """(bytes of each module in order with its trainable state, per-device workspace, logits bytes)."""
    weights_as = "int4" if method == "qlora" else precision
    a = _BYTES[precision]
    lora_per_block = lora_parameters(spec, r) // spec.n_layer * 16
    modules = []
    for m in spec.modules():
        w = spec.module_bytes(m, weights_as)
        if method == "full":
            w *= 4  # weights, gradients, two AdamW moments, all in the weights' dtype
        elif m.startswith("transformer.h."):
            w += lora_per_block
        if m.startswith("transformer.h."):
            w += batch * length * spec.n_embd * a  # the block input kept by gradient checkpointing
        modules.append(w)
    s = length
    block = batch * (spec.n_head * s * s * (4 + 2 * a) + s * (2 * spec.n_inner + 6 * spec.n_embd) * a) * 2
    logits = batch * s * spec.vocab_size * (a + 8)  # logits, their fp32 upcast for the loss and its gradient
    return modules, block, logits


def plan_training(
    spec: ModelSpec,
    hardware: Hardware,
    method: str = "lora",
    precision: str = "fp16",
    *,
    batch_size: int = 1,
    max_length: int = CONTEXT_WINDOW,
    lora_r: int = 8,
) -> TrainPlan:
    """Plan a fine-tuning run (see the module docstring for what is counted).

    Args:
        spec: The model's sizes.
        hardware: The machine (``Hardware.simulated((24,))`` for one 24 GB card).
        method: ``lora``, ``qlora`` or ``full``.
        precision: ``fp32``, ``bf16`` or ``fp16`` (compute dtype for ``qlora``).
        batch_size: Conversations per step.
        max_length: Ids per conversation.
        lora_r: LoRA rank.
    """
    modules, block, logits = _pieces(spec, method, precision, batch_size, max_length, lora_r)
    trainable = spec.n_params if method == "full" else lora_parameters(spec, lora_r)
    if not hardware.gpus:
        total = sum(modules) + block + logits
        cap = hardware.cpu_ram_bytes - CPU_OVERHEAD
        return TrainPlan(method, precision, ("cpu",), (total,), (cap,), trainable, total <= cap)
    caps = [g.free_bytes - GPU_OVERHEAD for g in hardware.gpus]
    need = [0] * len(caps)
    gpu = 0
    for i, size in enumerate(modules):
        extra = block + (logits if i == len(modules) - 1 else 0)
        while gpu < len(caps) - 1 and need[gpu] + size + extra > caps[gpu] and need[gpu] > 0:
            gpu += 1
        need[gpu] += size
    used = [i for i, n in enumerate(need) if n]
    for i in used:
        need[i] += block
    need[used[-1]] += logits
    devices = tuple(f"cuda:{hardware.gpus[i].index}" for i in used)
    needs, capacity = tuple(need[i] for i in used), tuple(caps[i] for i in used)
    fits = all(n <= c for n, c in zip(needs, capacity, strict=True))
    return TrainPlan(method, precision, devices, needs, capacity, trainable, fits)


def check_options(
    method: str, precision: str, steps: int | None, epochs: float | None, batch_size: int, max_length: int, loss: str
) -> tuple[str, str]:
    """Validate the options; return (method, precision) with ``auto`` left for the hardware to decide."""
    from moss_agent.finetune.spans import LOSS_MODES

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose {', '.join(METHODS)}")
    if loss not in LOSS_MODES:
        raise ValueError(f"unknown loss rule {loss!r}; choose {' or '.join(LOSS_MODES)}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if epochs is not None and epochs <= 0:
        raise ValueError(f"epochs must be positive, got {epochs}")
    if batch_size < 1 or max_length < 16:
        raise ValueError(f"batch size must be >= 1 and max length >= 16 (got {batch_size}, {max_length})")
    precision = normalize_precision(precision)
    if precision in ("int8", "int4"):
        raise ValueError(f"precision {precision} is for inference; train with --method qlora (4-bit base) instead")
    if method == "full" and precision == "fp16":
        raise ValueError("full fine-tuning in fp16 has no fp32 master weights and diverges: use bf16 or fp32")
    return method, precision


def model_spec(model: str | os.PathLike[str]) -> ModelSpec:
    """The sizes of ``model``: a directory's config, the moss-moon-003 sizes for their hub ids, or the hub's."""
    import re
    from pathlib import Path

    from moss_agent.checkpoints.files import read_config, resolve_checkpoint
    from moss_agent.checkpoints.plan import MOSS_16B_CONFIG

    name = str(model)
    if not Path(name).expanduser().is_dir() and re.fullmatch(r"(fnlp/)?moss-moon-003-(sft|base|sft-plugin)", name):
        return ModelSpec.from_config(MOSS_16B_CONFIG, name=name)
    path = resolve_checkpoint(model, weights=False)
    return ModelSpec.from_config(read_config(path), name=path.name)


def describe_training(
    model: str | os.PathLike[str],
    method: str,
    precision: str,
    batch_size: int = 1,
    max_length: int = CONTEXT_WINDOW,
    lora_r: int = 8,
    hardware: Hardware | None = None,
) -> str:
    """The training plan of ``model`` as text, ending with whether it fits (nothing is loaded)."""
    from moss_agent.checkpoints.hardware import inspect_hardware

    hardware = hardware or inspect_hardware()
    spec = model_spec(model)
    chosen = _resolve_precision(method, precision, hardware)
    plan = plan_training(spec, hardware, method, chosen, batch_size=batch_size, max_length=max_length, lora_r=lora_r)
    return f"{spec.name}: {plan.describe()}\n" + ("fits" if plan.fits else "does not fit: refused before loading")


def _resolve_precision(method: str, precision: str, hardware: Hardware) -> str:
    if precision != "auto":
        return precision
    if not hardware.gpus:
        return "fp32"
    bf16 = all(g.bf16 for g in hardware.gpus)
    return "bf16" if method == "full" or (method == "qlora" and bf16) else "fp16"


def load_for_training(
    model: str | os.PathLike[str],
    method: str,
    precision: str,
    batch_size: int,
    max_length: int,
    lora_r: int,
    hardware: Hardware | None = None,
) -> Any:
    """Plan, refuse what cannot fit, then load the base model for training.

    Raises:
        InsufficientMemoryError: When the plan does not fit (nothing has been loaded).
        ValueError: QLoRA without a CUDA GPU.
    """
    from moss_agent.checkpoints.hardware import inspect_hardware
    from moss_agent.checkpoints.loading import load_moss

    hardware = hardware or inspect_hardware()
    spec = model_spec(model)
    precision = _resolve_precision(method, precision, hardware)
    if method == "qlora" and not hardware.gpus:
        raise ValueError("QLoRA trains on bitsandbytes' 4-bit CUDA kernels and no GPU is here: use --method lora")
    plan = plan_training(spec, hardware, method, precision, batch_size=batch_size, max_length=max_length, lora_r=lora_r)
    if not plan.fits:
        raise InsufficientMemoryError(
            f"{spec.name}: {method} fine-tuning does not fit this machine.\n{plan.describe()}\n"
            "Try --method qlora, a smaller --max-length or --batch-size, or more GPUs."
        )
    load_precision = "int4" if method == "qlora" else precision
    device_map: Any = "cpu" if not hardware.gpus else ("auto" if len(plan.devices) > 1 else plan.devices[0])
    return load_moss(model, precision=load_precision, device_map=device_map, hardware=hardware)
