"""Run a server app on loopback in a background thread, for tests (ours and users').

``python -m moss_agent.server.testing --db FILE --port-file FILE [--delay S]`` serves the rule-based engine
(``delay`` seconds per streamed token) in a process of its own, for tests that kill a server mid-turn.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["running_server", "serve_scripted"]


@contextmanager
def running_server(app: Any, *, host: str = "127.0.0.1", startup_timeout: float = 20.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free port of ``host`` until the block ends.

    The socket is bound here (port 0) and handed to uvicorn, so no other process can take the port between
    choosing and binding it.

    Yields:
        The base URL, e.g. ``http://127.0.0.1:41234``.

    Raises:
        RuntimeError: When the server does not start within ``startup_timeout`` seconds.
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the test server on {host}:{port} did not start")
            time.sleep(0.01)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def serve_scripted(db: str, port_file: str, delay: float = 0.0) -> None:
    """Serve the rule-based engine with the calculator on a free loopback port, written to ``port_file``."""
    import uvicorn

    from moss_agent.engines.base import Delta, SamplingParams
    from moss_agent.server import ServerSettings, create_app
    from moss_agent.testing.scripted_rules import RuleBasedEngine
    from moss_agent.tools import make_tools

    class SlowEngine(RuleBasedEngine):
        def stream(self, prompt: str, params: SamplingParams) -> Iterator[Delta]:
            for delta in super().stream(prompt, params):
                time.sleep(delay)
                yield delta

    app = create_app(SlowEngine(), tools=make_tools(["calculator"]), store=db, settings=ServerSettings())
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Timer(0.0, lambda: _announce(server, port_file, sock.getsockname()[1])).start()
    server.run(sockets=[sock])


def _announce(server: Any, port_file: str, port: int) -> None:
    while not server.started:
        time.sleep(0.01)
    with open(port_file + ".tmp", "w", encoding="utf-8") as out:
        out.write(str(port))
    os.replace(port_file + ".tmp", port_file)  # the port appears whole, once the server answers


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="serve the rule-based engine for tests")
    parser.add_argument("--db", required=True)
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    options = parser.parse_args()
    serve_scripted(options.db, options.port_file, options.delay)
