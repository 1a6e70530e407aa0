"""Property: no text from a client or a tool can add a turn, a command or a result to MOSS's prompt.

A request carries hostile text (role tags, end tokens, hit markers, ``moss_verbatim`` flags) in every place a
client controls: system, user and assistant text, ``reasoning_content``, tool-call names and arguments, tool
answers. Its prompt must have exactly the structure of the same request with plain text in those places:
the same count of every role tag and end token, and no ``<|N|>`` marker.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moss_agent.chat_model import ChatMoss
from moss_agent.memory.store import SQLiteStore
from moss_agent.protocol import format as fmt
from moss_agent.protocol.format import Command
from moss_agent.server.schemas import ChatCompletionRequest, to_langchain
from moss_agent.server.service import MossService, TurnRequest
from moss_agent.testing.scripted_rules import RuleBasedEngine
from moss_agent.tool_results import results_from_outputs

PIECES = [
    *fmt.ROLE_TAGS,
    *(t + ":" for t in fmt.ROLE_TAGS),
    *fmt.END_TOKENS,
    "<|1|>",
    "<|2|>: ",
    "<|",
    "|>",
    "<",
    ">",
    "|",
    ":",
    "\n",
    " ",
    "x",
    'Search("a")',
    "=>",
    "moss_verbatim",
    "None",
]
TEXT = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=3)), max_size=10).map("".join)
HIT = re.compile(r"<\|\d+\|>")
TAGS = (*fmt.ROLE_TAGS, *fmt.END_TOKENS)


def _request(t: dict[str, str]) -> dict[str, Any]:
    verbatim = {"moss_verbatim": True, "additional_kwargs": {"moss_verbatim": True}}
    call = {"id": "c1", "type": "function", "function": {"name": t["name"], "arguments": json.dumps({"x": t["args"]})}}
    return {
        "model": "moss",
        "plugins": [],
        "messages": [
            {"role": "system", "content": t["system"]},
            {"role": "user", "content": t["user1"], **verbatim},
            {"role": "assistant", "content": t["thought"], "reasoning_content": t["reasoning"], "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": t["tool"]},
            {"role": "assistant", "content": t["reply"], **verbatim},
            {"role": "user", "content": t["user2"], **verbatim},
        ],
    }


def _prompt(service: MossService, engine: RuleBasedEngine, body: dict[str, Any]) -> str:
    request = ChatCompletionRequest.model_validate(body)
    turn = TurnRequest(uuid.uuid4().hex, to_langchain(request.messages), plugins=[], max_tokens=32)
    events = list(service.run(turn))
    assert events[-1].kind == "final"
    return engine.calls[-1].prompt


@pytest.fixture(scope="module")
def served() -> tuple[MossService, RuleBasedEngine]:
    engine = RuleBasedEngine()
    return MossService(ChatMoss(engine=engine), [], SQLiteStore(":memory:")), engine


FIELDS = ("system", "user1", "thought", "reasoning", "name", "args", "tool", "reply", "user2")


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.fixed_dictionaries({k: TEXT for k in FIELDS}))
def test_client_text_cannot_add_turns_commands_or_results(
    served: tuple[MossService, RuleBasedEngine], texts: dict[str, str]
) -> None:
    service, engine = served
    plain = {k: "Calculate" if k == "name" else f"plain {k}" for k in FIELDS}
    expected = _prompt(service, engine, _request(plain))
    texts["name"] = texts["name"] or "Calculate"
    prompt = _prompt(service, engine, _request(texts))
    assert {t: prompt.count(t) for t in TAGS} == {t: expected.count(t) for t in TAGS}, prompt
    assert not HIT.search(prompt), prompt


@settings(max_examples=80, deadline=None)
@given(TEXT, TEXT, TEXT)
def test_tool_outputs_only_search_keeps_hit_numbers(calc: str, other: str, search: str) -> None:
    others = results_from_outputs([(Command("Calculate", "1"), calc), (Command("Lookup", "a"), other)])
    assert not any(t in others for t in TAGS) and not HIT.search(others), others
    hits = results_from_outputs([(Command("Search", "q"), search)])
    assert not any(t in hits for t in TAGS), hits


def test_search_results_keep_their_hit_numbers() -> None:
    body = results_from_outputs([(Command("Search", "q"), "<|1|>: 'a page'\n<|2|>: 'another'")])
    assert "<|1|>: 'a page'" in body and "<|2|>: 'another'" in body
