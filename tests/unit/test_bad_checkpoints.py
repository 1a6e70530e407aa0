"""Broken checkpoints: one line naming the file and what is wrong, a MossCheckpointError, exit status 2."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from moss_agent.checkpoints.hardware import Hardware
from moss_agent.checkpoints.loading import load_moss
from moss_agent.checkpoints.plan import plan_load
from moss_agent.checkpoints.spec import MossCheckpointError
from moss_agent.cli import main
from moss_agent.testing.checkpoints import tiny_moss_checkpoint

CPU = Hardware.simulated(cpu_gib=16)


def _edit_config(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps(change(config)))

    return edit


def _truncate(name: str) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        data = (path / name).read_bytes()
        (path / name).write_bytes(data[: len(data) // 2])

    return edit


def _empty(path: Path) -> None:
    for child in path.iterdir():
        child.unlink()


CASES = {
    "empty directory": (_empty, r"has no config\.json"),
    "config a list": (_edit_config(lambda c: [c]), r"config\.json is not a JSON object"),
    "config not JSON": (lambda p: (p / "config.json").write_text("{oops"), r"config\.json is not valid JSON"),
    "size a string": (_edit_config(lambda c: {**c, "n_embd": "64"}), "n_embd must be a positive integer, got '64'"),
    "size a float": (_edit_config(lambda c: {**c, "n_layer": 2.5}), "n_layer must be a positive integer, got 2.5"),
    "size missing": (_edit_config(lambda c: {k: v for k, v in c.items() if k != "n_head"}), "n_head must be"),
    "index without weight_map": (
        lambda p: (p / "pytorch_model.bin.index.json").write_text('{"metadata": {}}'),
        r"index\.json has no weight_map",
    ),
    "index not JSON": (
        lambda p: (p / "pytorch_model.bin.index.json").write_text("[1, 2"),
        r"index\.json is not valid JSON",
    ),
    "truncated shard": (_truncate("pytorch_model-00002-of-00002.bin"), r"00002-of-00002\.bin is truncated"),
    "garbage vocab": (lambda p: (p / "vocab.json").write_bytes(b"\x00\xff garbage"), r"vocab\.json is not valid JSON"),
    "vocab not a mapping": (lambda p: (p / "vocab.json").write_text("[1, 2]"), r"vocab\.json is not a JSON object"),
    "garbage merges": (lambda p: (p / "merges.txt").write_text("#version: 0.2\nonly-one-part\n"), "tokenizer files"),
}


@pytest.fixture(params=list(CASES))
def broken(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_moss_checkpoint(), path)
    edit, message = CASES[request.param]
    edit(path)
    return path, message


def test_the_library_raises_a_checkpoint_error_naming_the_problem(broken: tuple[Path, str]) -> None:
    path, message = broken
    with pytest.raises(MossCheckpointError, match=message) as info:
        load_moss(path, hardware=CPU)
    assert "\n" not in str(info.value)


def test_the_command_line_prints_one_line_and_exits_2(
    broken: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    path, message = broken
    if "vocab" in message or "tokenizer" in message:  # the plan reads the config, index and shards only
        assert main(["convert", str(path), str(path.parent / "out")]) == 2
    else:
        assert main(["plan", str(path), "--gpus", "24"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("moss-agent: error:")
    assert "Traceback" not in err and "RecursionError" not in err


def test_plan_of_an_empty_directory_does_not_recurse(tmp_path: Path) -> None:
    with pytest.raises(MossCheckpointError, match=r"has no config\.json"):
        plan_load(tmp_path, CPU)
