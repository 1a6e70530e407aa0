"""moss-agent: the MOSS chat models (moss-moon-003) as first-class LangChain citizens.

Public names are imported on first use, so ``import moss_agent`` stays light (no torch, no transformers).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moss_agent.agent import MossAgent
    from moss_agent.chat_model import ChatMoss
    from moss_agent.data import from_messages, read_conversation, to_messages
    from moss_agent.engine import Engine, SamplingParams, TransformersEngine
    from moss_agent.format import MossConversation, MossTurn, scrub
    from moss_agent.llm import MossLLM
    from moss_agent.loading import load_moss, plan_load
    from moss_agent.parser import parse_conversation

__version__ = "0.1.0"

_EXPORTS = {
    "ChatMoss": "moss_agent.chat_model",
    "Engine": "moss_agent.engine",
    "MossAgent": "moss_agent.agent",
    "MossConversation": "moss_agent.format",
    "MossLLM": "moss_agent.llm",
    "MossTurn": "moss_agent.format",
    "SamplingParams": "moss_agent.engine",
    "TransformersEngine": "moss_agent.engine",
    "from_messages": "moss_agent.data",
    "load_moss": "moss_agent.loading",
    "parse_conversation": "moss_agent.parser",
    "plan_load": "moss_agent.loading",
    "read_conversation": "moss_agent.data",
    "scrub": "moss_agent.format",
    "to_messages": "moss_agent.data",
}

__all__ = [
    "ChatMoss",
    "Engine",
    "MossAgent",
    "MossConversation",
    "MossLLM",
    "MossTurn",
    "SamplingParams",
    "TransformersEngine",
    "from_messages",
    "load_moss",
    "parse_conversation",
    "plan_load",
    "read_conversation",
    "scrub",
    "to_messages",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'moss_agent' has no attribute {name!r}")


def __dir__() -> list[str]:
    return [*globals(), *_EXPORTS]
