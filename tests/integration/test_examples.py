"""Every example script runs end to end on the shipped demonstration model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_model() -> Path:
    from moss_agent.demo import demo_checkpoint

    return demo_checkpoint()


def run_example(name: str, *args: str, timeout: float = 240) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        cwd=EXAMPLES,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"{name} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_every_example_has_a_test() -> None:
    scripts = {p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")}
    tested = {
        "chat_streaming.py",
        "plugin_agent.py",
        "langgraph_agent.py",
        "sqlite_memory.py",
        "retrieval_citations.py",
        "lcel_pipeline.py",
    }
    assert scripts == tested


def test_chat_streaming(demo_model: Path) -> None:
    out = run_example("chat_streaming.py", "--question", "Hello! Who are you?")
    assert out.startswith("> Hello! Who are you?\n")
    assert len(out.splitlines()[1].strip()) > 0


def test_plugin_agent_runs_real_tools(demo_model: Path) -> None:
    out = run_example("plugin_agent.py")
    assert 'commands: Calculate("' in out and 'commands: Solve("' in out
    # The real tools answered: a results block names each command with what the tool returned.
    assert "results:  'Calculate(\"" in out and "results:  'Solve(\"" in out


def test_langgraph_agent(demo_model: Path) -> None:
    out = run_example("langgraph_agent.py")
    assert "[2 turns in MOSS layout]" in out
    assert "<|Human|>: What is 15 * 4?<eoh>" in out


def test_sqlite_memory_survives_two_runs(demo_model: Path, tmp_path: Path) -> None:
    db = str(tmp_path / "chat.sqlite3")
    first = run_example("sqlite_memory.py", "--db", db)
    assert "[0 earlier turns" in first and "[1 turns saved]" in first
    second = run_example("sqlite_memory.py", "--db", db, "--question", "Thank you!")
    assert "[1 earlier turns" in second and "[2 turns saved]" in second


def test_retrieval_citations(demo_model: Path) -> None:
    out = run_example("retrieval_citations.py")
    assert "[3 documents shown to MOSS]" in out


def test_lcel_pipeline(demo_model: Path) -> None:
    out = run_example("lcel_pipeline.py")
    assert len([line for line in out.splitlines() if "words:" in line]) == 2
