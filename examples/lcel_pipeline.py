"""ChatMoss composed inside a larger LCEL pipeline: prompt template -> MOSS -> parser, fanned out in parallel.

python examples/lcel_pipeline.py [--model PATH_OR_ID]
"""

from _common import chat_model, parse_args
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda, RunnableParallel

args = parse_args(__doc__.splitlines()[0])
chat = chat_model(args.model, max_new_tokens=64)
prompt = ChatPromptTemplate.from_messages([("human", "{greeting}! Who are you?")])
answer = prompt | chat | StrOutputParser()
pipeline = RunnableParallel(answer=answer, words=answer | RunnableLambda(lambda text: len(text.split())))
for result in pipeline.batch([{"greeting": "Hello"}, {"greeting": "Hi"}]):
    print(f"{result['words']:3d} words: {result['answer']}")
