"""The demonstration model: synthetic MOSS dialogues, the tiny model trained on them, and its shipped weights.

``moss-agent demo`` runs the weights in ``weights/`` (package data, the output of ``python -m
moss_agent.demo.train``; its ``moss_demo.json`` records the run). Nothing here trains on a user's machine.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEMO_VERSION", "demo_checkpoint"]

DEMO_VERSION = "2"
"""Version of the data, tokenizer and training recipe; the shipped record names the one it was trained with."""


def demo_checkpoint() -> Path:
    """The shipped demonstration checkpoint: a directory in the released MOSS layout, read-only.

    Raises:
        FileNotFoundError: If the package was installed without its data files.
    """
    path = Path(__file__).with_name("weights")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the demonstration weights are missing from {path}: reinstall moss-agent")
    return path
