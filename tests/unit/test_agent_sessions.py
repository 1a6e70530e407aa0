"""MossAgent inputs (strings, messages, prompt values), session ids from config, batch without mixing."""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.prompts import ChatPromptTemplate

from moss_agent.agent import MossAgent
from moss_agent.chat_model import ChatMoss
from moss_agent.protocol import format as fmt
from moss_agent.testing.scripted_rules import RuleBasedEngine
from moss_agent.tools import CalculatorTool


@pytest.fixture(autouse=True)
def _no_network() -> object:
    import pytest_socket

    pytest_socket.disable_socket(allow_unix_socket=True)  # asyncio's event loop needs a socketpair
    yield
    pytest_socket.enable_socket()


def _agent(**kwargs: object) -> MossAgent:
    return MossAgent(ChatMoss(engine=RuleBasedEngine()), tools=[CalculatorTool()], **kwargs)


def test_a_list_of_messages_answers() -> None:
    out = _agent().invoke([HumanMessage("What is 2*3?")])
    assert "6" in out["output"] and out["commands"] == 'Calculate("2*3")'


@pytest.mark.parametrize(
    "value",
    [
        "What is 2*3?",
        {"input": "What is 2*3?"},
        HumanMessage("What is 2*3?"),
        [("human", "What is 2*3?")],
        {"messages": [HumanMessage("What is 2*3?")]},
        ChatPromptTemplate.from_messages([("human", "What is {q}?")]).invoke({"q": "2*3"}),
    ],
    ids=["str", "input", "message", "tuples", "messages", "prompt_value"],
)
def test_every_input_form(value: object) -> None:
    agent = _agent()
    out = agent.invoke(value)
    assert out["input"] == "What is 2*3?" and "6" in out["output"]
    assert len(agent.history) == 1


def test_bad_inputs_say_what_is_wrong() -> None:
    agent = _agent()
    with pytest.raises(ValueError, match="'input' \\(or 'messages'\\) key"):
        agent.invoke({"question_text": "hi"})
    with pytest.raises(ValueError, match="must end with a HumanMessage"):
        agent.invoke([HumanMessage("hi"), AIMessage("hello")])
    with pytest.raises(ValueError, match="MOSS has no vision"):
        agent.invoke([HumanMessage([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}])])


def test_earlier_messages_start_the_conversation_and_system_messages_add_instructions() -> None:
    engine = RuleBasedEngine()
    agent = MossAgent(ChatMoss(engine=engine), tools=[CalculatorTool()])
    agent.invoke(
        [
            SystemMessage("Answer briefly."),
            HumanMessage("Hi, I am Ann."),
            AIMessage("Hello Ann!"),
            HumanMessage("What is 2*3?"),
        ]
    )
    prompt = engine.prompts[0]
    assert "Answer briefly.\n" in prompt and f"{fmt.HUMAN}: Hi, I am Ann.{fmt.EOH}" in prompt and "Hello Ann!" in prompt
    assert [t.human for t in agent.history] == ["Hi, I am Ann.", "What is 2*3?"]
    with pytest.raises(ValueError, match="already holds 2 turns"):
        agent.invoke([HumanMessage("Hi"), AIMessage("Hello"), HumanMessage("again")])


def test_session_ids_from_config_keep_conversations_apart() -> None:
    agent = _agent()
    agent.invoke("I am Ann.", config={"configurable": {"session_id": "a"}})
    agent.invoke("I am Bob.", config={"configurable": {"session_id": "b"}})
    agent.invoke("What is 2*3?", config={"configurable": {"session_id": "a"}})
    assert [t.human for t in agent.session("a").turns()] == ["I am Ann.", "What is 2*3?"]
    assert [t.human for t in agent.session("b").turns()] == ["I am Bob."]
    assert agent.history == []  # the agent's own conversation is untouched
    agent.reset("a")
    assert agent.session("a").turns() == [] and len(agent.session("b").turns()) == 1


def test_memory_factory_builds_each_sessions_memory() -> None:
    from moss_agent.memory import BufferMemory

    made: dict[str, BufferMemory] = {}

    def factory(sid: str) -> BufferMemory:
        made[sid] = BufferMemory()
        return made[sid]

    agent = _agent(memory_factory=factory)
    agent.invoke("Hi", config={"configurable": {"session_id": "s1"}})
    assert list(made) == ["s1"] and [t.human for t in made["s1"].turns()] == ["Hi"]


def test_batch_never_mixes_sessions_and_keeps_each_sessions_order() -> None:
    engine = RuleBasedEngine()
    agent = MossAgent(ChatMoss(engine=engine))
    inputs = [f"message {i}" for i in range(8)]
    configs = [{"configurable": {"session_id": f"s{i % 2}"}} for i in range(8)]
    outs = agent.batch(inputs, configs)
    assert [o["input"] for o in outs] == inputs
    assert [t.human for t in agent.session("s0").turns()] == ["message 0", "message 2", "message 4", "message 6"]
    assert [t.human for t in agent.session("s1").turns()] == ["message 1", "message 3", "message 5", "message 7"]
    # Without session ids, one conversation, in input order.
    plain = MossAgent(ChatMoss(engine=RuleBasedEngine()))
    plain.batch(["one", "two", "three", "four"])
    assert [t.human for t in plain.history] == ["one", "two", "three", "four"]


async def test_abatch_and_errors_are_returned_when_asked() -> None:
    agent = _agent()
    outs = await agent.abatch(["What is 2*3?", {"bad": 1}], return_exceptions=True)
    assert "6" in outs[0]["output"] and isinstance(outs[1], ValueError)


def test_agent_inside_lcel() -> None:
    from langchain_core.runnables import RunnableLambda

    chain = (
        ChatPromptTemplate.from_messages([("human", "What is {a}*{b}?")])
        | _agent()
        | RunnableLambda(lambda o: o["output"])
    )
    assert "6" in chain.invoke({"a": 2, "b": 3})


def test_agent_truncate_left() -> None:
    engine = RuleBasedEngine(context_window=700)
    agent = MossAgent(ChatMoss(engine=engine, max_new_tokens=64), truncate="left")
    for i in range(8):
        agent.invoke(f"question {i} " + "the weather is nice today " * 8)
    assert len(agent.history) == 8  # all kept in the history; only the prompt leaves the oldest out
    assert "question 0" not in engine.prompts[-1] and "question 7" in engine.prompts[-1]
