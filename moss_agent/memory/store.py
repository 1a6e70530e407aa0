"""SQLite persistence for MOSS conversations: sessions of turns, one transaction per turn.

Stdlib :mod:`sqlite3` only. The database runs in WAL mode, so readers never block the writer, and every write
is one ``BEGIN IMMEDIATE`` transaction: a turn is on disk whole or not at all, and a process killed mid-turn
loses nothing that was already committed. Sessions are keyed by id, so threads and processes that share one
file never see each other's turns. The schema carries a version number; a file written by a newer schema is
refused rather than misread.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import EllipsisType
from typing import Any, Literal

from moss_agent.protocol import format as fmt

__all__ = [
    "SCHEMA_VERSION",
    "SQLiteStore",
    "SchemaVersionError",
    "SessionInfo",
    "StoredSession",
    "TurnRecord",
    "json_artifacts",
    "new_session_id",
]

SCHEMA_VERSION = 1
"""Version of the database layout this module writes."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    system TEXT,
    pending TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS turns (
    session_id TEXT NOT NULL REFERENCES sessions(session_id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    human TEXT NOT NULL,
    inner_thoughts TEXT NOT NULL,
    commands TEXT NOT NULL,
    results TEXT NOT NULL,
    reply TEXT NOT NULL,
    artifacts TEXT,
    created_at REAL NOT NULL,
    PRIMARY KEY (session_id, idx)
);
"""
# Added beside the schema (created in any database, ignored by versions that do not know it): no version bump.
_TITLES = """CREATE TABLE IF NOT EXISTS session_titles (
    session_id TEXT PRIMARY KEY REFERENCES sessions(session_id) ON DELETE CASCADE, title TEXT NOT NULL)"""


class SchemaVersionError(RuntimeError):
    """The database was written with a schema this version of moss-agent does not know."""


@dataclass(frozen=True)
class TurnRecord:
    """One stored turn.

    Attributes:
        turn: The turn in MOSS's layout.
        artifacts: JSON data the turn produced (image paths, search sources ...), or None.
        created_at: When it was committed, in seconds since the epoch (0 for a turn not stored yet).
    """

    turn: fmt.MossTurn
    artifacts: Any = None
    created_at: float = 0.0


@dataclass(frozen=True)
class SessionInfo:
    """A session as :meth:`SQLiteStore.list_sessions` lists it (times in seconds since the epoch)."""

    session_id: str
    created_at: float
    updated_at: float
    num_turns: int
    title: str | None = None
    """The name it was given (:meth:`SQLiteStore.set_title`), if any."""


@dataclass(frozen=True)
class StoredSession:
    """A whole stored session.

    Attributes:
        session_id: The session's id.
        system: The session's system text (meta instruction and switches), or None when never set.
        records: The turns, oldest first.
        pending: Text the chat-history adapter keeps for messages that do not make a whole turn yet.
        created_at: When the session was created.
        updated_at: When it last changed.
    """

    session_id: str
    system: str | None
    records: list[TurnRecord] = field(default_factory=list)
    pending: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0

    @property
    def turns(self) -> list[fmt.MossTurn]:
        """The turns, oldest first."""
        return [r.turn for r in self.records]

    def to_conversation(self) -> fmt.MossConversation:
        """The session as a :class:`~moss_agent.protocol.format.MossConversation` (default system text when unset)."""
        return fmt.MossConversation(system=self.system or fmt.system_prompt(), turns=self.turns)


def new_session_id() -> str:
    """A fresh random session id."""
    return uuid.uuid4().hex


def _jsonable(value: Any) -> Any:
    # Artifacts are whatever tools return: dataclasses and pydantic models stay structured, the rest a string.
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if hasattr(value, "model_dump"):
        return value.model_dump()
    return str(value)


def json_artifacts(value: Any) -> Any:
    """Artifacts as the store keeps them: JSON data (dataclasses and pydantic models dumped, others ``str``)."""
    return None if value is None else json.loads(json.dumps(value, default=_jsonable))


def _check_id(session_id: str) -> str:
    if not isinstance(session_id, str) or not session_id:
        raise ValueError(f"a session id is a non-empty string, got {session_id!r}; new_session_id() makes one")
    return session_id


class SQLiteStore:
    """MOSS conversations in one SQLite file, shared safely by threads and processes.

    Example:
        .. code-block:: python

            store = SQLiteStore("chats.db")
            store.append_turn("alice", MossTurn("Hi", "Hello!"))
            store.load("alice").turns

    Args:
        path: The database file (created with its folder when missing).
        timeout: Seconds a writer waits for another process's transaction before failing.
        synchronous: ``FULL`` syncs every commit to disk (survives power loss); ``NORMAL`` survives a process
            crash but may lose the last commits on power loss, and is faster.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        timeout: float = 30.0,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
    ) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self.synchronous = synchronous
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        self._inherited: list[sqlite3.Connection] = []
        with self._lock:
            self._connection()  # fail early on a bad path or a newer schema

    # ------------------------------------------------------------------ connection

    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        if self._conn is not None:
            # A connection must not cross fork(); keep the parent's object alive so that closing it here
            # cannot touch the parent's locks, and open our own.
            self._inherited.append(self._conn)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        conn.execute("PRAGMA foreign_keys = ON")
        self._conn, self._pid = conn, os.getpid()
        try:
            self._migrate()
        except BaseException:
            self._conn = None
            conn.close()
            raise
        return conn

    def _migrate(self) -> None:
        with self._write() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            (version,) = db.execute("SELECT MAX(version) FROM schema_version").fetchone()
            if version is None:
                # Statement by statement: executescript() would commit our transaction.
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            if version is None or version <= SCHEMA_VERSION:
                db.execute(_TITLES)
            if version is not None and version > SCHEMA_VERSION:
                raise SchemaVersionError(
                    f"{self.path} has schema version {version}, newer than this moss-agent's "
                    f"{SCHEMA_VERSION}: upgrade moss-agent to open it"
                )

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; ``BEGIN IMMEDIATE`` takes the write lock at once, so indexes never race."""
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: a consistent snapshot across several queries."""
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")

    def close(self) -> None:
        """Close the connection (a later call opens a new one)."""
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ writing

    @staticmethod
    def _ensure(db: sqlite3.Connection, session_id: str, system: str | None, now: float) -> None:
        db.execute(
            "INSERT INTO sessions (session_id, system, created_at, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(session_id) DO NOTHING",
            (session_id, system, now, now),
        )

    def create_session(self, session_id: str | None = None, *, system: str | None = None) -> str:
        """Create a session if it does not exist yet (an existing one is left as it is).

        Args:
            session_id: The id; a fresh random one when omitted.
            system: The system text of a new session.

        Returns:
            The session id.
        """
        session_id = _check_id(session_id) if session_id is not None else new_session_id()
        with self._write() as db:
            self._ensure(db, session_id, system, time.time())
        return session_id

    def set_system(self, session_id: str, system: str | None) -> None:
        """Set a session's system text (meta instruction and switches), creating the session if needed."""
        now = time.time()
        with self._write() as db:
            self._ensure(db, _check_id(session_id), system, now)
            db.execute(
                "UPDATE sessions SET system = ?, updated_at = ? WHERE session_id = ?",
                (system, now, session_id),
            )

    def append_turn(self, session_id: str, turn: fmt.MossTurn, artifacts: Any = None) -> int:
        """Append one turn in one transaction, creating the session if needed.

        Args:
            session_id: The session.
            turn: The turn.
            artifacts: JSON-serialisable data of the turn (dataclasses and pydantic models are dumped, other
                objects stored as their ``str``), or None.

        Returns:
            The turn's index in the session (0 for the first).
        """
        return self.append_turns(session_id, [TurnRecord(turn, artifacts)])[0]

    def append_turns(
        self,
        session_id: str,
        records: Sequence[TurnRecord],
        *,
        pending: str | EllipsisType | None = ...,
        system: str | EllipsisType | None = ...,
    ) -> list[int]:
        """Append several turns (and optionally set the pending or system text) in one transaction.

        Args:
            session_id: The session, created if needed.
            records: The turns and their artifacts.
            pending: New pending text for the chat-history adapter; ``...`` leaves it unchanged.
            system: New system text; ``...`` leaves it unchanged.

        Returns:
            The indexes the turns got.
        """
        now = time.time()
        rows = []
        for record in records:
            t = record.turn
            data = None if record.artifacts is None else json.dumps(record.artifacts, default=_jsonable)
            rows.append((t.human, t.inner_thoughts, t.commands, t.results, t.reply, data))
        with self._write() as db:
            self._ensure(db, _check_id(session_id), None, now)
            (last,) = db.execute("SELECT MAX(idx) FROM turns WHERE session_id = ?", (session_id,)).fetchone()
            start = 0 if last is None else last + 1
            db.executemany(
                "INSERT INTO turns (session_id, idx, human, inner_thoughts, commands, results, reply, "
                "artifacts, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(session_id, start + i, *row, now) for i, row in enumerate(rows)],
            )
            db.execute("UPDATE sessions SET updated_at = ? WHERE session_id = ?", (now, session_id))
            if pending is not ...:
                db.execute("UPDATE sessions SET pending = ? WHERE session_id = ?", (pending, session_id))
            if system is not ...:
                db.execute("UPDATE sessions SET system = ? WHERE session_id = ?", (system, session_id))
        return list(range(start, start + len(rows)))

    def clear_turns(self, session_id: str) -> None:
        """Delete a session's turns and pending text, keeping the session and its system text."""
        with self._write() as db:
            db.execute("DELETE FROM turns WHERE session_id = ?", (session_id,))
            db.execute(
                "UPDATE sessions SET pending = NULL, updated_at = ? WHERE session_id = ?",
                (time.time(), session_id),
            )

    def delete(self, session_id: str) -> bool:
        """Delete a session and its turns; True when it existed."""
        with self._write() as db:
            db.execute("DELETE FROM turns WHERE session_id = ?", (session_id,))
            return db.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,)).rowcount > 0

    def set_title(self, session_id: str, title: str | None) -> bool:
        """Name a session (None: no name); False when there is no such session."""
        with self._write() as db:
            if db.execute("SELECT 1 FROM sessions WHERE session_id = ?", (session_id,)).fetchone() is None:
                return False
            db.execute("DELETE FROM session_titles WHERE session_id = ?", (session_id,))
            if title:
                db.execute("INSERT INTO session_titles (session_id, title) VALUES (?, ?)", (session_id, title))
            return True

    def pop_turn(self, session_id: str) -> TurnRecord | None:
        """Remove a session's last turn and return it (None when it has none), in one transaction."""
        with self._write() as db:
            row = db.execute(
                "SELECT idx, human, inner_thoughts, commands, results, reply, artifacts, created_at FROM turns "
                "WHERE session_id = ? ORDER BY idx DESC LIMIT 1",
                (session_id,),
            ).fetchone()
            if row is None:
                return None
            db.execute("DELETE FROM turns WHERE session_id = ? AND idx = ?", (session_id, row[0]))
        _, h, it, c, res, r, a, at = row
        turn = fmt.MossTurn(human=h, reply=r, inner_thoughts=it, commands=c, results=res)
        return TurnRecord(turn, None if a is None else json.loads(a), at)

    # ------------------------------------------------------------------ reading

    def load(self, session_id: str) -> StoredSession | None:
        """A session with all its committed turns, or None when there is no such session."""
        with self._read() as db:
            head = db.execute(
                "SELECT system, pending, created_at, updated_at FROM sessions WHERE session_id = ?",
                (session_id,),
            ).fetchone()
            if head is None:
                return None
            rows = db.execute(
                "SELECT human, inner_thoughts, commands, results, reply, artifacts, created_at FROM turns "
                "WHERE session_id = ? ORDER BY idx",
                (session_id,),
            ).fetchall()
        records = [
            TurnRecord(
                fmt.MossTurn(human=h, reply=r, inner_thoughts=it, commands=c, results=res),
                None if a is None else json.loads(a),
                at,
            )
            for h, it, c, res, r, a, at in rows
        ]
        return StoredSession(session_id, head[0], records, head[1], head[2], head[3])

    def list_sessions(self) -> list[SessionInfo]:
        """All sessions, most recently updated first."""
        with self._read() as db:
            rows = db.execute(
                "SELECT s.session_id, s.created_at, s.updated_at, COUNT(t.idx), n.title FROM sessions s "
                "LEFT JOIN turns t ON t.session_id = s.session_id "
                "LEFT JOIN session_titles n ON n.session_id = s.session_id GROUP BY s.session_id "
                "ORDER BY s.updated_at DESC, s.session_id"
            ).fetchall()
        return [SessionInfo(*row) for row in rows]

    def schema_version(self) -> int:
        """The schema version of the database file."""
        with self._read() as db:
            return int(db.execute("SELECT MAX(version) FROM schema_version").fetchone()[0])
