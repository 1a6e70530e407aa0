"""Many clients at once against one model: every turn answered, stored once, in order, in its conversation."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from moss_agent.engines.base import Delta, SamplingParams
from moss_agent.memory.store import SQLiteStore
from moss_agent.server import ServerSettings, create_app
from moss_agent.server.testing import running_server
from moss_agent.testing.scripted_rules import RuleBasedEngine

pytestmark = [pytest.mark.allow_hosts(["127.0.0.1"]), pytest.mark.timeout(120)]

CLIENTS = 16
TURNS = 3
_HUMAN = re.compile(r"<\|Human\|>: (.*?)<eoh>")


def question(client: int, turn: int) -> str:
    # Odd turns use the calculator, with a number only this client and turn produce.
    return f'Please calculate "{client}*100+{turn}"' if turn % 2 else f"Client {client} says hello {turn}"


def expected(client: int, turn: int) -> str:
    if turn % 2:
        return f"The result is: {client * 100 + turn}"
    return f'Hello! You said "{question(client, turn)}". How can I help you?'


class QueueWatchingEngine(RuleBasedEngine):
    """Records how many requests the server's queue held, and how many generations ran at once."""

    queue: Any = None
    peak_queue = 0
    running = 0
    peak_running = 0

    def stream(self, prompt: str, params: SamplingParams) -> Iterator[Delta]:
        self.peak_queue = max(self.peak_queue, self.queue.pending)
        self.running += 1
        self.peak_running = max(self.peak_running, self.running)
        try:
            for delta in super().stream(prompt, params):
                time.sleep(0)  # let any other thread run here, as a real model's step would
                yield delta
        finally:
            self.running -= 1


Server = tuple[str, QueueWatchingEngine, SQLiteStore]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    from moss_agent.tools import make_tools

    # The calculator's sympy processes start with the tool, in the background, and the clients' calculations come
    # together: those that wait for a process still importing sympy (seconds on a busy machine) must not pay for
    # that start out of their 1.5 s (they used to, and answered "No result.").
    tools = make_tools(["calculator"])
    engine = QueueWatchingEngine()
    store = SQLiteStore(tmp_path / "chats.sqlite3")
    app = create_app(engine, tools=tools, store=store, settings=ServerSettings(api_key="k"))
    engine.queue = app.state.queue
    with running_server(app) as url:
        yield url, engine, store


async def test_sixteen_clients_each_in_its_own_conversation(
    server: tuple[str, QueueWatchingEngine, SQLiteStore],
) -> None:
    url, engine, store = server
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=60)

    async def one_client(number: int) -> list[str]:
        conversation = f"client-{number}"
        replies = []
        for turn in range(TURNS):
            messages = [{"role": "user", "content": question(number, turn)}]
            extra = {"conversation_id": conversation}
            if (number + turn) % 2:  # half the turns streamed
                stream = await client.chat.completions.create(
                    model="moss",
                    messages=messages,
                    stream=True,
                    extra_body=extra,
                )
                replies.append("".join([c.choices[0].delta.content or "" async for c in stream if c.choices]))
            else:
                reply = await client.chat.completions.create(model="moss", messages=messages, extra_body=extra)
                assert reply.conversation_id == conversation
                replies.append(reply.choices[0].message.content or "")
        return replies

    results = await asyncio.gather(*(one_client(n) for n in range(CLIENTS)))
    await client.close()
    assert engine.peak_queue > CLIENTS // 2  # the clients really were waiting for the model at the same time
    assert engine.peak_running == 1  # and the model ran one generation at a time

    for number, replies in enumerate(results):
        assert replies == [expected(number, t) for t in range(TURNS)], number
        saved = store.load(f"client-{number}")
        assert saved is not None
        assert [t.human for t in saved.turns] == [question(number, t) for t in range(TURNS)]  # once, in order
        assert [t.reply for t in saved.turns] == replies
        assert saved.turns[1].commands == f'Calculate("{number}*100+1")'
    assert sum(s.num_turns for s in store.list_sessions()) == CLIENTS * TURNS
    # No prompt mixed two conversations: every question in a prompt belongs to one client.
    for call in engine.calls:
        owners = {int(re.search(r"(\d+)", h).group(1)) for h in _HUMAN.findall(call.prompt)}
        assert len(owners) == 1, call.prompt[-300:]
    # Turn t of a client was answered with its turns before t in the prompt, and nothing else.
    last_prompts = [c.prompt for c in engine.calls if c.prompt.endswith("<|Inner Thoughts|>:")]
    assert len(last_prompts) == CLIENTS * TURNS
    for prompt in last_prompts:
        humans = _HUMAN.findall(prompt)
        number = int(re.search(r"(\d+)", humans[-1]).group(1))
        assert humans == [question(number, t) for t in range(len(humans))]
