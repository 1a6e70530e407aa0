"""A retrieval chain: documents go to MOSS in its Search plugin format; citations map back to documents.

python examples/retrieval_citations.py [--model PATH_OR_ID] [--question TEXT]
"""

from _common import chat_model, parse_args
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever

from moss_agent.chains import MossRetrievalChain
from moss_agent.demo.corpus import search_snippets


class KeywordRetriever(BaseRetriever):
    """A tiny retriever: the documents sharing the most words with the query."""

    documents: list[Document]

    def _get_relevant_documents(self, query: str, *, run_manager=None) -> list[Document]:
        words = set(query.lower().split())
        ranked = sorted(self.documents, key=lambda d: -len(words & set(d.page_content.lower().split())))
        return ranked[:3]


args = parse_args(__doc__.splitlines()[0], **{"--question": {"default": None}})
if args.question is None:  # a person of the demonstration corpus the demo model never saw
    from moss_agent.demo.questions import held_out_questions

    args.question = held_out_questions(1, kinds=("search",))[0].human
texts = search_snippets(args.question, k=3) or ["MOSS is a chat model developed by Fudan University."]
docs = [Document(t, metadata={"source": f"doc{i}.txt"}) for i, t in enumerate(texts, 1)]
chain = MossRetrievalChain(chat=chat_model(args.model), retriever=KeywordRetriever(documents=docs))
result = chain.invoke({"question": args.question})
print(f"> {args.question}\n{result['answer']}")
for citation in result["citations"]:
    print(f"  [{citation['n']}] {citation['document'].metadata['source']}")
print(f"[{len(result['documents'])} documents shown to MOSS]")
