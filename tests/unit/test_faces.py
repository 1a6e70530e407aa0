"""Settings checked at construction, one engine per checkpoint, copies and pickles, context overflow."""

from __future__ import annotations

import copy
import gc
import pickle

import pytest
from langchain_core.exceptions import ContextOverflowError, ModelInvalidRequestError
from langchain_core.messages import AIMessage, HumanMessage

from moss_agent import registry
from moss_agent.chat_model import ChatMoss
from moss_agent.engines.base import ContextWindowExceededError
from moss_agent.llm import MossLLM
from moss_agent.protocol import format as fmt
from moss_agent.testing.engines import ScriptedEngine
from moss_agent.testing.scripted_rules import RuleBasedEngine

pytestmark = pytest.mark.disable_socket


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("model_id", "use model"),
        ("device", "use device_map"),
        ("num_ctx", "fixed at 2048"),
        ("model_kwargs", "sampling fields"),
        ("temprature", "use temperature"),
    ],
)
@pytest.mark.parametrize("face", [ChatMoss, MossLLM])
def test_unknown_settings_raise_with_a_suggestion(face: type, name: str, hint: str) -> None:
    with pytest.raises(ValueError, match=f"no setting '{name}'.*{hint}"):
        face(model="fnlp/moss-moon-003-sft", **{name: 1})


def test_precision_is_checked_and_normalised_at_construction() -> None:
    with pytest.raises(ValueError, match="int3"):
        ChatMoss(model="x", precision="int3")
    assert ChatMoss(model="x", precision="float16").precision == "fp16"


def test_conflicting_token_limits_are_an_error() -> None:
    with pytest.raises(ValueError, match="max_tokens=10 and max_new_tokens=20"):
        ChatMoss(model="x", max_tokens=10, max_new_tokens=20)
    assert ChatMoss(model="x", max_tokens=10, max_new_tokens=10).max_new_tokens == 10
    with pytest.raises(ValueError, match="between 1 and 2047"):
        ChatMoss(model="x", max_new_tokens=4096)
    chat = ChatMoss(engine=ScriptedEngine(["a", "b"]))
    with pytest.raises(ValueError, match="same setting"):
        chat.invoke("Hi", max_tokens=5, max_new_tokens=6)
    assert chat.invoke("Hi", max_tokens=5).content == "a"


def test_remote_settings_reach_the_remote_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOSS_AGENT_API_KEY", "from-env")
    chat = ChatMoss(model="moss", base_url="http://127.0.0.1:9/v1", timeout=7.5, max_retries=0)
    engine = chat.get_engine()
    assert (engine.timeout, engine.max_retries, engine.api_key) == (7.5, 0, "from-env")


def test_request_errors_are_langchain_invalid_requests() -> None:
    chat = ChatMoss(engine=ScriptedEngine(["never"]))
    with pytest.raises(ModelInvalidRequestError, match="already MOSS's reply"):
        chat.invoke([HumanMessage("hi"), AIMessage("hello")])
    with pytest.raises(ModelInvalidRequestError, match="per-call model"):
        chat.invoke("hi", model="other")
    with pytest.raises(ValueError, match="same setting"):  # still ValueErrors, as before
        chat.invoke("hi", max_tokens=1, max_new_tokens=2)


def test_image_blocks_raise_a_clear_error() -> None:
    chat = ChatMoss(engine=ScriptedEngine(["never"]))
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(ModelInvalidRequestError, match="MOSS has no vision"):
        chat.invoke([HumanMessage(content=[{"type": "text", "text": "What is this?"}, image])])


def test_tracing_params_and_metadata() -> None:
    chat = ChatMoss(engine=ScriptedEngine(["Hi."]), do_sample=False)
    assert chat._get_ls_params()["ls_temperature"] == 0.0
    assert ChatMoss(model="x")._get_ls_params()["ls_temperature"] == 0.7
    assert ChatMoss(model="x", temperature=0)._get_ls_params()["ls_temperature"] == 0.0
    assert chat.invoke("Hello").response_metadata["model_provider"] == "moss"
    profile = chat.profile
    assert profile is not None and profile["max_input_tokens"] == 2048
    assert profile["tool_calling"] and profile["structured_output"] and profile["reasoning_output"]


# ---------------------------------------------------------------- one engine per checkpoint


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts engine loads: TransformersEngine.from_pretrained replaced by a scripted engine."""
    from moss_agent.engines.transformers import TransformersEngine

    made: list[str] = []

    def fake(model: str, **kwargs: object) -> RuleBasedEngine:
        made.append(model)
        return RuleBasedEngine(model_name=str(model))

    monkeypatch.setattr(TransformersEngine, "from_pretrained", staticmethod(fake))
    return made


def test_faces_copies_and_configurable_fields_share_one_engine(loads: list[str], tmp_path) -> None:
    from langchain_core.runnables import ConfigurableField

    path = str(tmp_path)
    chat = ChatMoss(model=path, temperature=0)
    other = ChatMoss(model=str(tmp_path / "."), max_new_tokens=9)  # same directory, other sampling
    llm = MossLLM(model=path)
    tuned = chat.configurable_fields(temperature=ConfigurableField(id="t"))
    chat.invoke("Hi")
    other.invoke("Hi")
    llm.invoke("<|Human|>: Hi<eoh>\n<|MOSS|>:")
    chat.model_copy(update={"top_p": 0.5}).invoke("Hi")
    copy.deepcopy(chat).invoke("Hi")
    for t in (0.1, 0.2):
        tuned.invoke("Hi", config={"configurable": {"t": t}})
    assert loads == [path]
    assert ChatMoss(model=path, precision="fp16").get_engine() is not chat.get_engine()  # another precision
    assert loads == [path, path]


def test_the_adapter_is_part_of_the_engine_key(loads: list[str], tmp_path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    base = ChatMoss(model=str(tmp_path))
    tuned = ChatMoss(model=str(tmp_path), adapter=str(adapter))
    assert base.get_engine() is not tuned.get_engine() and len(loads) == 2
    assert MossLLM(model=str(tmp_path), adapter=str(adapter) + "/").get_engine() is tuned.get_engine()


def test_an_explicit_engine_wins(loads: list[str]) -> None:
    engine = RuleBasedEngine()
    assert ChatMoss(model="some/where", engine=engine).get_engine() is engine and loads == []


def test_the_registry_holds_engines_weakly(loads: list[str], tmp_path) -> None:
    chat = ChatMoss(model=str(tmp_path))
    chat.invoke("Hi")
    assert any(s.key[0] == str(tmp_path) for s in registry.live_slots())
    del chat
    gc.collect()
    assert not any(s.key[0] == str(tmp_path) for s in registry.live_slots())
    ChatMoss(model=str(tmp_path)).invoke("Hi")
    assert len(loads) == 2  # loaded again once nothing held it


def test_pickle_and_deepcopy_leave_the_engine_out(loads: list[str], tmp_path) -> None:
    chat = ChatMoss(model=str(tmp_path), temperature=0)
    chat.invoke("Hi")
    data = pickle.dumps(chat)
    assert b"RuleBasedEngine" not in data  # the engine is not in the pickle
    back = pickle.loads(data)
    assert back.temperature == 0 and back.get_engine() is chat.get_engine() and len(loads) == 1
    given = RuleBasedEngine()
    explicit = ChatMoss(engine=given)
    assert pickle.loads(pickle.dumps(explicit)).get_engine() is given  # found again in this process
    assert copy.deepcopy(explicit).get_engine() is given
    assert pickle.loads(pickle.dumps(MossLLM(engine=given))).get_engine() is given


# ---------------------------------------------------------------- context overflow


def test_a_long_prompt_raises_context_overflow() -> None:
    chat = ChatMoss(engine=RuleBasedEngine())
    with pytest.raises(ContextOverflowError, match="truncate='left'") as caught:
        chat.invoke("1," * 2500)  # 5,000 characters
    assert isinstance(caught.value, ContextWindowExceededError) and isinstance(caught.value, ValueError)


def _history(turns: int, words: int = 100, text: str = "x ") -> list:
    messages: list = []
    for i in range(turns):
        messages += [HumanMessage(f"question {i} " + text * words), AIMessage(f"answer {i}")]
    return messages


def test_truncate_left_drops_whole_oldest_turns() -> None:
    engine = ScriptedEngine(["fine"], context_window=1200)
    chat = ChatMoss(engine=engine, truncate="left", max_new_tokens=100)
    reply = chat.invoke([*_history(8), HumanMessage("last question")])
    prompt = engine.prompts[0]
    assert reply.content == "fine" and engine.count_tokens(prompt) + 100 <= 1200
    assert prompt.startswith(fmt.META_INSTRUCTION) and "question 7" in prompt and "question 0" not in prompt
    assert prompt.count(fmt.HUMAN) == prompt.count(f"{fmt.EOM}\n") + 1  # whole turns only
    assert reply.response_metadata["dropped_turns"] > 0
    with pytest.raises(ContextOverflowError):
        ChatMoss(engine=engine).invoke([*_history(8), HumanMessage("last question")])
    with pytest.raises(ContextOverflowError):  # the question alone does not fit: nothing more to drop
        ChatMoss(engine=engine, truncate="left").invoke("y " * 2000)


def test_mossllm_truncate_left_drops_whole_turns() -> None:
    engine = ScriptedEngine(["ok"], context_window=300)
    turns = "".join(f"{fmt.HUMAN}: q{i} {'x ' * 60}{fmt.EOH}\n{fmt.MOSS}: a{i}{fmt.EOM}\n" for i in range(6))
    prompt = "SYSTEM\n" + turns + f"{fmt.HUMAN}: last{fmt.EOH}\n{fmt.MOSS}:"
    assert MossLLM(engine=engine, truncate="left", max_new_tokens=50).invoke(prompt) == "ok"
    sent = engine.prompts[0]
    assert sent.startswith("SYSTEM\n<|Human|>: q") and sent.endswith(f"{fmt.HUMAN}: last{fmt.EOH}\n{fmt.MOSS}:")
    assert "q0 " not in sent and "q5 " in sent and engine.count_tokens(sent) + 50 <= 300


def test_summarization_middleware_with_a_fractional_trigger() -> None:
    from langchain.agents import create_agent
    from langchain.agents.middleware import SummarizationMiddleware

    engine = RuleBasedEngine()
    chat = ChatMoss(engine=engine)
    middleware = SummarizationMiddleware(model=chat, trigger=("fraction", 0.5), keep=("messages", 2))
    agent = create_agent(chat, [], middleware=[middleware])
    # About 1,600 tokens: over half the window (the trigger), and too long for one summary prompt.
    history = [*_history(6, words=45, text="the weather is nice today "), HumanMessage("and now?")]
    out = agent.invoke({"messages": history})
    texts = [m.text for m in out["messages"]]
    # The first summary prompt overflowed; LangChain's fallback (ContextOverflowError) cut it and retried.
    over = [p for p in engine.prompts if engine.count_tokens(p) + chat.max_new_tokens > engine.context_window]
    assert len(over) == 1 and len(engine.prompts) == 3
    assert len(out["messages"]) <= 4 and any("summary" in t.lower() for t in texts)
    assert out["messages"][-1].content.startswith("Hello!")


def test_remote_errors_are_langchain_model_errors() -> None:
    import httpx
    from langchain_core.exceptions import (
        ModelAPIError,
        ModelAuthenticationError,
        ModelConnectionError,
        ModelNotFoundError,
    )

    chat = ChatMoss(model="moss", base_url="http://127.0.0.1:9/v1", max_retries=0)
    engine = chat.get_engine()

    def serve(status: int) -> httpx.MockTransport:
        return httpx.MockTransport(lambda request: httpx.Response(status, json={"error": {"message": "refused"}}))

    kinds = [(401, ModelAuthenticationError), (404, ModelNotFoundError), (400, ModelInvalidRequestError)]
    for status, kind in [*kinds, (500, ModelAPIError)]:
        engine._client = httpx.Client(base_url=engine.base_url, transport=serve(status))
        with pytest.raises(kind, match=f"answered {status}"):
            chat.invoke("Hi")

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    engine._client = httpx.Client(base_url=engine.base_url, transport=httpx.MockTransport(refuse))
    with pytest.raises(ModelConnectionError, match="cannot connect"):
        chat.invoke("Hi")
