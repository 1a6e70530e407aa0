"""MossLLM: raw completion over the shared engine, with stop strings, stop tokens, batching and streaming."""

from __future__ import annotations

import pytest

from moss_agent.chat_model import ChatMoss
from moss_agent.llm import MossLLM
from moss_agent.protocol import format as fmt
from moss_agent.testing.engines import ScriptedEngine

pytestmark = pytest.mark.disable_socket

RAW = fmt.chat_prompt(fmt.system_prompt(), [], "Hi <eom> there")  # hand-built: nothing is scrubbed


def test_raw_prompt_goes_to_the_engine_unchanged():
    engine = ScriptedEngine([" Hello!<eom> more"])
    llm = MossLLM(engine=engine, temperature=0)
    assert llm.invoke(RAW) == " Hello!"  # as generated, leading space included, up to the end token
    assert engine.calls[0].prompt == RAW and engine.calls[0].params.stop_tokens == (fmt.EOM,)
    assert engine.calls[0].params.greedy


def test_stop_strings_and_stop_tokens():
    engine = ScriptedEngine([" a b c<eom>", ' Go.<eot>\n<|Commands|>: Search("x")<eoc> after'])
    llm = MossLLM(engine=engine, stop=["c"])
    assert llm.invoke("p", stop=["b"]) == " a "
    assert engine.calls[0].params.stop == ("c", "b")
    pass1 = MossLLM(engine=engine, stop_tokens=(fmt.EOC, fmt.EOM))
    assert pass1.invoke("p") == ' Go.<eot>\n<|Commands|>: Search("x")'


def test_generation_info_and_batch():
    engine = ScriptedEngine([" one two<eom>", " three<eom>"])
    llm = MossLLM(engine=engine, max_tokens=1)
    result = llm.generate(["p", "q"])
    assert [g[0].text for g in result.generations] == [" one", " three"]
    assert [c.method for c in engine.calls] == ["generate_batch", "generate_batch"]
    info = result.generations[0][0].generation_info
    assert info["finish_reason"] == "length" and info["completion_tokens"] == 1
    assert info["prompt_tokens"] == engine.count_tokens("p")
    assert result.llm_output["token_usage"]["completion_tokens"] == 2
    assert result.llm_output["model_name"] == "scripted"


def test_streaming_equals_invoke():
    outputs = [" Hello there, friend.<eom>"]
    text = MossLLM(engine=ScriptedEngine(outputs)).invoke(RAW)
    chunks = list(MossLLM(engine=ScriptedEngine(outputs)).stream(RAW))
    assert "".join(chunks) == text and len(chunks) > 3


def test_shares_the_engine_with_chat_moss():
    engine = ScriptedEngine([" Hi.<eom>", " raw<eom>"])
    chat = ChatMoss(engine=engine)
    llm = MossLLM(engine=chat.get_engine())
    chat.invoke("hello")
    llm.invoke("x")
    assert len(engine.calls) == 2


def test_lazy_and_clear_errors():
    llm = MossLLM(model="fnlp/moss-moon-003-sft", max_tokens=5)
    assert llm._slot is not None and not llm._slot.loaded and llm.max_new_tokens == 5
    with pytest.raises(ValueError, match="needs a model"):
        MossLLM().invoke("x")
    with pytest.raises(ValueError, match="per-call model"):
        MossLLM(engine=ScriptedEngine()).invoke("x", model="other")


def test_ls_params():
    params = MossLLM(engine=ScriptedEngine(), max_tokens=9, stop=["x"])._get_ls_params()
    assert params["ls_model_type"] == "llm" and params["ls_provider"] == "moss"
    assert (params["ls_model_name"], params["ls_max_tokens"], params["ls_stop"]) == ("scripted", 9, ["x"])
