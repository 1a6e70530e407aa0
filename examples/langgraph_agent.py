"""ChatMoss inside LangChain 1.x's ``create_agent``, with a custom tool and a LangGraph checkpointer.

MOSS was trained on its four plugins only; a custom tool gets a switch line of the same shape
(``- Word length: enabled. API: word_length(word)``), which a real MOSS model may or may not use well.

    python examples/langgraph_agent.py [--model PATH_OR_ID]
"""

from _common import chat_model, parse_args
from langchain.agents import create_agent
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver

from moss_agent.messages import from_messages
from moss_agent.tools import CalculatorTool


@tool
def word_length(word: str) -> int:
    """Count the letters of a word."""
    return len(word)


args = parse_args(__doc__.splitlines()[0])
agent = create_agent(chat_model(args.model), [CalculatorTool(), word_length], checkpointer=InMemorySaver())
config = {"configurable": {"thread_id": "example"}}
for question in ("What is 15 * 4?", "Thanks!"):
    state = agent.invoke({"messages": [{"role": "user", "content": question}]}, config)
    print(f"> {question}\n{state['messages'][-1].content}")

# The checkpointer's messages render back into MOSS turns.
conversation = from_messages(state["messages"])
print(f"[{len(conversation.turns)} turns in MOSS layout]")
print(conversation.turns[0].to_text(), end="")
