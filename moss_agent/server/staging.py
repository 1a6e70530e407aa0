"""A turn's writes held back until the turn is whole, then committed in one transaction.

The memory and the agent write to their store as a turn goes (the system text, the imported history, the
finished turn). The server hands them a :class:`StagedSession` instead: reads see the stored conversation
plus what the request brought, writes are only noted, and :meth:`StagedSession.commit` writes everything
with one ``append_turns`` call, one SQLite transaction. So a request that is refused, cancelled or cut off
stores nothing, and a client's long history is written at once, not one commit per turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from moss_agent.memory.store import SQLiteStore, StoredSession, TurnRecord, json_artifacts
from moss_agent.protocol import format as fmt

__all__ = ["StagedSession"]


class StagedSession:
    """One conversation of a store, as one request sees and changes it.

    Args:
        store: The real store.
        session_id: The conversation's store id.
        imported: Earlier turns the request brings for a conversation without stored turns (stored with
            the turn).
    """

    def __init__(self, store: SQLiteStore, session_id: str, imported: Sequence[fmt.MossTurn] = ()) -> None:
        self.store = store
        self.session_id = session_id
        self.saved = store.load(session_id)
        self.imported = [] if self.saved is not None and self.saved.records else list(imported)
        self.system: str | None = None  # the system text the turn ran with, as the memory set it
        self.records: list[TurnRecord] = []

    @property
    def is_new(self) -> bool:
        """Whether the conversation has no stored turn yet."""
        return self.saved is None or not self.saved.records

    # ------------------------------------------------------------------ what the memory calls

    def load(self, session_id: str) -> StoredSession | None:
        """The stored conversation, with the imported turns when it has none of its own."""
        self._check(session_id)
        imported = [TurnRecord(t, None) for t in self.imported]
        if self.saved is None:
            return StoredSession(session_id, None, imported) if imported else None
        return replace(self.saved, records=imported) if imported else self.saved

    def set_system(self, session_id: str, system: str | None) -> None:
        """Note the system text (not written)."""
        self._check(session_id)
        self.system = system

    def append_turn(self, session_id: str, turn: fmt.MossTurn, artifacts: Any = None) -> int:
        """Note a finished turn (not written); returns the index it will get."""
        self._check(session_id)
        self.records.append(TurnRecord(turn, json_artifacts(artifacts)))
        stored = len(self.saved.records) if self.saved is not None else 0
        return stored + len(self.imported) + len(self.records) - 1

    def _check(self, session_id: str) -> None:
        if session_id != self.session_id:
            raise ValueError(f"this staged session is {self.session_id!r}, not {session_id!r}")

    # ------------------------------------------------------------------ commit

    def commit(self, system: str | None) -> None:
        """Write the imported turns, the noted turns and ``system`` (None keeps the stored one) at once."""
        records = [TurnRecord(t, None) for t in self.imported] + self.records
        self.store.append_turns(self.session_id, records, system=system if system is not None else ...)
