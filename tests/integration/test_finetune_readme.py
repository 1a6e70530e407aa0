"""README's "Fine-tune MOSS" example runs as written, on a tiny checkpoint and small shared data swapped in."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from moss_agent.finetune.data import sample_from_conversation
from moss_agent.protocol import format as fmt
from moss_agent.testing.checkpoints import tiny_moss_checkpoint

pytest.importorskip("peft")

README = Path(__file__).resolve().parents[2] / "README.md"


def _example() -> str:
    section = README.read_text(encoding="utf-8").split("## Fine-tune MOSS", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert len(blocks) == 1
    return blocks[0]


def test_readme_finetune_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    code = _example()
    shared = tmp_path / "shared"
    shared.mkdir()
    for i in range(3):
        turn = fmt.MossTurn(f"What is {i} plus 1?", f"It is {i + 1}.", "I should calculate it.", f'Calculate("{i}+1")',
                            f"\nCalculate(\"{i}+1\") => '{i + 1}'\n")  # fmt: skip
        sample = sample_from_conversation(fmt.MossConversation(fmt.system_prompt(["Calculate"]), [turn]))
        chat = {"turn_1": dict(sample.turns[0])}
        record = {"meta_instruction": sample.meta_instruction, "num_turns": 1, "chat": chat}
        (shared / f"c{i}.json").write_text(json.dumps(record), encoding="utf-8")
    model_line = 'MODEL = "fnlp/moss-moon-003-sft-plugin"'
    shared_line = 'SHARED = "../shared/moss_data/conversations"'
    assert model_line in code and shared_line in code
    code = code.replace(model_line, f"MODEL = {str(tiny_moss_checkpoint())!r}")
    code = code.replace(shared_line, f"SHARED = {str(shared)!r}")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README:Fine-tune MOSS", "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out
    assert re.search(r"loss \d+\.\d+ -> \d+\.\d+ in 18 steps", printed), printed  # 3 examples + 3 shared, 3 epochs
    assert (tmp_path / "weather-adapter" / "adapter_config.json").is_file()
    assert len((tmp_path / "weather.jsonl").read_text(encoding="utf-8").splitlines()) == 6
