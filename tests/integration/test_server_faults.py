"""kill -9 in the middle of turns, streamed and not, then a restart on the same database.

No committed turn may be lost, no half turn may be visible, and SQLite's integrity check must pass.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.allow_hosts(["127.0.0.1"]), pytest.mark.timeout(180)]


def _start(db: Path, port_file: Path, delay: float) -> tuple[subprocess.Popen[bytes], str]:
    port_file.unlink(missing_ok=True)
    args = ["--db", str(db), "--port-file", str(port_file), "--delay", str(delay)]
    proc = subprocess.Popen([sys.executable, "-m", "moss_agent.server.testing", *args])
    deadline = time.monotonic() + 60
    while not port_file.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port_file.read_text()}"


def _ask(url: str, text: str, conversation: str) -> httpx.Response:
    body = {"model": "m", "messages": [{"role": "user", "content": text}], "conversation_id": conversation}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=60)


def _raw_post(url: str, body: dict[str, object]) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
    sock.sendall(f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_kill_9_mid_turn_loses_no_committed_turn_and_shows_no_half_turn(tmp_path: Path) -> None:
    db, port_file = tmp_path / "chats.sqlite3", tmp_path / "port"
    proc, url = _start(db, port_file, delay=0.05)
    try:
        for i in range(3):
            assert _ask(url, f'Please calculate "{i}*7"', "kept").status_code == 200
        long = "Tell me a long story " + "about rivers and mountains " * 5
        streamed = _raw_post(
            url,
            {"model": "m", "stream": True, "conversation_id": "kept", "messages": [{"role": "user", "content": long}]},
        )
        streamed.settimeout(30)
        received = b""
        # The scripted engine runs one generation at a time: once the streamed reply's text flows, that turn holds
        # the engine for its whole reply, so the plain turn sent now cannot finish before the kill (sent first, it
        # could take the engine and commit while the streamed turn waits).
        while not re.search(rb'"content": "[^"]', received):  # the first text of the reply
            received += streamed.recv(4096)
        plain = _raw_post(
            url, {"model": "m", "conversation_id": "half", "messages": [{"role": "user", "content": long * 8}]}
        )
        seen = received.count(b"data:")
        while received.count(b"data:") < seen + 4:  # the plain request is in, the streamed reply still flowing
            received += streamed.recv(4096)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        streamed.close()
        plain.close()
    finally:
        if proc.poll() is None:
            proc.kill()

    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = conn.execute("SELECT session_id, idx, human, reply FROM turns ORDER BY session_id, idx").fetchall()
    assert [(s, i) for s, i, _, _ in rows] == [("kept", 0), ("kept", 1), ("kept", 2)]  # no half turn
    assert all(reply.startswith("The result is: ") for *_, reply in rows)

    proc, url = _start(db, port_file, delay=0.0)
    try:
        stored = httpx.get(url + "/v1/conversations/kept", timeout=30).json()
        assert [t["human"] for t in stored["turns"]] == [f'Please calculate "{i}*7"' for i in range(3)]
        assert httpx.get(url + "/v1/conversations/half", timeout=30).status_code == 404
        again = _ask(url, 'Please calculate "3*7"', "kept")
        assert again.status_code == 200 and again.json()["choices"][0]["message"]["moss"]["turn_index"] == 3
    finally:
        proc.kill()
        proc.wait(timeout=30)
