"""moss-agent: the MOSS chat models (moss-moon-003) as first-class LangChain citizens.

Public names are imported on first use, so ``import moss_agent`` stays light (no torch, no transformers).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moss_agent.agent import MossAgent
    from moss_agent.chat_model import ChatMoss
    from moss_agent.checkpoints.loading import load_moss, plan_load
    from moss_agent.engines.base import Engine, SamplingParams
    from moss_agent.engines.transformers import TransformersEngine
    from moss_agent.llm import MossLLM
    from moss_agent.messages import from_messages, to_messages
    from moss_agent.protocol.data import read_conversation
    from moss_agent.protocol.format import MossConversation, MossTurn, scrub
    from moss_agent.protocol.parser import parse_conversation

__version__ = "0.1.0"

_EXPORTS = {
    "ChatMoss": "moss_agent.chat_model",
    "Engine": "moss_agent.engines.base",
    "MossAgent": "moss_agent.agent",
    "MossConversation": "moss_agent.protocol.format",
    "MossLLM": "moss_agent.llm",
    "MossTurn": "moss_agent.protocol.format",
    "SamplingParams": "moss_agent.engines.base",
    "TransformersEngine": "moss_agent.engines.transformers",
    "from_messages": "moss_agent.messages",
    "load_moss": "moss_agent.checkpoints.loading",
    "parse_conversation": "moss_agent.protocol.parser",
    "plan_load": "moss_agent.checkpoints.loading",
    "read_conversation": "moss_agent.protocol.data",
    "scrub": "moss_agent.protocol.format",
    "to_messages": "moss_agent.messages",
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
