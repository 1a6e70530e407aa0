"""Clients that go away, users that flood: cancellation, fairness, 429 with Retry-After."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from moss_agent.engines.base import Delta, SamplingParams
from moss_agent.memory.store import SQLiteStore
from moss_agent.server import ServerSettings, create_app
from moss_agent.server.testing import running_server
from moss_agent.server.users import KeyRing
from moss_agent.testing.scripted_rules import RuleBasedEngine

pytestmark = [pytest.mark.allow_hosts(["127.0.0.1"]), pytest.mark.timeout(120)]


class SlowEngine(RuleBasedEngine):
    """The rule-based engine, ``delay`` seconds per streamed token; counts started and finished streams.

    With a ``gate``, a stream waits for it to be set before its first token: the test decides when a running
    reply goes on, instead of racing it.
    """

    delay = 0.05  # a reply of 20 tokens takes a second

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.started = 0
        self.finished = 0
        self.tokens = 0
        self.order: list[str] = []
        self.gate: threading.Event | None = None

    def stream(self, prompt: str, params: SamplingParams) -> Iterator[Delta]:
        self.started += 1
        self.order.append(prompt.rsplit("<|Human|>: ", 1)[-1].split("<eoh>")[0])
        if self.gate is not None:
            assert self.gate.wait(60), "the test never opened the gate"
        for delta in super().stream(prompt, params):
            time.sleep(self.delay)
            self.tokens += 1
            yield delta
        self.finished += 1


@pytest.fixture
def slow(tmp_path: Path) -> Iterator[tuple[str, SlowEngine, SQLiteStore]]:
    engine = SlowEngine()
    store = SQLiteStore(tmp_path / "chats.sqlite3")
    app = create_app(engine, store=store, settings=ServerSettings(workers=1))
    with running_server(app) as url:
        yield url, engine, store


def _send_and_drop(url: str, text: str, stream: bool = False) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    message = {"role": "user", "content": text}
    body = json.dumps({"model": "m", "plugins": [], "stream": stream, "messages": [message]}).encode()
    sock = socket.create_connection((host, int(port)))
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock.sendall(head + body)
    return sock


def _wait(condition: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def _queued(url: str) -> int:
    """Requests the server holds (waiting or running), as /health says."""
    return int(httpx.get(url + "/health").json()["queue"])


# The rule-based engine echoes the question: a reply of 121 tokens, 6 s at 0.05 s a token. A turn that is not
# stopped (all of them) is plainly told from one stopped after a token or two, however slow the machine.
LONG = " and then" * 50
LONG_REPLY_TOKENS = 121


def test_dropped_non_streaming_requests_are_cancelled_queued_and_running(
    slow: tuple[str, SlowEngine, SQLiteStore],
) -> None:
    url, engine, store = slow
    engine.gate = threading.Event()  # the first reply waits, running, until the other requests are gone
    sockets = [_send_and_drop(url, f"Tell me a long story number {i}{LONG}") for i in range(8)]
    _wait(lambda: engine.started == 1 and _queued(url) == 8)  # one turn running, seven waiting
    for sock in sockets:
        sock.close()
    _wait(lambda: _queued(url) == 1)  # the seven waiting requests were dropped; the running one is held
    engine.gate.set()
    _wait(lambda: _queued(url) == 0)  # the running turn ended: stopped, or (not cancelled) at its reply's end
    assert engine.started == 1, engine.order  # the queued ones never ran
    assert engine.finished == 0 and engine.tokens < LONG_REPLY_TOKENS // 2, engine.tokens  # stopped mid-reply
    assert store.list_sessions() == []  # and nothing of a cancelled turn was stored
    ok = httpx.post(url + "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert ok.status_code == 200  # the server serves on


def test_a_dropped_stream_stops_generating_and_stores_nothing(slow: tuple[str, SlowEngine, SQLiteStore]) -> None:
    url, engine, store = slow
    sock = _send_and_drop(url, f"Tell me a long story about streams{LONG}", stream=True)
    sock.settimeout(30)
    assert b"data:" in sock.recv(4096)
    sock.close()
    _wait(lambda: _queued(url) == 0)  # the turn ended: stopped, or (not cancelled) at its reply's end
    assert engine.finished == 0 and engine.tokens < LONG_REPLY_TOKENS // 2, engine.tokens  # it stopped early
    assert store.list_sessions() == []


def test_one_user_cannot_starve_another_and_429_says_when_to_retry(tmp_path: Path) -> None:
    (tmp_path / "keys").write_text("alice alice-key-0123456789\nbob bob-key-01234567890\n", encoding="utf-8")
    (tmp_path / "keys").chmod(0o600)
    ring = KeyRing.from_file(tmp_path / "keys")
    engine = SlowEngine()
    engine.gate = threading.Event()  # alice's first job holds the model until every request is in
    settings = ServerSettings(keys=ring, workers=1, max_queue=16, max_queue_per_user=5)
    app = create_app(engine, store=SQLiteStore(tmp_path / "s.sqlite3"), settings=settings)
    done: dict[str, float] = {}
    statuses: list[int] = []

    def ask(key: str, text: str) -> None:
        body = {"model": "m", "plugins": [], "messages": [{"role": "user", "content": text}]}
        reply = httpx.post(
            url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60
        )
        statuses.append(reply.status_code)
        if reply.status_code == 429:
            retry = reply.headers.get("retry-after")
            assert retry is not None and retry.isdigit() and 1 <= int(retry) <= 120
            done[text] = -1
        else:
            done[text] = time.monotonic()

    with running_server(app) as url:
        flood = [threading.Thread(target=ask, args=("alice-key-0123456789", f"alice {i}")) for i in range(7)]
        for thread in flood:
            thread.start()
        # Alice's first job runs (held), four more of hers wait, and the two over her share were refused at once.
        _wait(lambda: len(engine.order) == 1 and app.state.queue.pending == 5 and statuses.count(429) == 2)
        bob = threading.Thread(target=ask, args=("bob-key-01234567890", "bob 0"))
        bob.start()
        _wait(lambda: app.state.queue.pending == 6)  # bob's request waits behind alice's four
        engine.gate.set()
        for thread in [*flood, bob]:
            thread.join()
    assert statuses.count(429) == 2  # alice may hold 5 requests; her 6th and 7th were refused
    assert done["bob 0"] > 0
    served = [t for t in engine.order if t.startswith(("alice", "bob"))]
    assert served.index("bob 0") == 1, served  # bob waited only for the job that was running
