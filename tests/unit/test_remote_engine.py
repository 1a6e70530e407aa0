"""RemoteEngine against a small fake OpenAI-compatible server on 127.0.0.1 (stdlib http.server, in a thread)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from moss_agent.chat_model import ChatMoss
from moss_agent.checkpoints.loading import load_tokenizer
from moss_agent.engines.base import ContextWindowExceededError, SamplingParams
from moss_agent.engines.remote import RemoteEngine, ServerResponseError, ServerUnavailableError
from moss_agent.testing.checkpoints import tiny_moss_tokenizer_dir

PASS1 = SamplingParams(stop_tokens=("<eoc>", "<eom>"), do_sample=False, temperature=0.0)
REPLY = SamplingParams(stop_tokens=("<eom>",))


@dataclass
class Reply:
    """One scripted answer: an SSE stream of ``chunks`` (dicts or raw lines), or a plain body."""

    chunks: list[Any] = field(default_factory=list)
    status: int = 200
    body: str | None = None
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


def chunk(text: str = "", finish: str | None = None, **extra: Any) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "text": text, "finish_reason": finish}
    choice.update({k: v for k, v in extra.items() if k == "stop_reason"})
    data: dict[str, Any] = {"object": "text_completion", "model": "served-moss", "choices": [choice]}
    if "usage" in extra:
        data["usage"] = extra["usage"]
    return data


def completion(*pieces: str, finish: str = "stop", usage: dict[str, Any] | None = None, **extra: Any) -> Reply:
    chunks: list[Any] = [chunk(p) for p in pieces]
    chunks.append(chunk("", finish, usage=usage or {"prompt_tokens": 7, "completion_tokens": 5}, **extra))
    return Reply(chunks)


class _Quiet(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up (the timeout test) leaves a broken pipe behind: expected


class FakeServer:
    """Answers ``/v1/completions`` and ``/v1/models`` from a queue of scripted replies; records requests."""

    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._answer(Reply(body=json.dumps({"data": [{"id": "served-moss"}, {"id": "other"}]})))

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                server.requests.append(json.loads(self.rfile.read(length)))
                server.headers.append(dict(self.headers))
                self._answer(server.replies.pop(0))

            def _answer(self, reply: Reply) -> None:
                time.sleep(reply.delay)
                if reply.body is not None or not reply.chunks:
                    data = (reply.body or "").encode()
                    self.send_response(reply.status)
                    self.send_header("content-type", reply.content_type)
                    self.send_header("content-length", str(len(data)))
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                    return
                self.send_response(reply.status)
                self.send_header("content-type", "text/event-stream")
                self.send_header("connection", "close")
                self.end_headers()
                for item in reply.chunks:
                    line = item if isinstance(item, str) else f"data: {json.dumps(item)}"
                    self.wfile.write(f"{line}\n\n".encode())
                    self.wfile.flush()
                self.close_connection = True

        self.httpd = _Quiet(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    server = FakeServer()
    yield server
    server.close()


def engine(fake: FakeServer, **kwargs: Any) -> RemoteEngine:
    kwargs.setdefault("backoff", 0.01)
    return RemoteEngine(fake.url, **kwargs)


@pytest.fixture(scope="module")
def tokenizer_dir() -> Path:
    return tiny_moss_tokenizer_dir()


# ---------------------------------------------------------------- requests


def test_base_url_gets_v1_only_when_it_has_no_path() -> None:
    assert RemoteEngine("http://h:8000").base_url == "http://h:8000/v1"
    assert RemoteEngine("http://h:8000/v1/").base_url == "http://h:8000/v1"
    assert RemoteEngine("https://h/openai/v1").base_url == "https://h/openai/v1"
    with pytest.raises(ValueError, match="http"):
        RemoteEngine("h:8000")
    with pytest.raises(ValueError, match="dialect"):
        RemoteEngine("http://h", dialect="tgi")  # type: ignore[arg-type]


def test_openai_dialect_sends_standard_fields_and_the_end_tokens_as_stop(fake: FakeServer) -> None:
    fake.replies += [completion("Hi"), completion("Hi")]
    remote = engine(fake, model="m", api_key="sk-test")
    remote.generate("<|Human|>: hi<eoh>\n<|MOSS|>:", REPLY.with_(stop=("\n\n",), seed=3))
    remote.generate("x", PASS1)
    sampled, greedy = fake.requests
    assert sampled["model"] == "m" and sampled["prompt"] == "<|Human|>: hi<eoh>\n<|MOSS|>:"
    assert sampled["stop"] == ["<eom>", "\n\n"]
    assert (sampled["temperature"], sampled["top_p"], sampled["seed"], sampled["max_tokens"]) == (0.7, 0.8, 3, 256)
    assert sampled["stream"] is True and sampled["stream_options"] == {"include_usage": True}
    assert "top_k" not in sampled and "repetition_penalty" not in sampled and "generation_config" not in sampled
    assert greedy["temperature"] == 0.0 and greedy["stop"] == ["<eoc>", "<eom>"] and "seed" not in greedy
    assert fake.headers[0]["Authorization"] == "Bearer sk-test"


def test_vllm_and_transformers_dialects_send_the_whole_sampling(fake: FakeServer) -> None:
    fake.replies += [completion("a"), completion("b")]
    engine(fake, dialect="vllm").generate("x", REPLY)
    engine(fake, dialect="transformers").generate("x", PASS1)
    vllm, hf = fake.requests
    assert (vllm["top_k"], vllm["repetition_penalty"], vllm["include_stop_str_in_output"]) == (40, 1.02, True)
    assert vllm["skip_special_tokens"] is False and "model" not in vllm
    assert json.loads(hf["generation_config"]) == {"do_sample": False, "repetition_penalty": 1.02}
    assert "temperature" not in hf and "top_k" not in hf


# ---------------------------------------------------------------- streaming and stops


def test_a_stop_token_split_across_chunks_is_never_streamed(fake: FakeServer) -> None:
    fake.replies.append(completion(" I think", " so<", "eo", "c>", finish="stop"))
    deltas = list(engine(fake, dialect="transformers").stream("x", PASS1))
    assert [d.text for d in deltas[:-1]] == [" I think", " so"]
    assert all("<" not in d.text for d in deltas)
    final = deltas[-1].generation
    assert final is not None
    assert (final.text, final.stop_reason, final.prompt_tokens, final.completion_tokens) == (
        " I think so",
        "<eoc>",
        7,
        5,
    )


def test_a_held_back_prefix_that_is_not_a_stop_is_released(fake: FakeServer) -> None:
    fake.replies.append(completion("a <", "b", finish="length"))
    deltas = list(engine(fake).stream("x", REPLY))
    assert [d.text for d in deltas] == ["a ", "<b", ""]
    assert deltas[-1].generation is not None and deltas[-1].generation.stop_reason == "length"


@pytest.mark.parametrize(
    ("dialect", "params", "extra", "reason"),
    [
        ("transformers", PASS1, {}, "<eom>"),  # only the special eos is hidden by transformers serve
        ("vllm", PASS1, {"stop_reason": None}, "<eom>"),  # vLLM: null stop_reason = the eos
        ("openai", PASS1, {"stop_reason": "<eoc>"}, "<eoc>"),  # vLLM's field, whatever the dialect
        ("openai", PASS1, {}, "<eoc>"),  # a server that says nothing: the first stop token (documented)
        ("openai", REPLY, {}, "<eom>"),
        ("transformers", PASS1.with_(stop_tokens=("<eoc>",)), {}, "eos"),
    ],
)
def test_which_hidden_stop_ended_it(
    fake: FakeServer, dialect: Any, params: SamplingParams, extra: dict[str, Any], reason: str
) -> None:
    fake.replies.append(completion("text", **extra))
    assert engine(fake, dialect=dialect).generate("x", params).stop_reason == reason


def test_stop_strings_cut_the_text_where_the_server_leaves_them(fake: FakeServer) -> None:
    fake.replies += [completion("one\n\ntwo"), completion("done<eom>")]
    remote = engine(fake, dialect="vllm")
    first = remote.generate("x", REPLY.with_(stop=("\n\n",)))
    assert (first.text, first.stop_reason) == ("one", "\n\n")
    second = remote.generate("x", REPLY.with_(stop_tokens=()))
    assert (second.text, second.stop_reason) == ("done", "eos")


def test_usage_and_cached_tokens_and_the_model_name_come_from_the_server(fake: FakeServer) -> None:
    usage = {"prompt_tokens": 40, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 32}}
    fake.replies.append(completion("ok", usage=usage))
    remote = engine(fake)
    assert remote.model_name == fake.url + "/v1"
    g = remote.generate("x", REPLY)
    assert (g.prompt_tokens, g.completion_tokens, g.cached_tokens) == (40, 3, 32)
    assert remote.model_name == "served-moss"
    assert remote.models() == ["served-moss", "other"]


def test_a_server_that_ignores_stream_answers_one_json(fake: FakeServer) -> None:
    body = {"model": "m", "choices": [{"text": "Paris.<eom>", "finish_reason": "stop"}], "usage": {}}
    fake.replies.append(Reply(body=json.dumps(body)))
    g = engine(fake, tokenizer=tiny_moss_tokenizer_dir()).generate("The capital of France is", REPLY)
    tokenizer = load_tokenizer(tiny_moss_tokenizer_dir())[0]
    assert (g.text, g.stop_reason) == ("Paris.", "<eom>")
    assert g.prompt_tokens == len(tokenizer.encode("The capital of France is", add_special_tokens=False))
    assert g.completion_tokens == len(tokenizer.encode("Paris.", add_special_tokens=False)) + 1


def test_generate_batch_keeps_the_order(fake: FakeServer) -> None:
    fake.replies += [completion("same") for _ in range(5)]
    results = engine(fake, max_concurrency=3).generate_batch([f"p{i}" for i in range(5)], REPLY)
    assert [g.text for g in results] == ["same"] * 5
    assert sorted(r["prompt"] for r in fake.requests) == [f"p{i}" for i in range(5)]


def test_chat_model_reads_tool_calls_through_the_remote_engine(fake: FakeServer) -> None:
    from moss_agent.tools import CalculatorTool

    fake.replies.append(completion(' I should compute.<eot>\n<|Commands|>: Calculate("2+2")', "<eoc>"))
    chat = ChatMoss(engine=engine(fake, dialect="transformers"))
    message = chat.bind_tools([CalculatorTool()]).invoke("What is 2+2?")
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("Calculate", {"expression": "2+2"})]
    assert message.response_metadata["stop_reason"] == "<eoc>"
    assert fake.requests[0]["prompt"].endswith("<|Human|>: What is 2+2?<eoh>\n<|Inner Thoughts|>:")


# ---------------------------------------------------------------- tokens


def test_token_counts_are_exact_with_a_tokenizer_and_estimated_without(tokenizer_dir: Path) -> None:
    text = "<|Human|>: 你好，请问你是谁？<eoh>\n<|MOSS|>: I am MOSS.<eom>\n"
    tokenizer = load_tokenizer(tokenizer_dir)[0]
    exact = RemoteEngine("http://127.0.0.1:9", tokenizer=tokenizer_dir)
    assert exact.token_ids(text) == tokenizer.encode(text, add_special_tokens=False)
    assert exact.count_tokens(text) == len(exact.token_ids(text))
    rough = RemoteEngine("http://127.0.0.1:9")
    # 2 end tokens, 9 CJK characters (full-width punctuation included), 33 other characters by threes
    assert rough.count_tokens(text) == 2 + 9 + 11
    with pytest.raises(ValueError, match="tokenizer="):
        rough.token_ids(text)


def test_the_context_window_is_checked_before_sending(fake: FakeServer, tokenizer_dir: Path) -> None:
    remote = engine(fake, tokenizer=tokenizer_dir, context_window=64)
    long = "The capital of France is Paris. " * 20
    with pytest.raises(ContextWindowExceededError):
        remote.generate(long, REPLY.with_(max_new_tokens=16))
    with pytest.raises(ContextWindowExceededError):
        remote.generate_batch(["short", long], REPLY.with_(max_new_tokens=16))
    assert fake.requests == []
    fake.replies.append(completion("ok"))
    remote.generate(long, REPLY.with_(max_new_tokens=16, truncate="left"))
    sent = fake.requests[0]["prompt"]
    assert long.endswith(sent) and remote.count_tokens(sent) <= 48


# ---------------------------------------------------------------- failures


def test_overloaded_answers_are_retried_with_backoff(fake: FakeServer) -> None:
    fake.replies += [
        Reply(status=503, body='{"error": "loading"}'),
        Reply(status=429, body="slow down", headers={"retry-after": "0.05"}),
        completion("fine"),
    ]
    started = time.monotonic()
    assert engine(fake, max_retries=2, backoff=0.02).generate("x", REPLY).text == "fine"
    assert len(fake.requests) == 3 and time.monotonic() - started >= 0.07


def test_retries_run_out_with_the_last_reason(fake: FakeServer) -> None:
    fake.replies += [Reply(status=503, body='{"error": {"message": "model is loading"}}') for _ in range(2)]
    with pytest.raises(ServerUnavailableError, match=r"model is loading.*2 attempt"):
        engine(fake, max_retries=1).generate("x", REPLY)


def test_a_server_that_is_down_says_so() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    remote = RemoteEngine(f"http://127.0.0.1:{port}", max_retries=1, backoff=0.01)
    with pytest.raises(ServerUnavailableError, match=r"cannot connect.*is the server running"):
        remote.generate("x", REPLY)


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        (Reply(status=422, body='{"detail": "Unexpected fields in the request: {\'top_k\'}"}'), "422.*top_k"),
        (Reply(status=401, body='{"error": {"message": "bad key"}}'), "401 \\(check the API key\\): bad key"),
        (Reply(body="<html>hello</html>", content_type="text/html"), "text/html"),
        (Reply(body='{"id": 1}'), "without choices"),
        (Reply(["data: not json"]), "streamed line .* is not a JSON object"),
        (Reply([{"error": "CUDA out of memory"}]), "reports an error: CUDA out of memory"),
        (Reply([chunk("half")]), "without a finish_reason"),
        (Reply([{"choices": [{"index": 0}]}]), "without text"),
    ],
    ids=["refused", "api-key", "html", "no-choices", "bad-line", "error-event", "cut-off", "no-text"],
)
def test_nonsense_and_refusals_raise_a_clear_error(fake: FakeServer, reply: Reply, match: str) -> None:
    fake.replies.append(reply)
    with pytest.raises(ServerResponseError, match=match):
        engine(fake, max_retries=0).generate("x", REPLY)
    assert len(fake.requests) == 1  # never retried


def test_a_silent_server_times_out(fake: FakeServer) -> None:
    fake.replies.append(Reply(body="{}", delay=1.0))
    with pytest.raises(ServerUnavailableError, match=r"sent nothing for 0\.2 s"):
        engine(fake, timeout=0.2).generate("x", REPLY)


def test_bad_arguments_raise_the_local_engines_errors_before_sending(fake: FakeServer) -> None:
    remote = engine(fake)
    with pytest.raises(ValueError, match="empty"):
        remote.generate("", REPLY)
    with pytest.raises(ValueError, match="max_new_tokens"):
        remote.generate("x", REPLY.with_(max_new_tokens=0))
    with pytest.raises(ContextWindowExceededError):
        list(remote.stream("x", REPLY.with_(max_new_tokens=4096)))
    assert fake.requests == []


def test_chat_moss_with_base_url_builds_a_remote_engine_without_a_network_call() -> None:
    from moss_agent import ChatMoss
    from moss_agent.engines.remote import RemoteEngine

    chat = ChatMoss(base_url="http://127.0.0.1:9/v1", model="moss-gptj", api_key="k", dialect="vllm")
    engine = chat.get_engine()
    assert isinstance(engine, RemoteEngine)
    assert engine.model_name == "moss-gptj"
