"""Test doubles and tiny models for moss-agent users' tests and ours.

Nothing here downloads anything: every model is built locally, seeded, in the real MOSS checkpoint layout.
"""

from moss_agent.testing.engines import ScriptedEngine, ScriptExhaustedError
from moss_agent.testing.scripted_rules import RuleBasedEngine

__all__ = ["RuleBasedEngine", "ScriptExhaustedError", "ScriptedEngine"]
