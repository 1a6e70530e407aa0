"""Shared fixtures: the MOSS sample data, read in place from ``../shared/moss_data`` (never copied here)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

# Tiny models run several times faster on one thread than on two contended ones (CI has two cores); set before
# any test imports torch. Code that trains (the demo model) sets its own thread count.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MOSS_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "moss_data"


@pytest.fixture(scope="session")
def moss_data() -> Path:
    """The MOSS sample SFT data folder; the test is skipped when it is absent."""
    if not (MOSS_DATA / "conversations").is_dir():
        pytest.skip(
            f"MOSS sample data not found at {MOSS_DATA} (CC BY-NC, kept outside the repository): "
            "place the release's SFT_data files there to run this test"
        )
    return MOSS_DATA


@pytest.fixture(scope="session")
def moss_json(moss_data: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every sample conversation file with its parsed JSON, in path order."""
    paths = sorted((moss_data / "conversations").rglob("*.json"))
    return [(path, json.loads(path.read_text(encoding="utf-8"))) for path in paths]


SEGMENT_KEYS = ("Human", "Inner Thoughts", "Commands", "Tool Responses", "MOSS")


def trained_text(record: dict[str, Any]) -> str:
    """The trained text of one SFT record: meta instruction and every segment of every turn, in order."""
    turns = sorted(record["chat"], key=lambda key: int(key.rsplit("_", 1)[1]))
    return record["meta_instruction"] + "".join(record["chat"][t][k] for t in turns for k in SEGMENT_KEYS)


@pytest.fixture(scope="session")
def moss_texts(moss_json: list[tuple[Path, dict[str, Any]]]) -> list[tuple[Path, str]]:
    """Every sample conversation as its trained text."""
    return [(path, trained_text(record)) for path, record in moss_json]
