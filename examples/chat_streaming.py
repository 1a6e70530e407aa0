"""Plain chat with streaming: the reply is printed token by token as MOSS writes it.

python examples/chat_streaming.py [--model PATH_OR_ID] [--question TEXT]
"""

from _common import chat_model, parse_args

args = parse_args(__doc__.splitlines()[0], **{"--question": {"default": "Hello! Who are you?"}})
chat = chat_model(args.model)
print(f"> {args.question}")
for chunk in chat.stream(args.question):
    print(chunk.content, end="", flush=True)
print()
