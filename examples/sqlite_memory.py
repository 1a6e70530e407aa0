"""Memory persisted in SQLite: run it twice and the second run remembers the first.

python examples/sqlite_memory.py --db chat.sqlite3 [--model PATH_OR_ID] [--question TEXT]
"""

from _common import chat_model, parse_args

from moss_agent.chains import MossConversationChain

args = parse_args(
    __doc__.splitlines()[0],
    **{"--db": {"default": "moss-memory.sqlite3"}, "--question": {"default": "Hello! Who are you?"}},
)
chain = MossConversationChain.from_sqlite(chat_model(args.model), args.db)
config = {"configurable": {"session_id": "example"}}
memory = chain.memory_for("example")
print(f"[{len(memory.turns())} earlier turns in {args.db}]")
reply = chain.invoke({"input": args.question}, config)
print(f"> {args.question}\n{reply.content}")
print(f"[{len(chain.memory_for('example').turns())} turns saved]")
