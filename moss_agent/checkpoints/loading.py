"""Load a MOSS checkpoint on the hardware at hand: plan first, then transformers' built-in CodeGen.

The released MOSS checkpoints (``config.json`` with ``model_type: "moss"``, sharded ``pytorch_model-*.bin``,
the MOSS tokenizer files) load here without their remote code, which no longer runs on current transformers:
the config maps onto :class:`~transformers.CodeGenConfig`, the weights load unchanged into
``CodeGenForCausalLM`` (``.bin`` shards read with ``torch.load(weights_only=True)`` one at a time, safetensors
too; the non-learned ``attn.causal_mask`` buffers are dropped) and the tokenizer is a fast GPT-2
byte-level BPE with MOSS's added tokens. Placement, dtype and bitsandbytes quantisation follow a
:class:`LoadPlan` computed before any weight is read. Standard ``codegen`` and ``gptj`` directories load too.

GPTQ checkpoints (the ``-int4`` / ``-int8`` releases, and standard GPTQ ones that ``convert --keep-quantization``
writes) load two ways, without Triton or remote code: dequantised exactly into fp32 / fp16 / bf16 by
:mod:`moss_agent.checkpoints.gptq` (any device), or kept packed with ``precision="gptq"`` through transformers'
GPTQ integration (gptqmodel kernels; its CPU kernels work too). The release's own int4 / int8 path built its
rotary table while torch's default dtype was float16 (``MossForCausalLM.__init__``), so its inverse frequencies
were rounded to fp16 (relative error up to 5.8e-4): angles drift with the position, up to 0.78 rad at position
2047 (table entries off by 0.02 by position 64, 0.19 by 512). Training and the fp16 release used the float32
table, which is what loads here; that deviation of the release is documented, not reproduced.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from moss_agent.checkpoints.files import (
    check_files,
    gptq_bits,
    load_tokenizer,
    read_config,
    read_tensors,
    resolve_checkpoint,
    weight_files,
)
from moss_agent.checkpoints.hardware import Hardware
from moss_agent.checkpoints.plan import (
    REFERENCE_CONTEXT,
    TURN_TOKENS,
    InsufficientMemoryError,
    LoadPlan,
    ModelSpec,
    MossCheckpointError,
    UnsupportedCheckpointError,
    gptq_available,
    plan_load,
)

__all__ = [
    "InsufficientMemoryError",
    "LoadPlan",
    "LoadedMoss",
    "MossCheckpointError",
    "UnsupportedCheckpointError",
    "gptq_bits",
    "load_moss",
    "load_tokenizer",
    "plan_load",
    "read_config",
    "resolve_checkpoint",
]

_CODEGEN_KEYS = (
    "vocab_size n_positions n_ctx n_embd n_layer n_head rotary_dim n_inner activation_function resid_pdrop "
    "embd_pdrop attn_pdrop layer_norm_epsilon initializer_range use_cache bos_token_id eos_token_id "
    "tie_word_embeddings"
).split()
"""The keys of a MOSS config that CodeGen reads; the rest (``wbits``, ``auto_map``, the generation defaults every
4.25.1 config saves, ...) stays out of the model config."""


@dataclass
class LoadedMoss:
    """A loaded model with its tokenizer and the plan it was loaded by.

    Attributes:
        model: The transformers ``CodeGenForCausalLM`` (or ``GPTJForCausalLM``), in eval mode.
        tokenizer: The fast tokenizer with MOSS's added tokens.
        plan: The load plan.
        end_token_ids: ``<eoh> <eot> <eoc> <eor> <eom>`` -> their single token ids, looked up.
        path: The local checkpoint directory.
    """

    model: Any
    tokenizer: Any
    plan: LoadPlan
    end_token_ids: dict[str, int]
    path: Path


# ---------------------------------------------------------------- finding and checking the files


# ---------------------------------------------------------------- model


def _hf_config(path: Path, config: dict[str, Any]) -> tuple[Any, Any]:
    """The transformers config and model class for a checkpoint config."""
    from transformers import CodeGenConfig, CodeGenForCausalLM, GPTJConfig, GPTJForCausalLM

    if config["model_type"] == "gptj":
        return GPTJConfig.from_pretrained(path), GPTJForCausalLM
    if config["model_type"] == "codegen":
        return CodeGenConfig.from_pretrained(path), CodeGenForCausalLM
    kept = {k: config[k] for k in _CODEGEN_KEYS if k in config}
    return CodeGenConfig(**kept, architectures=["CodeGenForCausalLM"]), CodeGenForCausalLM


def _quantization_config(plan: LoadPlan) -> Any:
    if plan.quantization is None:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f'precision="{plan.precision}" needs bitsandbytes: pip install "moss-agent[quant]"')
    offload = bool(plan.offloaded)
    if plan.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=offload)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=getattr(torch, plan.dtype),
        llm_int8_skip_modules=[],  # lm_head too: the plan's int4 figures count every matrix in NF4
        llm_int8_enable_fp32_cpu_offload=offload,
    )


def _quantize_embedding(model: Any, dtype: Any) -> None:
    """Replace the input embedding by an NF4 one (bitsandbytes has no from_pretrained option for it)."""
    import bitsandbytes as bnb

    old = model.get_input_embeddings()
    if old.weight.device.type == "meta":  # offloaded: stays as it is
        return
    new = bnb.nn.EmbeddingNF4(old.num_embeddings, old.embedding_dim, dtype=dtype, device="meta")
    new.weight = bnb.nn.Params4bit(
        old.weight.data,
        requires_grad=False,
        quant_type="nf4",
        compress_statistics=True,
        module=new,  # type: ignore[arg-type]  # bitsandbytes annotates Linear4bit; Embedding4bit does the same
    ).to(old.weight.device)  # type: ignore[misc]  # quantises while moving
    hook = getattr(old, "_hf_hook", None)
    if hook is not None:
        from accelerate.hooks import add_hook_to_module

        add_hook_to_module(new, hook)
    model.set_input_embeddings(new)


def _device_map(plan: LoadPlan, device_map: str | dict[str, Any]) -> Any:
    if isinstance(device_map, dict):
        return device_map
    if device_map == "auto":
        return plan.hf_device_map()
    if device_map in ("balanced", "balanced_low_0", "sequential"):
        return device_map
    return {"": device_map}


def _load_dequantized(path: Path, hf_config: Any, model_class: Any, plan: LoadPlan, device_map: Any) -> Any:
    """A GPTQ checkpoint with every packed Linear dequantised exactly, each tensor placed as it is made."""
    import torch
    from accelerate import dispatch_model, init_empty_weights
    from accelerate.utils import set_module_tensor_to_device

    from moss_agent.checkpoints.gptq import dequantized

    if not isinstance(device_map, dict):  # an accelerate strategy: the plan's map instead
        device_map = plan.hf_device_map()
    if "disk" in device_map.values():
        raise InsufficientMemoryError(
            f"{path}: a dequantised GPTQ checkpoint cannot be offloaded to disk; convert it first "
            "(moss-agent convert SRC DST --dtype fp16) and load the result with an offload folder"
        )
    dtype = getattr(torch, plan.dtype)
    with init_empty_weights(include_buffers=False):
        net = model_class(hf_config)
    params = dict(net.named_parameters())

    def device_of(name: str) -> Any:
        owner = max((m for m in device_map if m == "" or name == m or name.startswith(f"{m}.")), key=len)
        where = device_map[owner]
        return f"cuda:{where}" if isinstance(where, int) else where

    tensors = (item for file in weight_files(path) for item in read_tensors(file))
    for name, tensor in dequantized(tensors, dtype):
        if name in params:
            set_module_tensor_to_device(net, name, device_of(name), value=tensor, dtype=dtype)
    missing = [n for n, p in net.named_parameters() if p.device.type == "meta"]
    if missing:
        raise MossCheckpointError(f"{path} lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    devices = set(device_map.values())
    if len(devices) > 1:
        return dispatch_model(net, device_map=device_map)
    return net.to(device_of(next(iter(params))))  # the buffers (rotary table, masks) too


def _from_pretrained(
    path: Path,
    hf_config: Any,
    model_class: Any,
    plan: LoadPlan,
    device_map: str | dict[str, Any],
    max_memory: dict[Any, int | str] | None,
    folder: str | None,
) -> Any:
    """Load through transformers' ``from_pretrained`` as the plan says: dtype, placement, bitsandbytes or GPTQ."""
    import torch

    if plan.precision == "gptq":
        if not gptq_available():
            raise ImportError(
                'precision="gptq" needs transformers\' GPTQ integration: pip install gptqmodel optimum (gptqmodel '
                'compiles its kernels); or load the checkpoint dequantised with precision="fp16"'
            )
        from moss_agent.checkpoints.gptq import quantization_config

        hf_config.quantization_config = quantization_config(plan.spec.wbits or 4)  # bits from the tensors
    kwargs: dict[str, Any] = {"config": hf_config, "dtype": getattr(torch, plan.dtype)}
    kwargs["device_map"] = _device_map(plan, device_map)
    if max_memory is not None and isinstance(kwargs["device_map"], str):
        kwargs["max_memory"] = max_memory
    if folder is not None:
        kwargs["offload_folder"] = folder
    quant = _quantization_config(plan)
    if quant is not None:
        kwargs["quantization_config"] = quant
    try:
        net = model_class.from_pretrained(path, **kwargs)
    except (pickle.UnpicklingError, RuntimeError, OSError) as err:
        if "weights_only" in str(err) or "Weights only" in str(err) or isinstance(err, pickle.UnpicklingError):
            raise MossCheckpointError(
                f"{path}: a weight file holds pickled objects other than tensors; refusing to run them "
                "(weights load with torch.load(weights_only=True)). Use the official files or safetensors."
            ) from err
        raise
    return net


def load_moss(
    model: str | os.PathLike[str],
    *,
    precision: str = "auto",
    device_map: str | dict[str, Any] = "auto",
    max_memory: dict[Any, int | str] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    hardware: Hardware | None = None,
    context: int = REFERENCE_CONTEXT,
    turn_tokens: int = TURN_TOKENS,
    batch: int = 1,
    tokenization: str = "release",
    adapter: str | os.PathLike[str] | None = None,
) -> LoadedMoss:
    """Load a MOSS (or CodeGen / GPT-J) checkpoint for generation, planned for the hardware first.

    Args:
        model: A checkpoint directory or hub id (fetched through huggingface_hub; no remote code).
        precision: ``auto`` (the best that fits one turn; fp16 for MOSS on GPUs), ``fp32``, ``bf16``, ``fp16``,
            ``int8`` or ``int4`` (bitsandbytes, quantised while loading), or ``gptq`` for a GPTQ checkpoint kept
            packed (a GPTQ checkpoint in fp32 / fp16 / bf16 is dequantised exactly).
        device_map: ``auto`` (the plan's map: GPUs in order, blocks never split, then CPU / disk), a device
            (``cpu``, ``cuda:1``), an accelerate strategy (``balanced``, ``sequential``) or an explicit map;
            anything but ``auto`` overrides the plan's placement.
        max_memory: Per-device caps, e.g. ``{0: "20GiB", "cpu": "60GiB"}``.
        offload_folder: Allows offloading weights to disk there.
        hardware: The hardware to plan for; inspected when None.
        context: Tokens of the full context the plan checks.
        turn_tokens: Tokens of one turn the plan must fit.
        batch: Sequences generated together.
        tokenization: ``release`` (the default): the tokenizer gives the ids of the release's own tokenizer
            (whitespace next to added tokens stripped, see :mod:`moss_agent.checkpoints.tokenization`);
            ``plain``: plain BPE around the added tokens.
        adapter: A LoRA adapter directory (from ``moss-agent finetune``), merged into the weights after loading
            (kept as a peft wrapper on a bitsandbytes-quantised model).

    Returns:
        The model, tokenizer, plan and end-token ids.

    Raises:
        MossCheckpointError: Missing files, a config that is not MOSS / CodeGen, or a broken tokenizer.
        UnsupportedCheckpointError: A precision that does not apply (bitsandbytes on GPTQ, gptq on fp16).
        ImportError: ``precision="gptq"`` without gptqmodel and optimum.
        InsufficientMemoryError: When the plan cannot fit one turn (before any weight is read).
    """
    if adapter is not None:
        from moss_agent.checkpoints.adapters import check_adapter

        check_adapter(adapter)  # a wrong path fails before minutes of loading
    local = Path(model).expanduser().is_dir()
    path = resolve_checkpoint(model, weights=False)
    config = read_config(path)
    spec = ModelSpec.from_config(config, name=path.name if local else str(model))
    bits = gptq_bits(path if local else None, config, spec.name)
    if bits:
        spec = replace(spec, wbits=bits)
    if local:
        check_files(path)
    from moss_agent.checkpoints.hardware import inspect_hardware

    hardware = hardware or inspect_hardware()
    folder = None if offload_folder is None else str(offload_folder)
    plan = plan_load(
        spec, hardware, precision, max_memory=max_memory, offload_folder=folder, context=context,
        turn_tokens=turn_tokens, batch=batch,
    )  # fmt: skip
    if not local:
        path = resolve_checkpoint(model, weights=True)
        check_files(path)
        if spec.wbits:  # the tensors are here now: they tell the real width
            spec = replace(spec, wbits=gptq_bits(path, config, spec.name))
            plan = replace(plan, spec=spec)
    tokenizer, end_ids = load_tokenizer(path, tokenization)

    import torch

    hf_config, model_class = _hf_config(path, config)
    if spec.wbits and plan.precision != "gptq":
        net = _load_dequantized(path, hf_config, model_class, plan, _device_map(plan, device_map))
    else:
        net = _from_pretrained(path, hf_config, model_class, plan, device_map, max_memory, folder)
    if plan.quantization == "int4":
        _quantize_embedding(net, getattr(torch, plan.dtype))
    if adapter is not None:
        from moss_agent.checkpoints.adapters import apply_adapter

        net = apply_adapter(net, adapter)
    net.eval()
    return LoadedMoss(net, tokenizer, plan, end_ids, path)
