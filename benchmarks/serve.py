"""serve_concurrent_speedup_8: tokens/s of 8 concurrent chat clients over the same 8 one at a time, on loopback.

``serve_concurrent(quick)`` builds a random CodeGen model in the MOSS layout (no download), serves it with
``create_app`` on 127.0.0.1 and sends 8 requests (each its own conversation, greedy, plain chat) first one
at a time, then all at once, interleaved over a few rounds. The figure is the ratio of completion tokens per
second; p50/p95 are the latencies of the concurrent requests. Greedy replies must be equal both ways.
``soak(n)`` sends ``n`` mixed requests and counts the answers by status class.

Run alone: ``python -m benchmarks.serve [--quick] [--soak N] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from moss_agent.checkpoints.files import write_json

__all__ = ["serve_concurrent", "soak"]

CLIENTS = 8


def _model(quick: bool) -> Any:
    from moss_agent.engines.transformers import TransformersEngine
    from moss_agent.testing.checkpoints import tiny_moss_checkpoint

    size = dict(n_layer=4, n_embd=256, n_head=4, rotary_dim=32) if quick else dict(n_layer=8, n_embd=512, n_head=8)
    path = tiny_moss_checkpoint(dtype="float32", shards=1, **size)  # type: ignore[arg-type]
    return TransformersEngine.from_pretrained(str(path), precision="fp32")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def serve_concurrent(quick: bool = False, *, threads: int = 1) -> dict[str, Any]:
    """The concurrent-serving figures (see the module docstring; figures from the CPU the run finds).

    Args:
        quick: The smaller model and fewer tokens and rounds.
        threads: torch threads (1: on a shared machine more threads spin against each other).

    Returns:
        ``serve_concurrent_speedup_8`` (tokens/s ratio), ``p50_ms`` and ``p95_ms`` (concurrent latencies),
        ``sequential_p50_ms``, tokens per second both ways, rows per decode step while concurrent
        (``concurrent_mean_batch``) and the settings.
    """
    import httpx
    import torch

    from moss_agent.server import ServerSettings, create_app
    from moss_agent.server.testing import running_server

    torch.set_num_threads(threads)
    new_tokens, rounds = (24, 2) if quick else (48, 3)
    engine = _model(quick)
    with TemporaryDirectory() as folder:
        settings = ServerSettings(max_tokens_limit=new_tokens, request_timeout_s=600, max_batch=CLIENTS)
        app = create_app(engine, store=Path(folder) / "bench.sqlite3", settings=settings)
        with running_server(app) as url, httpx.Client(base_url=url, timeout=600) as http:

            def ask(i: int, tag: str) -> tuple[float, int, str]:
                body = {
                    "model": "moss",
                    "messages": [{"role": "user", "content": f"Question {i} of {tag}: tell me about number {i * 7}"}],
                    "max_tokens": new_tokens,
                    "temperature": 0,
                    "plugins": [],
                }
                started = time.perf_counter()
                reply = http.post("/v1/chat/completions", json=body)
                reply.raise_for_status()
                data = reply.json()
                content = data["choices"][0]["message"]["content"]
                return time.perf_counter() - started, data["usage"]["completion_tokens"], content

            ask(0, "warm-up")
            seq_rates, con_rates, con_lat, seq_lat = [], [], [], []
            stats = app.state.service.engine().stats
            steps = row_steps = 0
            for r in range(rounds):
                started = time.perf_counter()
                one_by_one = [ask(i, f"round {r}") for i in range(CLIENTS)]
                seq_rates.append(sum(t for _, t, _ in one_by_one) / (time.perf_counter() - started))
                seq_lat += [s for s, _, _ in one_by_one]
                started = time.perf_counter()
                before = (stats.steps, stats.row_steps)
                with ThreadPoolExecutor(CLIENTS) as pool:
                    together = list(pool.map(lambda i, r=r: ask(i, f"round {r}"), range(CLIENTS)))
                con_rates.append(sum(t for _, t, _ in together) / (time.perf_counter() - started))
                steps, row_steps = steps + stats.steps - before[0], row_steps + stats.row_steps - before[1]
                con_lat += [s for s, _, _ in together]
                if [c for _, _, c in one_by_one] != [c for _, _, c in together]:
                    raise AssertionError("greedy replies differ between one at a time and concurrent")
    seq, con = statistics.median(seq_rates), statistics.median(con_rates)
    return {
        "serve_concurrent_speedup_8": round(con / seq, 2),
        "p50_ms": round(_percentile(con_lat, 0.5) * 1000, 1),
        "p95_ms": round(_percentile(con_lat, 0.95) * 1000, 1),
        "sequential_p50_ms": round(_percentile(seq_lat, 0.5) * 1000, 1),
        "sequential_tokens_per_s": round(seq, 1),
        "concurrent_tokens_per_s": round(con, 1),
        "concurrent_mean_batch": round(row_steps / max(steps, 1), 2),
        "clients": CLIENTS,
        "new_tokens": new_tokens,
        "rounds": rounds,
        "torch_threads": threads,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def soak(n: int = 500, *, clients: int = 8, seed: int = 0) -> dict[str, Any]:
    """``n`` mixed requests on loopback against a rule-based model with the calculator; answers by status.

    The mix: plain and calculator turns, streamed and not, continued conversations, listing, reading and
    deleting conversations, bad JSON, wrong content types, foreign hosts and origins, unknown ids, oversized
    bodies, clients that drop their connection, over-long histories, bad sampling values.
    """
    import httpx

    from moss_agent.server import ServerSettings, create_app
    from moss_agent.server.testing import running_server
    from moss_agent.testing.scripted_rules import RuleBasedEngine
    from moss_agent.tools import make_tools

    rng = random.Random(seed)
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    with TemporaryDirectory() as folder:
        settings = ServerSettings(
            api_key="soak-key",
            max_request_bytes=100_000,
            max_history_messages=200,
            request_timeout_s=120,
            max_queue=256,
        )
        app = create_app(
            RuleBasedEngine(), tools=make_tools(["calculator"]), store=Path(folder) / "s.sqlite3", settings=settings
        )
        with running_server(app) as url:
            auth = {"Authorization": "Bearer soak-key"}

            def chat(body: dict[str, Any], **extra: Any) -> httpx.Response:
                with httpx.Client(base_url=url, timeout=120, headers=auth) as http:
                    return http.post("/v1/chat/completions", json={"model": "m", **body}, **extra)

            def one(i: int) -> str:
                kind = rng.choice(_KINDS)
                status: int | str
                try:
                    status = _KIND_RUN[kind](i, url, auth, chat)
                except httpx.TimeoutException:
                    status = "timeout"
                except httpx.TransportError:
                    status = "dropped"  # the requests that drop their own connection
                with lock:
                    counts[f"{kind}:{status}"] += 1
                return str(status)

            started = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                statuses = list(pool.map(one, range(n)))
            wall = time.perf_counter() - started
            with httpx.Client(base_url=url, timeout=30) as http:
                health = http.get("/health").json()
        with sqlite3.connect(Path(folder) / "s.sqlite3") as db:
            integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
    classes = Counter(s[0] + "xx" if s[:1].isdigit() else s for s in statuses)
    return {
        "requests": n,
        "by_class": dict(classes),
        "server_errors_5xx": classes.get("5xx", 0),
        "by_kind": dict(sorted(counts.items())),
        "wall_s": round(wall, 1),
        "health_after": health["status"],
        "integrity": integrity,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def _turn(i: int, url: str, auth: dict[str, str], chat: Callable[..., Any]) -> int:
    text = f'Please calculate "{i}*3+1"' if i % 2 else f"Hello number {i}"
    return int(chat({"messages": [{"role": "user", "content": text}], "conversation_id": f"soak-{i % 13}"}).status_code)


def _stream(i: int, url: str, auth: dict[str, str], chat: Callable[..., Any]) -> int:
    import httpx

    body = {"model": "m", "messages": [{"role": "user", "content": f"Stream {i}"}], "stream": True}
    with httpx.Client(base_url=url, timeout=120, headers=auth) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as reply:
            text = "".join(reply.iter_text())
            if reply.status_code == 200 and '"type": "error"' not in text and "[DONE]" not in text:
                return 599  # a stream that ended without its end marker counts as a server error
            return int(reply.status_code)


def _drop(i: int, url: str, auth: dict[str, str], chat: Callable[..., Any]) -> int:
    import httpx

    body = {"model": "m", "messages": [{"role": "user", "content": f"Drop {i}"}]}
    with httpx.Client(base_url=url, timeout=0.01, headers=auth) as http:
        return int(http.post("/v1/chat/completions", json=body).status_code)


def _list(i: int, url: str, auth: dict[str, str], chat: Callable[..., Any]) -> int:
    import httpx

    with httpx.Client(base_url=url, timeout=60, headers=auth) as http:
        path = rng_path(i)
        reply = http.delete(path) if i % 5 == 0 and path != "/v1/conversations" else http.get(path)
        return int(reply.status_code)


def rng_path(i: int) -> str:
    """A conversation route: the list, a soak conversation, or an id nobody has."""
    return ["/v1/conversations", f"/v1/conversations/soak-{i % 13}", "/v1/conversations/nobody-has-this"][i % 3]


def _hostile(i: int, url: str, auth: dict[str, str], chat: Callable[..., Any]) -> int:
    import httpx

    with httpx.Client(base_url=url, timeout=60, headers=auth) as http:
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        cases: list[tuple[str, dict[str, str], str]] = [
            ("/v1/chat/completions", {"Content-Type": "text/plain"}, body),
            ("/v1/chat/completions", {"Content-Type": "application/json", "Host": "evil.example"}, body),
            ("/v1/chat/completions", {"Content-Type": "application/json", "Origin": "http://evil.example"}, body),
            ("/v1/chat/completions", {"Content-Type": "application/json"}, "{not json"),
            ("/v1/chat/completions", {"Content-Type": "application/json"}, "x" * 150_000),
            ("/v1/chat/completions", {"Content-Type": "application/json"}, body.replace('"m"', '"m", "seed": -1')),
            ("/v1/chat/completions", {"Content-Type": "application/json"}, body.replace('"m"', '"m", "top_p": 0')),
        ]
        path, headers, content = cases[i % len(cases)]
        return int(http.post(path, headers=headers, content=content).status_code)


def _history(i: int, url: str, auth: dict[str, str], chat: Callable[..., Any]) -> int:
    pairs = 3 if i % 2 else 400  # the second is over the history bound: refused, nothing stored
    messages: list[dict[str, str]] = []
    for k in range(pairs):
        messages += [{"role": "user", "content": f"q{k}"}, {"role": "assistant", "content": f"a{k}"}]
    messages.append({"role": "user", "content": "and now?"})
    return int(chat({"messages": messages, "temperature": 1e-37}).status_code)


_KIND_RUN: dict[str, Callable[..., int]] = {
    "turn": _turn,
    "stream": _stream,
    "drop": _drop,
    "conversations": _list,
    "hostile": _hostile,
    "history": _history,
}
_KINDS = ["turn"] * 4 + ["stream"] * 2 + ["drop", "conversations", "hostile", "history"]


def main() -> None:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--soak", type=int, default=0, help="also run a soak of this many requests")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result: dict[str, Any] = {"serve": serve_concurrent(args.quick)}
    if args.soak:
        result["soak"] = soak(args.soak)
    print(json.dumps(result, indent=2))
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
