"""The OpenAI-compatible server, driven by the official ``openai`` client over loopback.

The model is the rule-based scripted engine (it answers from the prompt it reads); everything else is real:
the plugin loop, sympy behind the calculator, a tiny diffusers pipeline behind Text2Image, the SQLite store,
uvicorn and HTTP.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from moss_agent.engines.base import Delta, SamplingParams
from moss_agent.memory.store import SQLiteStore
from moss_agent.server import ServerSettings, create_app
from moss_agent.server.testing import running_server
from moss_agent.testing.scripted_rules import RuleBasedEngine

pytestmark = [pytest.mark.allow_hosts(["127.0.0.1"]), pytest.mark.timeout(120)]

KEY = "test-key-123"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]},
    },
}


class SlowEngine(RuleBasedEngine):
    """The rule-based engine, ``delay`` seconds per streamed token; ``tokens`` counts the tokens it streamed."""

    delay = 0.0
    tokens = 0

    def stream(self, prompt: str, params: SamplingParams) -> Iterator[Delta]:
        for delta in super().stream(prompt, params):
            time.sleep(self.delay)
            self.tokens += 1
            yield delta


@pytest.fixture(scope="module")
def image_tool(tmp_path_factory: pytest.TempPathFactory) -> Any:
    pytest.importorskip("diffusers")
    import torch

    from moss_agent.testing.images import tiny_text2image_pipeline
    from moss_agent.tools.text_to_image import TextToImageTool

    torch.set_num_threads(1)  # 2 shared cores: torch's own threads only oversubscribe them
    folder = tmp_path_factory.mktemp("images")
    return TextToImageTool(model=str(tiny_text2image_pipeline()), output_dir=folder, steps=2, height=64, width=64)


@pytest.fixture(scope="module")
def engine() -> RuleBasedEngine:
    return RuleBasedEngine()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> SQLiteStore:
    return SQLiteStore(tmp_path_factory.mktemp("db") / "chats.sqlite3")


@pytest.fixture(scope="module")
def base_url(engine: RuleBasedEngine, store: SQLiteStore, image_tool: Any) -> Iterator[str]:
    from moss_agent.tools import make_tools

    settings = ServerSettings(api_key=KEY, max_request_bytes=64_000, max_tokens_limit=512, request_timeout_s=60)
    app = create_app(engine, tools=[*make_tools(["calculator", "solver"]), image_tool], store=store, settings=settings)
    with running_server(app) as url:
        yield url


@pytest.fixture
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def ask(client: openai.OpenAI, text: str, **extra: Any) -> Any:
    return client.chat.completions.create(model="moss", messages=[{"role": "user", "content": text}], extra_body=extra)


def echo(text: str) -> str:
    return f'Hello! You said "{text}". How can I help you?'


def test_models_health_and_plugins(client: openai.OpenAI, base_url: str) -> None:
    assert [m.id for m in client.models.list()] == ["moss-rules"]
    health = httpx.get(base_url + "/health").json()  # open, for load balancers
    assert health["status"] == "ok" and health["auth"] is True and health["model"] == "moss-rules"
    plugins = httpx.get(base_url + "/v1/plugins", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert [p["key"] for p in plugins["data"]] == ["calculator", "solver", "text2image"]
    assert plugins["default"] == ["calculator", "solver", "text2image"]


def test_plain_chat_is_stored_and_continued_by_conversation_id(
    client: openai.OpenAI, engine: RuleBasedEngine, store: SQLiteStore
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="moss", messages=[{"role": "user", "content": "Good morning"}], extra_body={"plugins": []}
    )
    first = raw.parse()
    cid = first.conversation_id
    assert raw.headers["x-conversation-id"] == cid
    assert first.choices[0].message.content == echo("Good morning")
    assert first.choices[0].finish_reason == "stop"
    assert first.usage is not None and first.usage.completion_tokens > 0
    assert "- Calculator: disabled.\n" in engine.calls[-1].prompt  # no plugin on: the plain chat prompt
    assert engine.calls[-1].prompt.endswith(
        "<|Human|>: Good morning<eoh>\n<|Inner Thoughts|>: None<eot>\n"
        "<|Commands|>: None<eoc>\n<|Results|>: None<eor>\n<|MOSS|>:"
    )

    second = ask(client, "And good evening", conversation_id=cid)
    assert second.conversation_id == cid
    assert second.choices[0].message.content == echo("And good evening")
    prompt = engine.calls[-1].prompt
    assert prompt.index("Good morning") < prompt.index(echo("Good morning")) < prompt.index("And good evening")
    saved = store.load(cid)
    assert saved is not None
    assert [(t.human, t.reply) for t in saved.turns] == [
        ("Good morning", echo("Good morning")),
        ("And good evening", echo("And good evening")),
    ]
    assert second.choices[0].message.moss["turn_index"] == 1


def test_history_sent_by_the_client_starts_a_new_conversation(
    client: openai.OpenAI, engine: RuleBasedEngine, store: SQLiteStore
) -> None:
    messages = [
        {"role": "system", "content": "Answer in one sentence."},
        {"role": "user", "content": "Who are you"},
        {"role": "assistant", "content": "I am MOSS."},
        {"role": "user", "content": "Nice to meet you"},
    ]
    reply = client.chat.completions.create(model="moss", messages=messages)
    assert reply.choices[0].message.content == echo("Nice to meet you")
    prompt = engine.calls[-1].prompt
    assert "Answer in one sentence.\nCapabilities and tools that MOSS can possess.\n" in prompt
    assert "<|Human|>: Who are you<eoh>" in prompt and "<|MOSS|>: I am MOSS.<eom>" in prompt
    saved = store.load(reply.conversation_id)
    assert saved is not None and [t.human for t in saved.turns] == ["Who are you", "Nice to meet you"]
    assert saved.system is not None and "Answer in one sentence." in saved.system


def test_streaming_gives_the_same_reply_in_pieces(client: openai.OpenAI, store: SQLiteStore) -> None:
    chunks = list(
        client.chat.completions.create(
            model="moss",
            messages=[{"role": "user", "content": "Tell me something"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3 and "".join(pieces) == echo("Tell me something")
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
    cid = chunks[0].conversation_id
    saved = store.load(cid)
    assert saved is not None and [t.reply for t in saved.turns] == [echo("Tell me something")]


def test_server_side_calculator_turn(client: openai.OpenAI, store: SQLiteStore) -> None:
    reply = ask(client, 'Please calculate "37*12+5"')
    message = reply.choices[0].message
    assert message.content == "The result is: 449"
    moss = message.moss
    assert moss["commands"] == 'Calculate("37*12+5")'
    assert moss["inner_thoughts"] == message.reasoning_content == "The user asks for calculator, I use Calculate."
    (run,) = moss["runs"]
    assert run["tool"] == "Calculate" and run["ran"] and run["output"] == "'449'" and run["error"] is None
    turn = store.load(reply.conversation_id).turns[-1]
    assert turn.commands == 'Calculate("37*12+5")' and "'449'" in turn.results and turn.reply == message.content


def test_server_side_image_turn_streams_its_events_and_serves_the_picture(
    client: openai.OpenAI, base_url: str, store: SQLiteStore, image_tool: Any
) -> None:
    stream = client.chat.completions.create(
        model="moss", messages=[{"role": "user", "content": 'Draw a picture of "a red cat"'}], stream=True
    )
    chunks = list(stream)
    events = [c.choices[0].delta.moss for c in chunks if c.choices and getattr(c.choices[0].delta, "moss", None)]
    assert [e["type"] for e in events] == ["thoughts", "command", "result", "turn"]
    assert events[1]["command"] == 'Text2Image("a red cat")'
    result, turn = events[2], events[3]
    assert result["output"] == "Image generated successfully." and result["image_url"].startswith("/v1/images/")
    assert turn["images"] == [result["image_url"]]
    reply = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert reply == "The result is: Image generated successfully."

    auth = {"Authorization": f"Bearer {KEY}"}
    picture = httpx.get(base_url + result["image_url"], headers=auth)
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
    assert picture.content.startswith(PNG_SIGNATURE)
    from PIL import Image

    assert Image.open(io.BytesIO(picture.content)).size == (64, 64)
    assert httpx.get(base_url + result["image_url"]).status_code == 401  # images are behind the key too
    stored = httpx.get(f"{base_url}/v1/conversations/{turn['conversation_id']}", headers=auth).json()
    assert stored["turns"][-1]["images"] == [result["image_url"]]
    assert stored["turns"][-1]["commands"] == 'Text2Image("a red cat")'
    assert Path(store.load(turn["conversation_id"]).records[-1].artifacts[0]).parent == image_tool.output_dir


def test_plugin_switches_are_per_conversation(client: openai.OpenAI, base_url: str, engine: RuleBasedEngine) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    cid = "switch-test"
    put = httpx.put(f"{base_url}/v1/conversations/{cid}/plugins", json={"plugins": ["solver"]}, headers=auth)
    assert put.status_code == 200 and put.json()["plugins"] == ["solver"]
    off = ask(client, 'Please calculate "2+3"', conversation_id=cid)
    assert off.choices[0].message.moss["runs"] == []
    assert "- Calculator: disabled.\n" in engine.calls[-1].prompt
    assert "- Equation solver: enabled. API: Solve(equation)\n" in engine.calls[-1].prompt
    other = ask(client, 'Please calculate "2+3"')  # another conversation keeps the defaults
    assert other.choices[0].message.content == "The result is: 5"
    on = ask(client, 'Please calculate "2+3"', conversation_id=cid, plugins=["calculator"])
    assert on.choices[0].message.content == "The result is: 5"
    assert httpx.get(f"{base_url}/v1/conversations/{cid}", headers=auth).json()["plugins"] == ["calculator"]
    bad = httpx.put(f"{base_url}/v1/conversations/{cid}/plugins", json={"plugins": ["teleport"]}, headers=auth)
    assert bad.status_code == 400 and "teleport" in bad.json()["error"]["message"]
    listed = httpx.get(f"{base_url}/v1/conversations", headers=auth).json()["data"]
    assert {"id": cid, "num_turns": 2}.items() <= next(c for c in listed if c["id"] == cid).items()


def test_client_side_tool_calls_round_trip(client: openai.OpenAI, engine: RuleBasedEngine, store: SQLiteStore) -> None:
    question = {"role": "user", "content": "What is the weather in Paris?"}
    first = client.chat.completions.create(model="moss", messages=[question], tools=[WEATHER_TOOL])
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"location": "Paris"}
    assert "- Get weather: enabled. API: get_weather(location)\n" in engine.calls[-1].prompt
    cid = first.conversation_id
    saved = store.load(cid)
    assert saved is None or saved.turns == []  # not stored until MOSS has replied

    messages = [
        question,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"},
    ]
    stream = client.chat.completions.create(
        model="moss",
        messages=messages,
        tools=[WEATHER_TOOL],
        stream=True,
        extra_body={"conversation_id": cid},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "The result is: Sunny, 21 C"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    (turn,) = store.load(cid).turns
    assert turn.human == "What is the weather in Paris?" and turn.commands == 'get_weather("Paris")'
    assert "Sunny, 21 C" in turn.results and turn.reply == "The result is: Sunny, 21 C"
    assert turn.inner_thoughts == "The user asks for get weather, I use get_weather."  # echoed back, kept


def test_streamed_tool_calls_come_in_the_last_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="moss",
            messages=[{"role": "user", "content": "What is the weather in Rome?"}],
            tools=[WEATHER_TOOL],
            stream=True,
        )
    )
    last = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    assert last.choices[0].finish_reason == "tool_calls"
    (call,) = last.choices[0].delta.tool_calls or []
    assert call.index == 0 and call.function and call.function.name == "get_weather"
    assert json.loads(call.function.arguments or "") == {"location": "Rome"}


def test_auth_refused_and_accepted(base_url: str) -> None:
    wrong = openai.OpenAI(base_url=base_url + "/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        ask(wrong, "Hello")
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    bare = httpx.post(base_url + "/v1/chat/completions", json={"model": "m", "messages": []})
    assert bare.status_code == 401
    assert bare.json() == {
        "error": {
            "message": "Incorrect API key provided.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    assert httpx.get(base_url + "/v1/models", headers={"Authorization": "Basic " + KEY}).status_code == 401
    right = openai.OpenAI(base_url=base_url + "/v1", api_key=KEY, max_retries=0)
    assert ask(right, "Hello").choices[0].message.content == echo("Hello")


def test_oversized_and_invalid_requests_are_refused(client: openai.OpenAI, base_url: str) -> None:
    with pytest.raises(openai.APIStatusError) as err:
        ask(client, "x" * 70_000)
    assert err.value.status_code == 413 and err.value.code == "request_too_large"
    with pytest.raises(openai.BadRequestError) as err_tokens:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=100_000)
    assert err_tokens.value.param == "max_tokens" and "512" in err_tokens.value.message
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    cases = {
        "{not json": 400,
        json.dumps({"model": "m", "messages": []}): 400,
        json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 2}): 400,
        json.dumps({"model": "m", "messages": [{"role": "assistant", "content": "hi"}]}): 400,
        json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "conversation_id": "../x"}): 400,
    }
    for body, status in cases.items():
        response = httpx.post(base_url + "/v1/chat/completions", content=body, headers=auth)
        assert response.status_code == status, body
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    chunked = httpx.post(  # a body without a Content-Length is counted as it arrives
        base_url + "/v1/chat/completions", content=iter([b"{" + b" " * 40_000] * 2), headers=auth
    )
    assert chunked.status_code == 413
    missing = httpx.get(base_url + "/v1/nowhere", headers=auth)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


def test_image_route_serves_only_uuid_names_inside_the_folder(base_url: str, image_tool: Any, tmp_path: Path) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    outside = tmp_path / "secret.png"
    outside.write_bytes(PNG_SIGNATURE + b"secret")
    planted = "0" * 32 + ".png"
    os.symlink(outside, image_tool.output_dir / planted)
    for name in ("..%2Fsecret.png", "%2Fetc%2Fpasswd", "../../etc/passwd", "abc.png", planted, "A" * 32 + ".png"):
        response = httpx.get(f"{base_url}/v1/images/{name}", headers=auth)
        assert response.status_code == 404, name
        assert b"secret" not in response.content


def test_time_limit_and_full_queue(tmp_path: Path) -> None:
    slow = SlowEngine()
    settings = ServerSettings(request_timeout_s=0.6, max_queue=2)
    with running_server(create_app(slow, store=tmp_path / "db.sqlite3", settings=settings)) as url:
        store = SQLiteStore(tmp_path / "db.sqlite3")
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)
        slow.delay = 0.1  # about 20 tokens per reply: 2 s, over the limit
        with pytest.raises(openai.APIStatusError) as err:
            ask(client, "Hello slow", conversation_id="late")
        assert err.value.status_code == 504 and err.value.code == "timeout"
        with pytest.raises(openai.APIError, match="time limit"):  # streamed: an error event
            list(
                client.chat.completions.create(
                    model="m",
                    messages=[{"role": "user", "content": "Hello slow"}],
                    stream=True,
                    extra_body={"conversation_id": "late"},
                )
            )
        time.sleep(0.3)
        saved = store.load("late")
        assert saved is None or saved.turns == []  # a turn cut short is not stored

        with httpx.Client(base_url=url, timeout=30) as http:
            import concurrent.futures

            body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                codes = sorted(pool.map(lambda _: http.post("/v1/chat/completions", json=body).status_code, range(4)))
            assert codes.count(429) >= 1 and set(codes) <= {429, 504}
        slow.delay = 0.0
        assert ask(client, "Hello again").choices[0].message.content == echo("Hello again")  # the queue lives on


def test_a_real_tiny_checkpoint_answers_as_the_agent_does(tmp_path: Path) -> None:
    import torch

    from moss_agent.agent import MossAgent
    from moss_agent.chat_model import ChatMoss
    from moss_agent.engines.transformers import TransformersEngine
    from moss_agent.testing.checkpoints import tiny_moss_checkpoint
    from moss_agent.tools import make_tools

    torch.set_num_threads(1)
    engine = TransformersEngine.from_pretrained(tiny_moss_checkpoint())
    tools = make_tools(["calculator"])
    with running_server(create_app(engine, tools=tools, store=tmp_path / "db.sqlite3")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        settings = {"max_tokens": 12, "temperature": 0}
        whole = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hello"}], **settings)
        chunks = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Hello"}], stream=True, **settings
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    agent = MossAgent(ChatMoss(engine=engine, temperature=0, do_sample=False, max_new_tokens=12), tools=tools)
    direct = agent.run_turn("Hello")
    assert whole.choices[0].message.content == streamed == direct.output  # greedy: the same text every way
    assert whole.choices[0].message.moss["inner_thoughts"] == direct.inner_thoughts
    assert whole.usage is not None and whole.usage.completion_tokens == direct.usage["output_tokens"] > 0


def test_serve_command_line() -> None:
    import argparse

    from moss_agent.cli.serve import add_serve_parser

    parser = argparse.ArgumentParser(prog="moss-agent")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", "--model", "ckpt", "--port", "9000", "--api-key", "k", "--plugins", "solver"])
    assert (args.model, args.port, args.api_key, args.plugins, args.host) == ("ckpt", 9000, "k", "solver", "127.0.0.1")
    with pytest.raises(SystemExit, match="unknown plugin"):
        args.func(parser.parse_args(["serve", "--model", "ckpt", "--plugins", "teleport"]))
    with pytest.raises(SystemExit, match="remote"):
        args.func(parser.parse_args(["serve", "--model", "http://example.invalid/v1"]))


def test_a_client_that_goes_away_stops_its_turn(tmp_path: Path) -> None:
    slow = SlowEngine()
    slow.delay = 0.05  # the echoed question makes a reply of 115 tokens: about 6 s
    whole_reply = 115
    app = create_app(slow, store=tmp_path / "db.sqlite3")
    with running_server(app) as url:
        body = {
            "model": "m",
            "messages": [{"role": "user", "content": "Hi" + " and then" * 50}],
            "stream": True,
            "conversation_id": "gone",
        }
        first_words = False
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as response:
            for line in response.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    first_words = True
                    break  # the first words came: hang up
        assert first_words
        hung_up = time.monotonic()
        while app.state.queue.pending:  # the turn ends: dropped, or (not cancelled) at its reply's end
            assert time.monotonic() - hung_up < 60, "the turn never ended"
            time.sleep(0.05)
        # The worker dropped the turn long before its end (counted in tokens, not in seconds of a busy machine).
        assert slow.tokens < whole_reply // 2, slow.tokens
        saved = SQLiteStore(tmp_path / "db.sqlite3").load("gone")
        assert saved is None or saved.turns == []
