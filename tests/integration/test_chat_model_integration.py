"""LangChain's standard integration suite for ChatMoss.

Two models run the suite through the real ChatMoss code path (rendering, the plugin passes, parsing, tool
calls, streaming):

* :class:`TestChatMossRuleBased`: a :class:`~moss_agent.testing.scripted_rules.RuleBasedEngine`, a stand-in
  model that answers each MOSS prompt sensibly from the prompt itself (the suite's tool-calling and
  structured-output tests need a model that calls the right tool with the right arguments);
* :class:`TestChatMossTinyCheckpoint`: the real TransformersEngine on a tiny random MOSS checkpoint in the
  released layout, for the tests that only need generated text (a random model cannot choose tools).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import pytest
import pytest_socket
from langchain_core.messages import AIMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests

from moss_agent.chat_model import ChatMoss
from moss_agent.testing.scripted_rules import RuleBasedEngine


@pytest.fixture(autouse=True)
def _no_network() -> Any:
    # Unix sockets stay allowed: asyncio's event loop needs a socketpair.
    pytest_socket.disable_socket(allow_unix_socket=True)
    yield
    pytest_socket.enable_socket()


class TestChatMossRuleBased(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatMoss]:
        return ChatMoss

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"engine": RuleBasedEngine()}

    @property
    def supports_model_override(self) -> bool:
        return False  # one ChatMoss serves one loaded 16B model; a per-call model= raises

    @property
    def supports_json_mode(self) -> bool:
        return True  # with_structured_output(method="json_mode") runs through tool calling too

    @property
    def supports_anthropic_inputs(self) -> bool:
        return True  # text, tool_use and thinking blocks are read; images raise (MOSS has no vision)

    @property
    def supported_usage_metadata_details(self) -> dict[str, list[str]]:
        return {"invoke": ["cache_read_input"], "stream": ["cache_read_input"]}

    def invoke_with_cache_read_input(self, *, stream: bool = False) -> AIMessage:
        # The second turn of a conversation reuses the KV cache of the first.
        chat = ChatMoss(engine=RuleBasedEngine())
        first = chat.invoke("Hello")
        messages = ["Hello", first, "How are you?"]
        if not stream:
            return chat.invoke(messages)
        full = None
        for chunk in chat.stream(messages):
            full = chunk if full is None else full + chunk
        assert isinstance(full, AIMessage)
        return full


@cache
def _tiny_engine() -> Any:
    torch = pytest.importorskip("torch")
    from moss_agent.engines.transformers import TransformersEngine
    from moss_agent.testing.checkpoints import tiny_moss_checkpoint

    torch.set_num_threads(1)  # a tiny model on shared cores: one thread is faster
    return TransformersEngine.from_pretrained(tiny_moss_checkpoint(), model_name="tiny-moss")


class TestChatMossTinyCheckpoint(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatMoss]:
        return ChatMoss

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"engine": _tiny_engine(), "seed": 0, "max_tokens": 24}

    @property
    def has_tool_calling(self) -> bool:
        return False  # random weights cannot choose tools: TestChatMossRuleBased runs the tool tests

    @property
    def supports_anthropic_inputs(self) -> bool:
        return True  # the content blocks render on the real engine (the reply itself is random)

    @property
    def supports_model_override(self) -> bool:
        return False


# ---------------------------------------------------------------- the real engine beyond the suite


def _joined(chunks: Any) -> Any:
    full = None
    for chunk in chunks:
        full = chunk if full is None else full + chunk
    return full


def test_lazy_load_from_a_checkpoint_directory():
    from moss_agent.protocol import format as fmt
    from moss_agent.testing.checkpoints import tiny_moss_checkpoint

    _tiny_engine()  # heavy imports done once
    path = tiny_moss_checkpoint()
    chat = ChatMoss(model=str(path), do_sample=False, max_tokens=8)
    ids = chat.get_token_ids("Hello <eom>")
    assert chat._slot is not None and not chat._slot.loaded  # the tokenizer files alone: no weights read yet
    assert ids == _tiny_engine().token_ids("Hello <eom>") and len(_tiny_engine().token_ids(fmt.EOM)) == 1
    message = chat.invoke("Hello")
    assert chat._slot is not None and chat._slot.loaded
    prompt = fmt.chat_prompt(fmt.system_prompt(), [], "Hello")
    assert message.usage_metadata["input_tokens"] == len(chat.get_token_ids(prompt))
    assert message.response_metadata["model_name"] == str(path)  # as the caller named it


def test_greedy_stream_equals_invoke_and_pass2_reuses_the_cache():
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool("Calculate")
    def calculate(expression: str) -> str:
        """Calculate."""
        return "4"

    chat = ChatMoss(engine=_tiny_engine(), do_sample=False, max_tokens=16)
    invoked = chat.invoke("Tell me a joke")
    streamed = _joined(chat.stream("Tell me a joke"))
    assert streamed.content == invoked.content
    assert streamed.usage_metadata["output_tokens"] == invoked.usage_metadata["output_tokens"]

    # Random weights write anything in pass 1: a forced call comes back as a tool call or an invalid one.
    bound = chat.bind_tools([calculate], tool_choice="Calculate")
    first = bound.invoke("What is 2+2?")
    assert len(first.tool_calls) + len(first.invalid_tool_calls) >= 1
    call_id = (first.tool_calls or first.invalid_tool_calls)[0]["id"]
    answered = [HumanMessage("What is 2+2?"), first, ToolMessage("4", tool_call_id=call_id)]
    second = chat.bind_tools([calculate], max_tool_rounds=1).invoke(answered)  # straight to the reply
    assert second.response_metadata["finish_reason"] in ("stop", "length")
    assert second.usage_metadata["input_token_details"]["cache_read"] > 0


def test_moss_llm_on_the_real_engine():
    from moss_agent.llm import MossLLM
    from moss_agent.protocol import format as fmt

    llm = MossLLM(engine=_tiny_engine(), do_sample=False, max_tokens=12)
    prompt = fmt.chat_prompt(fmt.system_prompt(), [], "Hello")
    text = llm.invoke(prompt)
    assert "".join(llm.stream(prompt)) == text
    stop = text.strip()[2:5]
    assert stop and llm.invoke(prompt, stop=[stop]) == text[: text.index(stop)]
