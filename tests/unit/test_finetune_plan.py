"""The training memory plan: what README shows for the 16 B model, and refusals before anything loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from moss_agent.checkpoints.hardware import Hardware
from moss_agent.checkpoints.plan import MOSS_16B_CONFIG
from moss_agent.checkpoints.spec import GiB, InsufficientMemoryError, ModelSpec
from moss_agent.finetune import finetune, plan_training
from moss_agent.finetune.plan import check_options, lora_parameters

README = Path(__file__).resolve().parents[2] / "README.md"
SPEC = ModelSpec.from_config(MOSS_16B_CONFIG, name="moss-moon-003")


def _row(method: str, precision: str, gpus: tuple[float, ...]) -> tuple[str, bool]:
    plan = plan_training(SPEC, Hardware.simulated(gpus, 64), method, precision)
    return " + ".join(f"{n / GiB:.1f}" for n in plan.need) + " GiB", plan.fits


@pytest.mark.parametrize(
    ("method", "precision", "gpus", "verdict"),
    [
        ("lora", "fp16", (24,), "refused"),
        ("lora", "fp16", (24, 24), "fits"),
        ("qlora", "bf16", (24,), "fits"),
        ("full", "bf16", (80,) * 8, "fits (uses 2)"),
        ("full", "bf16", (80,), "refused"),
    ],
)
def test_readme_figures_come_from_the_plan(method: str, precision: str, gpus: tuple, verdict: str) -> None:
    needs, fits = _row(method, precision, gpus)
    assert fits == (verdict != "refused")
    where = f"{len(gpus)} × {gpus[0]:g} GB"
    rows = README.read_text(encoding="utf-8").splitlines()
    line = next(row for row in rows if f"| {needs} | {where} | {verdict} |" in row)
    assert line.startswith("| " + {"lora": "LoRA", "qlora": "QLoRA", "full": "full"}[method])


def test_lora_parameters_of_the_16b() -> None:
    # r * (in + out) on qkv (6144 -> 18432), out (6144 -> 6144), fc_in (6144 -> 24576), fc_out (24576 -> 6144)
    assert lora_parameters(SPEC, 8) == 34 * 8 * (24576 + 12288 + 30720 + 30720) == 26_738_688


def test_refused_before_loading(tmp_path: Path) -> None:
    from moss_agent.testing.checkpoints import tiny_moss_checkpoint

    tiny = Hardware.simulated((), cpu_gib=2.001)  # 2 GiB are kept for the system: nothing left to train in
    data = tmp_path / "data.jsonl"
    data.write_text("", encoding="utf-8")
    with pytest.raises(InsufficientMemoryError, match="does not fit"):
        finetune(tiny_moss_checkpoint(), data, tmp_path / "out", hardware=tiny)
    with pytest.raises(FileNotFoundError, match="no training data"):  # before the plan, before any loading
        finetune(tiny_moss_checkpoint(), tmp_path / "absent", tmp_path / "out", hardware=tiny)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "dora"}, "unknown method"),
        ({"precision": "int4"}, "qlora"),
        ({"method": "full", "precision": "fp16"}, "bf16 or fp32"),
        ({"steps": 0}, "at least 1"),
        ({"loss": "everything"}, "unknown loss rule"),
    ],
)
def test_bad_options_are_named(kwargs: dict, message: str) -> None:
    options = {"method": "lora", "precision": "auto", "steps": None, "epochs": None, "batch_size": 1,
               "max_length": 2048, "loss": "release"} | kwargs  # fmt: skip
    with pytest.raises(ValueError, match=message):
        check_options(**options)


def test_plan_only_prints_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    from moss_agent.cli import main

    assert main(["finetune", "fnlp/moss-moon-003-sft", "--plan-only", "--gpus", "24", "--method", "qlora"]) == 0
    assert capsys.readouterr().out.endswith("cuda:0: needs 13.4 GiB of 23.0 GiB (ok)\nfits\n")
    assert main(["finetune", "fnlp/moss-moon-003-sft", "--plan-only", "--gpus", "24", "--precision", "fp16"]) == 0
    assert "does not fit: refused before loading" in capsys.readouterr().out
