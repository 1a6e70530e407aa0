"""What several tool rounds cost and give: one agent loop per question, ``max_tool_rounds`` 1 against 3.

``python -m benchmarks.tool_rounds --model DIR`` (a MOSS checkpoint, e.g. the demonstration model) or ``--rules``
(the rule-based stand-in, to check the script). For each question the loop (what ``create_agent`` does) calls
ChatMoss with the calculator and the equation solver, runs the tools, and stops at a message without tool calls.
Printed per setting: tool rounds per question, how often MOSS called a tool again after results, how often the
reply holds the expected value, and generated tokens (the decision pass after results is what rounds add).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage

QUESTIONS: tuple[tuple[str, str], ...] = (
    ("What is 12*7?", "84"),
    ("Calculate 365*24", "8760"),
    ("What is 3.5 + 4.25?", "7.75"),
    ("Solve 2x + 6 = 10", "2"),
    ("Solve x^2 - 9 = 0", "3"),
    ("Please calculate 1024/16", "64"),
    ("Hello, who are you?", ""),
    ("Calculate 99*99 and then solve x + 1 = 3", "9801"),
)


@dataclass
class Tally:
    """Counts over the questions for one setting."""

    rounds: int = 0
    again: int = 0
    right: int = 0
    tokens: int = 0


def run_question(chat: object, tools: Sequence[object], question: str, limit: int = 6) -> list[BaseMessage]:
    """One agent loop; returns the messages (question, tool calls, tool answers, reply)."""
    by_name = {t.name: t for t in tools}  # type: ignore[attr-defined]
    bound = chat.bind_tools(tools)  # type: ignore[attr-defined]
    messages: list[BaseMessage] = [HumanMessage(question)]
    for _ in range(limit):
        reply = bound.invoke(messages)
        messages.append(reply)
        if not reply.tool_calls:
            break
        messages += [by_name[c["name"]].invoke(c) for c in reply.tool_calls]
    return messages


def measure(make_chat: object, rounds: int) -> Tally:
    """Run every question with ``max_tool_rounds=rounds``."""
    from moss_agent.tools import CalculatorTool, EquationSolverTool

    tally = Tally()
    tools = [CalculatorTool(), EquationSolverTool()]
    for question, expected in QUESTIONS:
        chat = make_chat(rounds)  # type: ignore[operator]
        messages = run_question(chat, tools, question)
        ai = [m for m in messages if isinstance(m, AIMessage)]
        used = sum(1 for m in ai if m.tool_calls)
        tally.rounds += used
        tally.again += int(used > 1)
        tally.right += int(expected in str(ai[-1].content))
        tally.tokens += sum((m.usage_metadata or {}).get("output_tokens", 0) for m in ai)
    return tally


def main(argv: Sequence[str] | None = None) -> None:
    """Print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", help="a MOSS checkpoint directory")
    where.add_argument("--rules", action="store_true", help="the rule-based stand-in model")
    args = parser.parse_args(argv)

    from moss_agent.chat_model import ChatMoss

    if args.rules:
        from moss_agent.testing.scripted_rules import RuleBasedEngine

        engine = RuleBasedEngine()
    else:
        engine = ChatMoss(model=args.model, device_map="cpu").get_engine()

    def make_chat(rounds: int) -> ChatMoss:
        return ChatMoss(engine=engine, do_sample=False, max_tool_rounds=rounds, max_tokens=64)

    n = len(QUESTIONS)
    print(f"{n} questions, greedy; model: {args.model or 'rule-based stand-in'}")
    print(f"{'max_tool_rounds':>15} {'rounds/q':>9} {'called again':>13} {'right':>6} {'out tokens':>11}")
    for rounds in (1, 3):
        t = measure(make_chat, rounds)
        print(f"{rounds:>15} {t.rounds / n:>9.2f} {t.again:>13} {t.right:>6} {t.tokens:>11}")


if __name__ == "__main__":
    main()
