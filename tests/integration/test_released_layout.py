"""Checkpoints exactly as the release lays them out, through `moss-agent serve`'s app and `moss-agent demo --model`.

fp16 with the release's ``wbits: 32`` config, GPTQ int4, and GPTQ int8 whose config says 4 (as the released
moss-moon-003-sft-plugin-int8): all three load (the GPTQ ones dequantised exactly) and answer.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from moss_agent.testing.checkpoints import tiny_gptq_checkpoint, tiny_moss_checkpoint

pytest.importorskip("torch")

LAYOUTS = {
    "fp16-wbits-32": lambda: tiny_moss_checkpoint(),
    "gptq-int4": lambda: tiny_gptq_checkpoint(4),
    "gptq-int8-config-says-4": lambda: tiny_gptq_checkpoint(8, config_wbits=4),
}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def released(request: pytest.FixtureRequest) -> Path:
    path = LAYOUTS[request.param]()
    config = json.loads((path / "config.json").read_text())
    assert config["wbits"] in (32, 4) and config["groupsize"] == 128 and config["transformers_version"] == "4.25.1"
    return path


def test_serve_app_answers_on_the_released_layout(released: Path, tmp_path: Path) -> None:
    from moss_agent.chat_model import ChatMoss
    from moss_agent.engines.transformers import TransformersEngine
    from moss_agent.memory.store import SQLiteStore
    from moss_agent.server import ServerSettings, create_app
    from moss_agent.server.testing import running_server

    engine = TransformersEngine.from_pretrained(released, precision="fp32")  # as `moss-agent serve` loads it
    app = create_app(ChatMoss(engine=engine), store=SQLiteStore(tmp_path / "db.sqlite3"), settings=ServerSettings())
    ask = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
    with running_server(app) as url, httpx.Client(base_url=url, timeout=120) as http:
        reply = http.post("/v1/chat/completions", json=ask)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] >= 1


def test_demo_with_model_runs_a_conversation(released: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from moss_agent.cli import main

    assert main(["demo", "--model", str(released), "--max-new-tokens", "4", "What is 2+2?"]) == 0
    out = capsys.readouterr().out
    assert f"model {released}" in out and "float32" in out and "What is 2+2?" in out


def test_plan_shows_the_released_layout_as_loadable(released: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from moss_agent.cli import main

    assert main(["plan", str(released), "--gpus", "24"]) == 0
    out = capsys.readouterr().out
    assert "precision   fp16" in out  # MOSS ran in fp16 on GPUs
    assert ("dequantised exactly" in out) == _is_gptq(released)


def _is_gptq(path: Path) -> bool:
    return json.loads((path / "config.json").read_text())["wbits"] != 32
