"""benchmarks.gpu: skips cleanly without CUDA, and its measurement runs on a tiny shape on the CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # benchmarks/ is not installed: found from the repository root only
    sys.path.insert(0, str(ROOT))

from benchmarks import gpu  # noqa: E402

TINY = {"n_layer": 2, "n_embd": 64, "n_head": 4, "rotary_dim": 8, "vocab_size": 256, "n_positions": 128}


def test_tiny_shape_on_cpu_measures_and_bounds() -> None:
    report = gpu.measure(TINY, precisions=("fp32", "int8"), device="cpu", prompt=16, new_tokens=4)
    row = report["rows"]["fp32"]
    assert row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0 and row["bound_decode_tok_s"] > 0
    params = sum(p.numel() for p in gpu.build_model(TINY, "fp32", "cpu").parameters())
    assert row["weight_gib"] == round(params * 4 / 1024**3, 2)
    assert "CUDA" in report["rows"]["int8"]["skipped"]
    assert "| fp32 |" in gpu.table(report) and "skipped" in gpu.table(report)


def test_random_model_is_a_working_codegen() -> None:
    model = gpu.build_model(TINY, "fp32", "cpu")
    ids = torch.randint(0, TINY["vocab_size"], (1, 8))
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, 8, TINY["vocab_size"]) and torch.isfinite(logits).all()
    assert logits.std() > 0


def test_without_cuda_it_skips_and_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "gpu.json"
    assert gpu.main(["--json", str(out)]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    assert "no CUDA device" in json.loads(out.read_text())["skipped"]


def test_unknown_precision_is_a_usage_error() -> None:
    with pytest.raises(SystemExit):
        gpu.main(["--precisions", "fp8"])
