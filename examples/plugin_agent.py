"""A MOSS plugin agent: inner thoughts, commands, real tools, and the reply, turn after turn.

python examples/plugin_agent.py [--model PATH_OR_ID]
"""

from _common import chat_model, parse_args, search_tool

from moss_agent import MossAgent
from moss_agent.tools import CalculatorTool, EquationSolverTool

args = parse_args(__doc__.splitlines()[0])
agent = MossAgent(chat_model(args.model), tools=[search_tool(args.model), CalculatorTool(), EquationSolverTool()])

if args.model:
    questions = ["What is 37 * 12 + 5?", "Solve 3x + 7 = 25 for me.", "Thank you!"]
else:  # questions the tiny demonstration model never saw, one conversation each (it learned short dialogues)
    from moss_agent.demo.questions import held_out_questions

    questions = [q.human for q in held_out_questions(1, kinds=("calculator", "solver", "chat"))]

for question in questions:
    if not args.model:
        agent.reset()
    turn = agent.invoke({"input": question})
    print(f"> {question}")
    print(f"  thoughts: {turn['inner_thoughts']}")
    print(f"  commands: {turn['commands']}")
    print(f"  results:  {turn['results'].strip()!r}")
    print(f"  reply:    {turn['output']}")
