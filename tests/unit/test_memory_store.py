"""SQLiteStore: persistence, schema, crash safety and concurrency (threads and processes)."""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from moss_agent.memory.store import (
    SCHEMA_VERSION,
    SchemaVersionError,
    SQLiteStore,
    TurnRecord,
    new_session_id,
)
from moss_agent.protocol import format as fmt

MOSS_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "moss_data"

# Shared by the test process and its children: turn i of a writer, big enough that a write spans many pages.
MAKE_TURN = textwrap.dedent(
    """
    from moss_agent.protocol.format import MossTurn

    def make_turn(writer, i, size=2000):
        body = "\\n" + f'Search("{writer} {i}") =>\\n<|1|>: ' + repr(f"{writer}-{i}-" * size) + "\\n"
        return MossTurn(
            human=f"{writer} asks {i}",
            reply=f"{writer} answers {i}",
            inner_thoughts=f"{writer} thinks {i}",
            commands=f'Search("{writer} {i}")',
            results=body,
        )
    """
)
_ns: dict = {}
exec(MAKE_TURN, _ns)
make_turn = _ns["make_turn"]


def _child(tmp_path: Path, body: str, *args: str) -> subprocess.Popen[str]:
    script = tmp_path / f"child_{random.randrange(10**9)}.py"
    script.write_text(
        "import sys, time, os\nfrom moss_agent.memory.store import SQLiteStore\n" + MAKE_TURN + textwrap.dedent(body)
    )
    return subprocess.Popen(
        [sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@dataclasses.dataclass
class Artifact:
    path: str
    score: float


def test_round_trip_with_artifacts_and_timestamps(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "sub" / "chat.db")
    system = fmt.system_prompt(["Search"])
    sid = store.create_session("alice", system=system)
    before = time.time()
    turns = [make_turn("alice", i, size=3) for i in range(3)]
    artifacts = [
        None,
        {"images": ["/tmp/a.png"], "sources": [{"title": "t", "url": "u"}]},
        [Artifact("x", 0.5)],
    ]
    assert [store.append_turn(sid, t, a) for t, a in zip(turns, artifacts, strict=True)] == [0, 1, 2]

    saved = SQLiteStore(tmp_path / "sub" / "chat.db").load("alice")  # a fresh connection: a restart
    assert saved is not None
    assert saved.system == system
    assert saved.turns == turns
    assert [r.artifacts for r in saved.records] == [None, artifacts[1], [{"path": "x", "score": 0.5}]]
    assert saved.created_at <= before <= saved.records[0].created_at <= saved.updated_at
    assert saved.to_conversation().to_text() == system + "".join(t.to_text() for t in turns)
    assert store.load("nobody") is None


def test_sessions_list_clear_and_delete(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "chat.db")
    store.append_turn("a", make_turn("a", 0, 1))
    store.append_turn("b", make_turn("b", 0, 1))
    store.append_turn("b", make_turn("b", 1, 1))
    store.create_session("c", system="S\n")
    infos = store.list_sessions()
    assert [(i.session_id, i.num_turns) for i in infos] == [("c", 0), ("b", 2), ("a", 1)]
    assert all(i.created_at <= i.updated_at for i in infos)

    store.append_turn("a", make_turn("a", 1, 1))  # touching a session moves it to the front
    assert store.list_sessions()[0].session_id == "a"

    store.clear_turns("c")
    store.set_system("b", "B\n")
    store.clear_turns("b")
    saved = store.load("b")
    assert saved is not None and saved.turns == [] and saved.system == "B\n"
    assert store.append_turn("b", make_turn("b", 9, 1)) == 0

    assert store.delete("a") is True
    assert store.delete("a") is False
    assert store.load("a") is None
    assert {i.session_id for i in store.list_sessions()} == {"b", "c"}
    with sqlite3.connect(tmp_path / "chat.db") as db:
        assert db.execute("SELECT COUNT(*) FROM turns WHERE session_id = 'a'").fetchone() == (0,)


def test_append_turns_sets_pending_and_system_atomically(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "chat.db")
    store.append_turns("s", [], pending="P", system="S\n")
    saved = store.load("s")
    assert saved is not None and (saved.pending, saved.system, saved.turns) == ("P", "S\n", [])
    store.append_turns("s", [TurnRecord(make_turn("s", 0, 1))])  # ... leaves both unchanged
    saved = store.load("s")
    assert saved is not None and (saved.pending, saved.system, len(saved.turns)) == ("P", "S\n", 1)
    with pytest.raises(sqlite3.IntegrityError):  # a failing transaction leaves nothing behind
        store.append_turns("s", [TurnRecord(fmt.MossTurn(None, "x"))], pending=None)  # type: ignore[arg-type]
    saved = store.load("s")
    assert saved is not None and (saved.pending, len(saved.turns)) == ("P", 1)


def test_session_ids_are_checked(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "chat.db")
    with pytest.raises(ValueError, match="non-empty string"):
        store.append_turn("", make_turn("x", 0, 1))
    assert len({new_session_id() for _ in range(100)}) == 100
    assert store.create_session() != store.create_session()


def test_wal_mode_and_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "chat.db"
    store = SQLiteStore(path)
    assert store.schema_version() == SCHEMA_VERSION
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION + 1,))
    with pytest.raises(SchemaVersionError, match="upgrade moss-agent"):
        SQLiteStore(path)


@pytest.mark.skipif(not MOSS_DATA.is_dir(), reason="../shared/moss_data (the MOSS sample SFT data) is absent")
def test_every_sample_conversation_survives_the_store_byte_for_byte(tmp_path: Path) -> None:
    from moss_agent.protocol.data import iter_conversations

    store = SQLiteStore(tmp_path / "data.db", synchronous="NORMAL")
    conversations = list(iter_conversations(MOSS_DATA / "conversations"))
    assert len(conversations) > 800
    for i, conv in enumerate(conversations):
        store.append_turns(str(i), [TurnRecord(t) for t in conv.turns], system=conv.system)
    for i, conv in enumerate(conversations):
        saved = store.load(str(i))
        assert saved is not None and saved.to_conversation().to_text() == conv.to_text()


def test_threads_writing_their_own_sessions_do_not_mix(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "chat.db", synchronous="NORMAL")
    writers, per_writer = [f"t{k}" for k in range(6)], 15
    errors: list[BaseException] = []
    start = threading.Barrier(len(writers))

    def write(writer: str) -> None:
        try:
            start.wait()
            for i in range(per_writer):
                store.append_turn(writer, make_turn(writer, i, 5), {"i": i})
                store.append_turn("shared", make_turn(writer, i, 5))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=write, args=(w,)) for w in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for writer in writers:
        saved = store.load(writer)
        assert saved is not None
        assert saved.turns == [make_turn(writer, i, 5) for i in range(per_writer)]
        assert [r.artifacts for r in saved.records] == [{"i": i} for i in range(per_writer)]
    shared = store.load("shared")
    assert shared is not None and len(shared.turns) == len(writers) * per_writer
    for writer in writers:  # each writer's turns in its own order, interleaved with the others'
        assert [t for t in shared.turns if t.human.startswith(writer + " ")] == [
            make_turn(writer, i, 5) for i in range(per_writer)
        ]


def test_two_processes_writing_at_once_do_not_mix(tmp_path: Path) -> None:
    db, go, n = tmp_path / "chat.db", tmp_path / "go", 30
    SQLiteStore(db)  # create the schema once
    body = """
        store = SQLiteStore(sys.argv[1])
        writer, go, n = sys.argv[2], sys.argv[3], int(sys.argv[4])
        print("ready", flush=True)
        while not os.path.exists(go):
            time.sleep(0.002)
        for i in range(n):
            store.append_turn(writer, make_turn(writer, i, 200))
            store.append_turn("shared", make_turn(writer, i, 200))
        print("done", flush=True)
    """
    children = [_child(tmp_path, body, str(db), w, str(go), str(n)) for w in ("p1", "p2")]
    for child in children:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
    go.touch()
    for child in children:
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        assert out == "done\n"
    store = SQLiteStore(db)
    shared = store.load("shared")
    assert shared is not None and len(shared.turns) == 2 * n
    for writer in ("p1", "p2"):
        saved = store.load(writer)
        assert saved is not None and saved.turns == [make_turn(writer, i, 200) for i in range(n)]
        assert [t for t in shared.turns if t.human.startswith(writer + " ")] == saved.turns


def test_sigkill_inside_a_transaction_loses_only_the_open_turn(tmp_path: Path) -> None:
    db = tmp_path / "chat.db"
    # A small page cache makes SQLite spill the open turn's uncommitted pages into the WAL before the kill.
    body = """
        store = SQLiteStore(sys.argv[1])
        for i in range(3):
            store.append_turn("s", make_turn("w", i))
            print("committed", i, flush=True)

        def stop_inside(sql):
            if sql.startswith("UPDATE sessions SET updated_at"):
                print("inside", flush=True)
                time.sleep(60)

        store._connection().execute("PRAGMA cache_size = 20")
        store._connection().set_trace_callback(stop_inside)
        store.append_turn("s", make_turn("w", 3, size=100_000))
    """
    child = _child(tmp_path, body, str(db))
    assert child.stdout is not None
    lines = [child.stdout.readline() for _ in range(4)]
    assert lines == ["committed 0\n", "committed 1\n", "committed 2\n", "inside\n"]
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL
    assert (tmp_path / "chat.db-wal").stat().st_size > 300_000  # the open turn had reached the WAL

    store = SQLiteStore(db)
    saved = store.load("s")
    assert saved is not None and saved.turns == [make_turn("w", i) for i in range(3)]
    assert store.append_turn("s", make_turn("w", 3)) == 3  # the file is not left locked


def test_sigkill_at_a_random_moment_keeps_every_committed_turn_whole(tmp_path: Path) -> None:
    db = tmp_path / "chat.db"
    body = """
        store = SQLiteStore(sys.argv[1])
        i = 0
        while True:
            store.append_turn("s", make_turn(sys.argv[2], i, size=20_000))
            print(i, flush=True)
            i += 1
    """
    rng = random.Random(5)
    expected: list[fmt.MossTurn] = []
    for run in ("r1", "r2"):  # the second run appends to what the killed first one left
        child = _child(tmp_path, body, str(db), run)
        assert child.stdout is not None
        reported = [int(child.stdout.readline()) for _ in range(3)]
        time.sleep(rng.uniform(0, 0.05))
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
        saved = SQLiteStore(db).load("s")
        assert saved is not None
        mine = saved.turns[len(expected) :]
        assert len(mine) >= reported[-1] + 1
        expected += [make_turn(run, i, size=20_000) for i in range(len(mine))]
        assert saved.turns == expected
