"""Logits of the release's own forward against moss-agent's loads, on tiny checkpoints in the released layout.

The release's ``modeling_moss.py`` runs under its pinned transformers 4.25.1 in a scratch environment that also
sees torch (for instance ``python -m venv /tmp/tf425`` with ``pip install transformers==4.25.1 tokenizers==0.13.3``
and a ``.pth`` line naming this project's site-packages for torch), in fp16 (``.half()``) as the release ran.
Its GPTQ Linears compute as its Triton kernel does (fp16 weights ``scales * (q - z)``, float32 accumulation,
fp16 output), in torch. moss-agent's loads (fp16, bf16, fp32; GPTQ dequantised exactly) are compared with it
position by position: top-token agreement and mean / largest logit difference.

Usage:
    python scripts/release_numerics.py /tmp/tf425/bin/python [RELEASE_DIR]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

RELEASE = Path(__file__).resolve().parents[1].parent / "shared" / "moss_release"
SIZES: dict[str, Any] = {"n_embd": 128, "n_head": 4, "n_layer": 2, "rotary_dim": 16}


def _release_logits(path: Path, ids: list[list[int]], out: Path, release: Path, wbits: int | None) -> None:
    """Run in the scratch environment: the release's MossForCausalLM, ``.half()``, on ``ids``."""
    import sys as _sys
    import types
    from unittest import mock

    import torch

    triton = mock.MagicMock()
    triton.jit = lambda f: f
    autotune = types.ModuleType("models.custom_autotune")
    autotune.autotune = lambda **_: lambda f: f  # type: ignore[attr-defined]
    autotune.__all__ = ["autotune"]  # type: ignore[attr-defined]
    _sys.modules.update({"triton": triton, "triton.language": triton.language, "models": types.ModuleType("models")})
    _sys.modules["models.custom_autotune"] = autotune
    package = Path(tempfile.mkdtemp()) / "moss_release_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("configuration_moss", "modeling_moss", "quantization"):
        (package / f"{name}.py").symlink_to(release / f"{name}.py")
    _sys.path.insert(0, str(package.parent))
    from moss_release_pkg import quantization  # type: ignore[import-not-found]
    from moss_release_pkg.configuration_moss import MossConfig  # type: ignore[import-not-found]
    from moss_release_pkg.modeling_moss import MossForCausalLM  # type: ignore[import-not-found]

    def kernel(self: Any, x: Any) -> Any:  # matmul_248_kernel: fp16 weights, float32 accumulation, fp16 out
        p, k, n = 32 // self.bits, torch.arange(self.infeatures), torch.arange(self.outfeatures)
        q = (self.qweight[k // p] >> (self.bits * (k % p))[:, None]) & self.maxq
        z = ((self.qzeros[:, n // p] >> (self.bits * (n % p))[None, :]) & self.maxq) + 1
        g = self.g_idx.long()
        weight = (self.scales[g].float() * (q - z[g]).float()).half()
        out = (x.reshape(-1, x.shape[-1]).float() @ weight.float()).half()
        out = out + self.bias if self.bias is not None else out
        return out.reshape(*x.shape[:-1], self.outfeatures)

    quantization.QuantLinear.forward = kernel
    config = json.loads((path / "config.json").read_text())
    if wbits:
        config["wbits"] = wbits  # the release cannot load its plugin-int8 config as shipped (it says 4)
    drop = ("auto_map", "architectures", "transformers_version", "_name_or_path", "torch_dtype")
    model = MossForCausalLM(MossConfig(**{k: v for k, v in config.items() if k not in drop}))
    state: dict[str, Any] = {}
    for file in sorted(path.glob("pytorch_model*.bin")):
        state.update(torch.load(file, map_location="cpu", weights_only=True))
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        torch.save(model.half().eval()(torch.tensor(ids)).logits.float(), out)


def main() -> None:
    """Compare and print one line per checkpoint and precision."""
    if len(sys.argv) > 1 and sys.argv[1] == "--oracle":
        where, tokens, into, code, bits = sys.argv[2:7]
        _release_logits(Path(where), json.loads(tokens), Path(into), Path(code), int(bits) or None)
        return
    import torch

    from moss_agent.checkpoints.hardware import Hardware
    from moss_agent.checkpoints.loading import load_moss
    from moss_agent.testing.checkpoints import tiny_gptq_checkpoint, tiny_moss_checkpoint

    scratch, release = sys.argv[1], Path(sys.argv[2]) if len(sys.argv) > 2 else RELEASE
    cases = [
        ("fp16 (wbits 32)", tiny_moss_checkpoint(**SIZES), 0),
        ("gptq int4", tiny_gptq_checkpoint(4, **SIZES), 0),
        ("gptq int8 (config says 4)", tiny_gptq_checkpoint(8, config_wbits=4, **SIZES), 8),
    ]
    gen = torch.Generator().manual_seed(0)
    for name, path, wbits in cases:
        n_tokens = len(json.loads((path / "vocab.json").read_text())) + len(
            json.loads((path / "added_tokens.json").read_text())
        )
        ids = torch.randint(0, n_tokens, (1, 1536), generator=gen)
        out = Path(tempfile.mkdtemp()) / "release.pt"
        args = [str(path), json.dumps(ids.tolist()), str(out), str(release), str(wbits)]
        subprocess.run([scratch, __file__, "--oracle", *args], check=True, capture_output=True)
        reference = torch.load(out)[..., :n_tokens]
        for precision in ("fp16", "bf16", "fp32"):
            model = load_moss(path, precision=precision, hardware=Hardware.simulated(cpu_gib=16)).model
            with torch.no_grad():
                logits = model(ids).logits.float()[..., :n_tokens]
            diff = (logits - reference).abs()
            agree = float((logits.argmax(-1) == reference.argmax(-1)).float().mean())
            print(f"{name:<26} {precision}: top token {agree:.1%}, mean |diff| {diff.mean():.2e}, max {diff.max():.3g}")


if __name__ == "__main__":
    main()
