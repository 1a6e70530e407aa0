"""Importing moss-agent's pure modules must not pull in the heavy libraries."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "diffusers", "sympy")


@pytest.mark.parametrize(
    "module",
    [
        "moss_agent",
        "moss_agent.protocol.format",
        "moss_agent.protocol.plugins",
        "moss_agent.protocol.parser",
        "moss_agent.protocol.data",
        "moss_agent.chat_model",
        "moss_agent.agent",
        "moss_agent.engines.remote",
        "moss_agent.checkpoints.convert",
        "moss_agent.cli",
    ],
)
def test_import_is_light(module):
    code = f"import sys, {module}; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "", f"importing {module} imported {out.stdout.strip()}"
