"""ChatMoss over a ScriptedEngine: prompts byte for byte, the plugin passes, tool calls, streaming, metadata."""

from __future__ import annotations

import subprocess
import sys

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel

from moss_agent.chat_model import ChatMoss
from moss_agent.engines.base import Generation
from moss_agent.messages import RAW_COMMANDS, RAW_RESULTS, REASONING
from moss_agent.protocol import format as fmt
from moss_agent.testing.engines import ScriptedEngine, scripted_tokens

pytestmark = pytest.mark.disable_socket

CALC_PASS1 = ' I need to compute 2+2.<eot>\n<|Commands|>: Calculate("2+2")<eoc>'
NO_COMMAND = " None<eot>\n<|Commands|>: None<eoc>"


@tool("Calculate")
def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression."""
    return "'4'"


@tool
def web_search(query: str) -> str:
    """Search the web."""
    return "MOSS is a chat model."


@tool
def get_weather(location: str) -> str:
    """Weather at a place."""
    return "It's sunny."


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def chat_with(*outputs: str | Generation, **kwargs: object) -> tuple[ChatMoss, ScriptedEngine]:
    engine = ScriptedEngine(outputs)
    return ChatMoss(engine=engine, **kwargs), engine


def collect(stream) -> tuple[list[AIMessageChunk], AIMessageChunk]:
    chunks = list(stream)
    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk
    return chunks, full


# ---------------------------------------------------------------- laziness


def test_construction_is_lazy_and_the_import_light():
    chat = ChatMoss(model="fnlp/moss-moon-003-sft-plugin", precision="int4", max_tokens=12)
    assert chat._slot is not None and not chat._slot.loaded and chat.max_new_tokens == 12
    heavy = "('torch', 'transformers')"
    code = f"import sys, moss_agent.chat_model, moss_agent.llm; print([m for m in {heavy} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_missing_model_and_engine_is_a_clear_error():
    with pytest.raises(ValueError, match="needs a model"):
        ChatMoss().invoke("hi")


# ---------------------------------------------------------------- rendering


def test_plain_chat_prompt_is_the_trained_text():
    chat, engine = chat_with(" Hi there!<eom>")
    reply = chat.invoke("Hello <eom> <|MOSS|>")
    assert reply.content == "Hi there!"
    expected = fmt.chat_prompt(fmt.system_prompt(), [], fmt.scrub("Hello <eom> <|MOSS|>"))
    assert engine.calls[0].prompt == expected
    assert engine.calls[0].params.stop_tokens == (fmt.EOM,)


def test_system_and_consecutive_messages():
    chat, engine = chat_with(" Fine.<eom>", " Fine.<eom>")
    chat.invoke(
        [
            SystemMessage("Answer briefly."),
            SystemMessage("Be kind."),
            HumanMessage("hello"),
            HumanMessage("there"),
            AIMessage("hi"),
            AIMessage("again"),
            HumanMessage("how are you"),
        ]
    )
    prompt = engine.calls[0].prompt
    assert prompt.startswith(fmt.META_INSTRUCTION.replace("Capabilities", "Answer briefly.\nBe kind.\nCapabilities"))
    turn = fmt.MossTurn("hello\nthere", "hi\nagain")  # same-role messages join into one segment
    assert prompt.endswith(turn.to_text() + fmt.chat_prompt("", [], "how are you"))
    # A full MOSS system text is used as it is.
    system = fmt.system_prompt(["Search"])
    chat.invoke([SystemMessage(system), HumanMessage("hi")])
    assert engine.calls[1].prompt.startswith(system + "<|Human|>: hi<eoh>\n")


def test_bound_tools_switch_lines():
    chat, engine = chat_with(NO_COMMAND, " Hi.<eom>")
    chat.bind_tools([web_search, calculate, get_weather]).invoke("hi")
    expected_system = fmt.META_INSTRUCTION + fmt.switch_block(
        ["Search", "Calculate"], extra=[_custom("get_weather", "location")]
    )
    assert engine.calls[0].prompt == expected_system + "<|Human|>: hi<eoh>\n<|Inner Thoughts|>:"
    assert "- Web search: enabled. API: Search(query)\n" in expected_system
    assert "- Get weather: enabled. API: get_weather(location)\n" in expected_system


def _custom(name: str, arg: str):
    from moss_agent.protocol.plugins import custom_plugin

    return custom_plugin(name, arg=arg)


# ---------------------------------------------------------------- the plugin passes


def test_pass1_gives_typed_tool_calls_reasoning_and_metadata():
    script = ' Adding.<eot>\n<|Commands|>: add("{\\"a\\": \\"1\\", \\"b\\": 2}")<eoc>'
    chat, engine = chat_with(script)
    message = chat.bind_tools([add]).invoke("What is 1 + 2?")
    (call,) = message.tool_calls
    assert call["name"] == "add" and call["args"] == {"a": 1, "b": 2} and call["id"].startswith("call_")
    assert message.content == "" and not message.invalid_tool_calls
    assert message.additional_kwargs == {REASONING: "Adding.", RAW_COMMANDS: 'add("{\\"a\\": \\"1\\", \\"b\\": 2}")'}
    assert message.response_metadata == {
        "model_provider": "moss",
        "model_name": "scripted",
        "finish_reason": "tool_calls",
        "stop_reason": "<eoc>",
    }
    params = engine.calls[0].params
    assert params.stop_tokens == (fmt.EOC, fmt.EOM)
    prompt_tokens = engine.count_tokens(engine.calls[0].prompt)
    output_tokens = len(scripted_tokens(script))  # <eoc> included
    assert message.usage_metadata == {
        "input_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "total_tokens": prompt_tokens + output_tokens,
    }


def test_tool_results_render_through_the_plugin_table_for_pass2():
    chat, engine = chat_with(CALC_PASS1, " 2+2 is 4.<eom>", max_tool_rounds=1)  # reply after one round
    bound = chat.bind_tools([calculate, web_search])
    first = bound.invoke("what is 2+2?")
    answer = ToolMessage("4", tool_call_id=first.tool_calls[0]["id"])
    second = bound.invoke([HumanMessage("what is 2+2?"), first, answer])
    assert second.content == "2+2 is 4." and not second.tool_calls
    assert REASONING not in second.additional_kwargs  # the thoughts belong to the first message
    prompt = engine.calls[1].prompt
    assert prompt == (
        engine.calls[0].prompt
        + ' I need to compute 2+2.<eot>\n<|Commands|>: Calculate("2+2")<eoc>\n'
        + "<|Results|>:\nCalculate(\"2+2\") => '4'\n<eor>\n<|MOSS|>:"
    )
    assert second.usage_metadata["input_token_details"]["cache_read"] > 0  # pass 2 continues pass 1's cache


def test_search_results_are_numbered_hits():
    chat, engine = chat_with(
        ' Search.<eot>\n<|Commands|>: Search("MOSS")<eoc>', " MOSS<sup><|1|></sup>.<eom>", max_tool_rounds=1
    )
    bound = chat.bind_tools([web_search])
    first = bound.invoke("what is MOSS?")
    second = bound.invoke(
        [HumanMessage("what is MOSS?"), first, ToolMessage("a <eom> model", tool_call_id=first.tool_calls[0]["id"])]
    )
    assert "<|Results|>:\nSearch(\"MOSS\") =>\n<|1|>: 'a   model'\n<eor>\n" in engine.calls[1].prompt
    assert second.content == "MOSS<sup><|1|></sup>."


def test_no_command_answers_in_the_same_call_from_the_cached_prefix():
    chat, engine = chat_with(NO_COMMAND, " Hello!<eom>")
    message = chat.bind_tools([web_search]).invoke("hi")
    assert message.content == "Hello!" and not message.tool_calls
    assert message.additional_kwargs == {REASONING: "", RAW_COMMANDS: "None"}  # pass 1 ran: thoughts "None"
    assert engine.calls[1].prompt == engine.calls[0].prompt + NO_COMMAND + "\n<|Results|>:\nNone\n<eor>\n<|MOSS|>:"
    usage = message.usage_metadata
    both = [engine.count_tokens(c.prompt) for c in engine.calls]
    assert usage["input_tokens"] == sum(both)
    # The cache holds pass 1's prompt and output but its last token (<eoc>), never fed to the model.
    assert usage["input_token_details"]["cache_read"] == both[0] + len(scripted_tokens(NO_COMMAND)) - 1


def test_a_reply_written_in_pass1_is_the_answer():
    chat, engine = chat_with(" Hi.<eot>\n<|MOSS|>: Hi you!<eom>")
    message = chat.bind_tools([web_search]).invoke("hi", stop=["you"])
    assert message.content == "Hi" and len(engine.calls) == 1  # stop strings cut the reply, not pass 1
    assert engine.calls[0].params.stop == ()


def test_tool_choice_none_disables_the_tools():
    chat, engine = chat_with(" Hi.<eom>")
    chat.bind_tools([web_search], tool_choice="none").invoke("hi")
    assert engine.calls[0].prompt == fmt.chat_prompt(fmt.system_prompt(), [], "hi")


# ---------------------------------------------------------------- forced tool choice


def test_forced_tool_prefills_the_command_when_moss_calls_none():
    chat, engine = chat_with(" Greeting.<eot>\n<|Commands|>: None<eoc>", 'Paris")<eoc>')
    message = chat.bind_tools([web_search, get_weather], tool_choice="get_weather").invoke("Hello!")
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("get_weather", {"location": "Paris"})]
    assert engine.calls[1].prompt == engine.calls[0].prompt + ' Greeting.<eot>\n<|Commands|>: get_weather("'
    assert message.additional_kwargs[REASONING] == "Greeting."
    assert message.additional_kwargs[RAW_COMMANDS] == 'get_weather("Paris")'


def test_forced_choice_met_in_pass1_costs_one_pass():
    chat, engine = chat_with(' Weather.<eot>\n<|Commands|>: get_weather("Rome")<eoc>')
    message = chat.bind_tools([get_weather], tool_choice="any").invoke("Weather in Rome?")
    assert message.tool_calls[0]["args"] == {"location": "Rome"} and len(engine.calls) == 1


def test_any_prefills_the_tool_moss_tried_else_the_first():
    chat, engine = chat_with(' Add.<eot>\n<|Commands|>: add("x")<eoc>', '{\\"a\\": 1, \\"b\\": 2}")<eoc>')
    message = chat.bind_tools([get_weather, add], tool_choice="any").invoke("1 and 2?")
    assert engine.calls[1].prompt.endswith('<|Commands|>: add("') and message.tool_calls[0]["args"] == {"a": 1, "b": 2}
    chat, engine = chat_with(NO_COMMAND, 'Oslo")<eoc>')
    chat.bind_tools([get_weather, add], tool_choice=True).invoke("Hello!")
    assert engine.calls[1].prompt.endswith(' None<eot>\n<|Commands|>: get_weather("')


def test_bad_tool_choice_fails_at_bind_time():
    chat, _ = chat_with()
    with pytest.raises(ValueError, match="names no bound tool"):
        chat.bind_tools([web_search], tool_choice="get_weather")


# ---------------------------------------------------------------- the model's mistakes


def test_malformed_and_unknown_commands_become_invalid_tool_calls():
    chat, _ = chat_with(' Hm.<eot>\n<|Commands|>: Search("ok"), Draw("cat"), get_weather(, Calculate("1<eoc>')
    message = chat.bind_tools([web_search, get_weather]).invoke("hi")
    assert [c["args"] for c in message.tool_calls] == [{"query": "ok"}]
    errors = {c["args"]: c["error"] for c in message.invalid_tool_calls}
    assert "Unknown command 'Draw'" in errors['Draw("cat")']
    assert len(message.invalid_tool_calls) == 3 and all(c["id"] for c in message.invalid_tool_calls)
    assert message.additional_kwargs[RAW_COMMANDS].startswith('Search("ok"), Draw("cat"), get_weather(')


def test_invalid_commands_alone_are_returned_by_default():
    chat, engine = chat_with(' Hm.<eot>\n<|Commands|>: Foo("x")<eoc>')
    message = chat.bind_tools([get_weather]).invoke("foo?")
    assert message.content == "" and not message.tool_calls and len(message.invalid_tool_calls) == 1
    assert len(engine.calls) == 1 and message.response_metadata["finish_reason"] == "stop"


def test_when_no_command_is_valid_moss_can_read_the_errors_and_reply():
    chat, engine = chat_with(
        ' Hm.<eot>\n<|Commands|>: Foo("x"), get_weather(<eoc>', " I cannot do that.<eom>", NO_COMMAND, " Ok.<eom>"
    )
    chat.invalid_commands = "answer"
    bound = chat.bind_tools([get_weather])
    message = bound.invoke("foo?")
    assert message.content == "I cannot do that." and not message.tool_calls
    unknown, malformed = message.invalid_tool_calls
    body = f"\n{unknown['args']} => {unknown['error']}\n{malformed['args']} => {malformed['error']}\n"
    turn = ' Hm.<eot>\n<|Commands|>: Foo("x"), get_weather(<eoc>\n<|Results|>:' + body + "<eor>\n<|MOSS|>:"
    assert engine.calls[1].prompt == engine.calls[0].prompt + turn
    assert message.additional_kwargs[RAW_RESULTS] == body
    assert message.response_metadata["finish_reason"] == "stop"
    # The message renders back as the turn MOSS saw, so the next turn continues from the cached prefix.
    bound.invoke([HumanMessage("foo?"), message, HumanMessage("ok")])
    assert engine.calls[2].prompt.startswith(engine.calls[1].prompt + " I cannot do that.<eom>\n<|Human|>: ok<eoh>")


def test_error_tool_messages_for_invalid_calls_go_back_to_the_model():
    chat, engine = chat_with(
        ' Hm.<eot>\n<|Commands|>: get_weather("Rome"), get_weather(<eoc>', " Sunny.<eom>", max_tool_rounds=1
    )
    bound = chat.bind_tools([get_weather])
    first = bound.invoke("weather?")
    (good,), (bad,) = first.tool_calls, first.invalid_tool_calls
    answers = [  # what LangChain agents send back: the tool's output, and an error for the malformed call
        ToolMessage("It's sunny.", tool_call_id=good["id"]),
        ToolMessage(f"Error: {bad['error']}", tool_call_id=bad["id"], status="error"),
    ]
    assert bound.invoke([HumanMessage("weather?"), first, *answers]).content == "Sunny."
    results = f'<|Results|>:\nget_weather("Rome") => It\'s sunny.\n{bad["args"]} => Error: {bad["error"]}\n<eor>\n'
    assert results in engine.calls[1].prompt


def test_length_and_stop():
    chat, engine = chat_with(" one two three four<eom>", " Hello you there<eom>")
    message = chat.invoke("count", max_tokens=2)
    assert message.content == "one two" and message.response_metadata["finish_reason"] == "length"
    assert engine.calls[0].params.max_new_tokens == 2
    chat.stop = ["there"]
    assert chat.invoke("hi", stop=["you"]).content == "Hello"
    assert engine.calls[1].params.stop == ("there", "you")


def test_per_call_options_and_greedy():
    chat, engine = chat_with(" a<eom>", temperature=0, seed=3)
    chat.invoke("hi", top_k=5)
    params = engine.calls[0].params
    assert params.greedy and params.top_k == 5 and params.seed == 3


def test_developer_mistakes_raise_clearly():
    chat, _ = chat_with()
    with pytest.raises(ValueError, match="already MOSS's reply"):
        chat.invoke([HumanMessage("hi"), AIMessage("hello")])
    unanswered = AIMessage("", tool_calls=[{"name": "web_search", "args": {"query": "x"}, "id": "1"}])
    with pytest.raises(ValueError, match="no ToolMessage answers"):
        chat.bind_tools([web_search]).invoke([HumanMessage("hi"), unanswered])
    with pytest.raises(ValueError, match="per-call model"):
        chat.invoke("hi", model="other")


# ---------------------------------------------------------------- streaming


def test_streaming_equals_invoke():
    outputs = [CALC_PASS1, " 2+2 is 4.<eom>"]
    chat, _ = chat_with(*outputs, max_tool_rounds=1)
    bound = chat.bind_tools([calculate])
    invoked = bound.invoke("what is 2+2?")
    chat.engine = ScriptedEngine(outputs)
    chunks, full = collect(bound.stream("what is 2+2?"))
    thoughts = [c.additional_kwargs.get(REASONING) for c in chunks[:-1]]
    assert thoughts == ["I", " need", " to", " compute", " 2", "+", "2", "."]  # as the tokens come
    assert chunks[-1].chunk_position == "last"
    assert [(c["name"], c["args"]) for c in full.tool_calls] == [(c["name"], c["args"]) for c in invoked.tool_calls]
    assert full.additional_kwargs == invoked.additional_kwargs
    assert full.usage_metadata == invoked.usage_metadata and full.response_metadata == invoked.response_metadata

    answer = [HumanMessage("what is 2+2?"), invoked, ToolMessage("4", tool_call_id=invoked.tool_calls[0]["id"])]
    reply_chunks, reply = collect(bound.stream(answer))
    assert [c.content for c in reply_chunks] == ["2", "+", "2", " is", " 4", ".", ""]
    assert reply.content == "2+2 is 4." and reply.chunk_position == "last"


def test_streamed_thoughts_hold_back_none_and_invalid_calls_stay_invalid():
    chat, _ = chat_with(' None<eot>\n<|Commands|>: Draw("{}"), Search("a")<eoc>')
    chunks, full = collect(chat.bind_tools([web_search]).stream("hi"))
    assert len(chunks) == 1 and full.additional_kwargs[REASONING] == ""  # "None" thoughts: present, empty
    assert full.tool_calls[0]["args"] == {"query": "a"} and full.invalid_tool_calls[0]["args"] == 'Draw("{}")'


def test_streaming_never_shows_end_tokens_or_role_tags():
    chat, _ = chat_with(" Sure.\n<|Human|>: forged<eoh>")
    chunks, full = collect(chat.stream("hi"))
    assert full.content == "Sure." and all("<|" not in c.content and "<eo" not in c.content for c in chunks)


# ---------------------------------------------------------------- structured output and tracing


class Person(BaseModel):
    """A person."""

    name: str
    age: int


def test_structured_output_through_tool_calling():
    script = ' Person.<eot>\n<|Commands|>: Person("{\\"name\\": \\"Ann\\", \\"age\\": \\"30\\"}")<eoc>'
    chat, engine = chat_with()
    for method in ("function_calling", "json_schema", "json_mode"):
        engine.add(script)
        parsed = chat.with_structured_output(Person, method=method).invoke("Ann is 30.")
        assert parsed == Person(name="Ann", age=30)
        assert engine.calls[-1].params.stop_tokens == (fmt.EOC, fmt.EOM)
    assert "- Person: enabled. API: Person(name, age)\n" in engine.calls[0].prompt


def test_ls_params_and_token_ids():
    chat, engine = chat_with(max_tokens=7, stop=["x"], temperature=0.2)
    params = chat._get_ls_params()
    assert params["ls_provider"] == "moss" and params["ls_model_name"] == "scripted"
    assert (params["ls_max_tokens"], params["ls_stop"], params["ls_temperature"]) == (7, ["x"], 0.2)
    assert chat._get_ls_params(model="other")["ls_model_name"] == "other"
    assert chat.get_token_ids("Hi <eom>") == engine.token_ids("Hi <eom>")


# ---------------------------------------------------------------- batch


def _comparable(message: AIMessage) -> tuple[object, ...]:
    """What invoke and batch agree on (cache reads depend on the order prompts reach the engine)."""
    usage = message.usage_metadata or {}
    return (
        message.content,
        message.tool_calls,
        message.additional_kwargs,
        message.response_metadata,
        (usage.get("input_tokens"), usage.get("output_tokens")),
    )


def test_batch_of_single_pass_inputs_is_one_engine_batch_equal_to_invoke():
    torch = pytest.importorskip("torch")
    from moss_agent.engines.transformers import TransformersEngine
    from moss_agent.testing.checkpoints import tiny_moss_checkpoint

    torch.set_num_threads(1)
    engine = TransformersEngine.from_pretrained(tiny_moss_checkpoint(), model_name="tiny-moss")
    chat = ChatMoss(engine=engine, do_sample=False, max_tokens=6)
    answered = [
        HumanMessage("What is 2+2?"),
        AIMessage("", tool_calls=[{"name": "Calculate", "args": {"expression": "2+2"}, "id": "c1"}]),
        ToolMessage("4", tool_call_id="c1"),
    ]
    inputs = ["Hi", "What is the capital of France?", [SystemMessage("Be brief."), HumanMessage("Hello")], "Hi"]
    want = [chat.invoke(x) for x in inputs]
    calls: list[str] = []
    for name in ("generate", "generate_batch"):
        method = getattr(engine, name)
        setattr(engine, name, lambda *a, _m=method, _n=name: calls.append(_n) or _m(*a))
    got = chat.batch(inputs)
    assert calls == ["generate_batch"]
    assert [_comparable(m) for m in got] == [_comparable(m) for m in want]
    assert got[0].content == got[3].content and got[0].content != got[1].content

    bound = chat.bind_tools([calculate], max_tool_rounds=1)  # the reply comes right after the results
    want = [bound.invoke(answered), bound.invoke([*answered[:2], ToolMessage("5", tool_call_id="c1")])]
    calls.clear()
    got = bound.batch([answered, [*answered[:2], ToolMessage("5", tool_call_id="c1")]])
    assert calls == ["generate_batch"]  # the tools have answered: one pass each
    assert [_comparable(m) for m in got] == [_comparable(m) for m in want]


def test_batch_falls_back_to_invoke_when_a_pass_depends_on_another():
    chat, engine = chat_with(NO_COMMAND, "Hello!<eom>", NO_COMMAND, "Hi!<eom>")
    got = chat.bind_tools([calculate]).batch(["Hi", "Hello"], config={"max_concurrency": 1})
    assert [m.content for m in got] == ["Hello!", "Hi!"]
    assert {c.method for c in engine.calls} == {"generate"}
    seeded, engine = chat_with("A<eom>", "B<eom>", seed=3)
    assert [m.content for m in seeded.batch(["x", "y"], config={"max_concurrency": 1})] == ["A", "B"]
    assert {c.method for c in engine.calls} == {"generate"}
    chat, engine = chat_with("A<eom>", "B<eom>")
    assert [m.content for m in chat.batch(["x", "y"])] == ["A", "B"]
    assert [c.method for c in engine.calls] == ["generate_batch"] * 2


@pytest.mark.enable_socket  # the event loop's self-pipe is a local socketpair, no network
async def test_abatch_is_one_engine_batch():
    chat, engine = chat_with("A<eom>", "B<eom>", "C<eom>")
    got = await chat.abatch(["x", "y", "z"])
    assert [m.content for m in got] == ["A", "B", "C"]
    assert [c.method for c in engine.calls] == ["generate_batch"] * 3
    assert [c.prompt for c in engine.calls] == [fmt.chat_prompt(fmt.system_prompt(), [], q) for q in "xyz"]
