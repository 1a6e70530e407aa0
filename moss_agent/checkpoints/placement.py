"""Memory arithmetic and device placement of a load plan: what each module needs, and where it goes.

Pure arithmetic over a :class:`~moss_agent.checkpoints.spec.ModelSpec` (no torch).

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

from collections.abc import Mapping
from dataclasses import dataclass

from moss_agent.checkpoints.spec import REFERENCE_CONTEXT, GiB, ModelSpec

__all__ = ["MARGIN", "Budget", "Device", "MemoryEstimate", "Placement", "estimate", "layout", "placements"]

TURN_TOKENS = 512
"""Tokens of one turn as the release measured it: meta instruction and switches, a question and a reply."""
MARGIN = 1.5
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
class Budget:
    """Device capacities for one planning run."""

    gpus: list[tuple[int, int]]
    cpu: int
    disk: bool


def _offload_reserve(spec: ModelSpec, precision: str, s: int, batch: int) -> int:
    """Room on the execution device for streamed modules: the largest one, every KV cache and the logits."""
    a = _act_bytes(precision)
    off = {m: spec.module_bytes(m, precision, offloaded=True) for m in spec.modules()}
    return max(off.values()) + sum(_per_module(spec, m, w, s, a, batch, False) for m, w in off.items())


def layout(
    spec: ModelSpec, precision: str, budget: Budget, s: int, batch: int, offload: bool
) -> dict[str, Device] | None:
    """A device map for ``precision`` that holds ``s`` tokens, or None.

    Modules go in execution order onto the GPUs (or the CPU without GPUs), each device filled before the next
    and no module split; with ``offload``, the rest goes to CPU RAM and then disk, and the first execution
    device keeps room for the streamed modules.
    """
    if offload and not budget.gpus and precision in ("int8", "int4"):
        return None  # bitsandbytes leaves every module of a CPU + disk map unquantised
    if offload and precision == "gptq":
        return None  # packed Linears run where they are loaded: no offload
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
            need = needs(spec, precision, trial, s, batch)
            if all(limits.get(d) is None or n <= limits[d] for d, n in need.items()):  # type: ignore[operator]
                mapping = trial
                break
            i += 1
        else:
            return None
    return mapping


def needs(spec: ModelSpec, precision: str, mapping: Mapping[str, Device], s: int, batch: int) -> dict[Device, int]:
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


def placements(
    spec: ModelSpec,
    precision: str,
    mapping: Mapping[str, Device],
    budget: Budget,
    turn: int,
    full: int,
    batch: int,
) -> tuple[Placement, ...]:
    """Per-device weights and needs for a device map."""
    turn_needs, full_needs = (needs(spec, precision, mapping, s, batch) for s in (turn, full))
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
