"""Check the kept-packed GPTQ route where gptqmodel is installed (a GPU machine, or its CPU kernels).

Builds tiny GPTQ checkpoints in the released layout (int4, and int8 whose config says 4), loads each with
``precision="gptq"`` (transformers' GPTQ integration) and with the exact fp32 dequantisation, converts each to
GPT-J with ``keep_quantization=True`` and loads that with plain ``AutoModelForCausalLM``; prints the largest logit
difference and the top-token agreement of each against the exact dequantisation.

Usage (needs ``pip install gptqmodel optimum``; gptqmodel compiles its kernels on first use):
    python scripts/gptq_route.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from moss_agent.checkpoints.convert import convert
from moss_agent.checkpoints.hardware import inspect_hardware
from moss_agent.checkpoints.loading import load_moss
from moss_agent.testing.checkpoints import tiny_gptq_checkpoint


def _compare(name: str, exact: torch.Tensor, other: torch.Tensor) -> None:
    diff = float((exact - other).abs().max())
    agree = float((exact.argmax(-1) == other.argmax(-1)).float().mean())
    print(f"{name:<44} max |logit diff| {diff:.3g}   top token agrees {agree:.1%}")


def main() -> None:
    """Run the comparison and print one line per route."""
    from transformers import AutoModelForCausalLM

    hardware = inspect_hardware()
    device = f"cuda:{hardware.gpus[0].index}" if hardware.gpus else "cpu"
    ids = torch.tensor([list(range(3, 60))])
    for bits, says in ((4, None), (8, 4)):
        path = tiny_gptq_checkpoint(bits, config_wbits=says, n_embd=128, n_head=4)
        exact = load_moss(path, precision="fp32", device_map="cpu").model
        with torch.inference_mode():
            reference = exact(ids).logits.float()
        kept = load_moss(path, precision="gptq", hardware=hardware)
        with torch.inference_mode():
            _compare(f"int{bits} (config says {says or bits}) precision=gptq", reference, _logits(kept.model, ids))
        out = Path(tempfile.mkdtemp()) / "gptj"
        convert(path, out, format="gptj", keep_quantization=True)
        gptj = AutoModelForCausalLM.from_pretrained(out, device_map=device, dtype=torch.float16)
        vocab = len(kept.tokenizer)  # the padding rows of lm_head are masked by the conversion
        with torch.inference_mode():
            converted = _logits(gptj, ids)[..., :vocab]
        _compare(f"int{bits} converted to GPT-J, kept packed", reference[..., :vocab], converted)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(ids.to(device)).logits.float().cpu()


if __name__ == "__main__":
    main()
