"""``moss-agent finetune`` end to end on a tiny checkpoint in the released layout, and its adapter everywhere.

One LoRA run (the issue's command: 8 conversations, 40 steps, fp32) is shared by the tests of this module: the loss
drops, the adapter changes the logits through load_moss / ChatMoss / MossLLM, and ``moss-agent merge`` writes a
checkpoint that reloads (and converts) with the adapted logits.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from moss_agent.cli import main
from moss_agent.finetune.data import sample_from_conversation
from moss_agent.protocol import format as fmt
from moss_agent.testing.checkpoints import tiny_moss_checkpoint

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

WIDE = {"n_embd": 256, "n_head": 4, "rotary_dim": 16}
"""256 wide: a random lm_head of a narrower model caps how far LoRA alone can move the logits."""


def write_conversations(folder: Path, n: int = 8, seed: int = 0) -> Path:
    """``n`` short calculator conversations as SFT JSON files (the moss_data format)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        turn = fmt.MossTurn(
            f"What is {a} times {b}?",
            f"{a} times {b} is {a * b}.",
            inner_thoughts=f"I should calculate {a}*{b}.",
            commands=f'Calculate("{a}*{b}")',
            results=f"\nCalculate(\"{a}*{b}\") => '{a * b}'\n",
        )
        sample = sample_from_conversation(fmt.MossConversation(fmt.system_prompt(["Calculate"]), [turn]))
        chat = {f"turn_{k}": dict(t) for k, t in enumerate(sample.turns, 1)}
        record = {"conversation_id": i, "meta_instruction": sample.meta_instruction, "num_turns": 1, "chat": chat}
        (folder / f"conversation_{i}.json").write_text(json.dumps(record), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("finetune")
    ckpt = tiny_moss_checkpoint(**WIDE)
    data = write_conversations(base / "data")
    out, report = base / "adapter", base / "report.json"
    code = main([
        "finetune", str(ckpt), str(data), "--out", str(out), "--method", "lora", "--steps", "40",
        "--precision", "fp32", "--json", str(report), "--quiet",
    ])  # fmt: skip
    assert code == 0
    return {"ckpt": ckpt, "data": data, "out": out, "report": json.loads(report.read_text()), "base": base}


def _logits(model, ids: list[int]):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


@pytest.fixture(scope="module")
def probe(run: dict) -> dict:
    from moss_agent.checkpoints.loading import load_moss

    base = load_moss(run["ckpt"], precision="fp32", device_map="cpu")
    text = fmt.chat_prompt(fmt.system_prompt(["Calculate"]), [], "What is 12 times 34?")
    ids = base.tokenizer.encode(text, add_special_tokens=False)
    adapted = load_moss(run["ckpt"], precision="fp32", device_map="cpu", adapter=run["out"])
    return {"ids": ids, "base": _logits(base.model, ids), "adapted": _logits(adapted.model, ids)}


def test_lora_lowers_the_loss_by_a_fifth(run: dict) -> None:
    report = run["report"]
    assert report["steps"] == 40 and report["method"] == "lora"
    assert report["loss_last"] <= 0.8 * report["loss_first"], report
    assert report["trained_tokens"] > 0 and report["masked_tokens"] > 0
    assert report["conversations"] == 8 and report["skipped"] == 0 and report["eval_loss"] is None
    assert (run["out"] / "adapter_config.json").is_file() and (run["out"] / "adapter_model.safetensors").is_file()
    config = json.loads((run["out"] / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"qkv_proj", "out_proj", "fc_in", "fc_out"}


def test_adapter_changes_the_logits_in_every_face(run: dict, probe: dict) -> None:
    from moss_agent.chat_model import ChatMoss
    from moss_agent.llm import MossLLM

    diff = (probe["adapted"] - probe["base"]).abs().max().item()
    assert diff > 0.1, diff
    chat = ChatMoss(model=str(run["ckpt"]), adapter=str(run["out"]), precision="fp32", device_map="cpu")
    llm = MossLLM(model=str(run["ckpt"]), adapter=str(run["out"]), precision="fp32", device_map="cpu")
    assert chat.get_engine() is llm.get_engine()  # one engine per checkpoint + adapter
    torch.testing.assert_close(_logits(chat.get_engine().model, probe["ids"]), probe["adapted"])
    plain = ChatMoss(model=str(run["ckpt"]), precision="fp32", device_map="cpu")
    assert plain.get_engine() is not chat.get_engine()


def test_merged_checkpoint_reloads_with_the_adapted_logits(run: dict, probe: dict) -> None:
    from moss_agent.checkpoints.loading import load_moss

    merged = run["base"] / "merged"
    assert main(["merge", str(run["ckpt"]), str(run["out"]), str(merged)]) == 0
    config = json.loads((merged / "config.json").read_text())
    source = json.loads((run["ckpt"] / "config.json").read_text())
    assert config == source  # every released key kept (model_type moss, wbits 32, ...), fp16 as released
    assert sorted(p.name for p in merged.glob("pytorch_model*")) == ["pytorch_model.bin"]  # one 10 GB shard
    again = _logits(load_moss(merged, precision="fp32", device_map="cpu").model, probe["ids"])
    off = (again - probe["adapted"]).abs().max().item()
    moved = (probe["adapted"] - probe["base"]).abs().max().item()
    assert off < 0.05 * moved, (off, moved)  # fp16 rounding of the merged weights only
    converted = run["base"] / "converted"
    assert main(["convert", str(merged), str(converted)]) == 0
    assert (converted / "config.json").is_file()


def test_resume_continues_exactly(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from moss_agent.finetune import finetune

    ckpt = tiny_moss_checkpoint()
    data = write_conversations(tmp_path / "data", n=3)
    options = {"precision": "fp32", "progress": False, "eval_data": data}
    straight = finetune(ckpt, data, tmp_path / "a", steps=4, save_steps=2, **options)
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == ["step-2", "step-4"]
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-2", tmp_path / "b" / "checkpoints" / "step-2")
    resumed = finetune(ckpt, data, tmp_path / "b", steps=4, resume=True, **options)
    assert resumed.losses == straight.losses and resumed.steps == 4
    assert resumed.eval_loss_first == straight.eval_loss_first and resumed.eval_loss == straight.eval_loss
    assert straight.eval_loss is not None and straight.eval_loss < straight.eval_loss_first
    a = load_file(tmp_path / "a" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_errors_are_one_line(run: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = str(run["ckpt"])
    assert main(["finetune", ckpt, str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "no training data at" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["finetune", ckpt, str(run["data"]), "--out", str(tmp_path / "o"), "--method", "qlora"]) == 2
        assert "no GPU" in capsys.readouterr().err
    assert main(["demo", "--model", ckpt, "--adapter", str(tmp_path / "missing"), "Hello"]) == 2
    assert "no adapter at" in capsys.readouterr().err


def test_cli_reports_skipped_conversations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_conversations(tmp_path / "data", n=2)
    record = json.loads((data / "conversation_0.json").read_text())
    record["chat"]["turn_1"]["MOSS"] = "It is 42.<eom>\n"  # no role tag
    (data / "broken.json").write_text(json.dumps(record), encoding="utf-8")
    ckpt, out = str(tiny_moss_checkpoint()), str(tmp_path / "out")
    assert main(["finetune", ckpt, str(data), "--out", out, "--steps", "1", "--quiet", "--precision", "fp32"]) == 0
    captured = capsys.readouterr()
    assert "broken.json, turn 1: 'MOSS' segment must start with '<|MOSS|>:'" in captured.err
    assert "2 conversations (0 cut at a turn to fit --max-length, 0 too long, 1 malformed skipped)" in captured.out
    assert main(["finetune", ckpt, str(data), "--out", out, "--steps", "1", "--strict"]) == 2
    assert "broken.json, turn 1" in capsys.readouterr().err
