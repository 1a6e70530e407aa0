"""What hardware is here: GPUs with their memory and bf16 support, and CPU RAM.

Shared by the model loader and by tools that load models of their own (text-to-image). Imports torch lazily.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

__all__ = ["GPU", "Hardware", "inspect_hardware", "torch_device_and_dtype"]

GiB = 1024**3


@dataclass(frozen=True)
class GPU:
    """One accelerator.

    Attributes:
        index: The CUDA device index.
        name: The device name.
        total_bytes: Total memory.
        free_bytes: Memory free when inspected.
        bf16: Whether it computes in bfloat16 natively.
    """

    index: int
    name: str
    total_bytes: int
    free_bytes: int
    bf16: bool = False


@dataclass(frozen=True)
class Hardware:
    """The machine a model is to be loaded on.

    Attributes:
        gpus: The CUDA GPUs, possibly none.
        cpu_ram_bytes: Available CPU memory.
    """

    gpus: tuple[GPU, ...] = field(default_factory=tuple)
    cpu_ram_bytes: int = 0

    @classmethod
    def simulated(cls, gpu_gib: tuple[float, ...] = (), cpu_gib: float = 24.0, bf16: bool = True) -> Hardware:
        """Hardware described by numbers, for planning on another machine or in tests.

        Args:
            gpu_gib: Free memory of each GPU in GiB.
            cpu_gib: CPU RAM in GiB.
            bf16: Whether the GPUs support bfloat16.
        """
        gpus = tuple(GPU(i, f"simulated-{g:g}GiB", int(g * GiB), int(g * GiB), bf16) for i, g in enumerate(gpu_gib))
        return cls(gpus, int(cpu_gib * GiB))


def _cpu_ram_bytes() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def inspect_hardware() -> Hardware:
    """Inspect this machine (imports torch)."""
    import torch

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            props = torch.cuda.get_device_properties(i)
            gpus.append(GPU(i, props.name, int(total), int(free), props.major >= 8))
    return Hardware(tuple(gpus), _cpu_ram_bytes())


def torch_device_and_dtype(hardware: Hardware | None = None) -> tuple[str, Any]:
    """The device and dtype for a small auxiliary model: the first GPU in half precision, else CPU fp32."""
    import torch

    hw = hardware or inspect_hardware()
    if hw.gpus:
        return f"cuda:{hw.gpus[0].index}", torch.bfloat16 if hw.gpus[0].bf16 else torch.float16
    return "cpu", torch.float32
