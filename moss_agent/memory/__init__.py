"""MOSS conversation memory: turns in MOSS's layout, a SQLite store, and LangChain's chat-history adapter."""

from moss_agent.memory.history import MossChatMessageHistory
from moss_agent.memory.store import SQLiteStore, StoredSession, TurnRecord, new_session_id
from moss_agent.memory.turns import (
    BufferMemory,
    ContextBudgetError,
    FitReport,
    MossMemory,
    TokenBudgetMemory,
    WindowMemory,
)

__all__ = [
    "BufferMemory",
    "ContextBudgetError",
    "FitReport",
    "MossChatMessageHistory",
    "MossMemory",
    "SQLiteStore",
    "StoredSession",
    "TokenBudgetMemory",
    "TurnRecord",
    "WindowMemory",
    "new_session_id",
]
