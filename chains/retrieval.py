r"""Retrieval-augmented answers in MOSS's own Search plugin format, with citations mapped to documents.

MOSS's plugin model was trained to read search hits and cite them as ``<sup><|N|></sup>``. This chain feeds
a LangChain retriever's documents to it in exactly that form, as the second plugin pass::

    <|Human|>: Who develops MOSS?<eoh>
    <|Inner Thoughts|>: To answer this question, I need to search for relevant information.<eot>
    <|Commands|>: Search("Who develops MOSS?")<eoc>
    <|Results|>:
    Search("Who develops MOSS?") =>
    <|1|>: 'MOSS is developed by Fudan University ...'
    <eor>
    <|MOSS|>: MOSS is developed by Fudan University<sup><|1|></sup>.<eom>

and maps each cited number back to its source ``Document``.

Example:
    .. code-block:: python

        from moss_agent import ChatMoss
        from moss_agent.chains import MossRetrievalChain

        chain = MossRetrievalChain(chat=ChatMoss(model="fnlp/moss-moon-003-sft-plugin"), retriever=retriever)
        out = chain.invoke({"question": "Who develops MOSS?"})
        out["answer"]                                  # "MOSS is developed by Fudan University[1]."
        out["citations"][0]["document"].metadata       # the source of hit 1
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any, Literal

from langchain_core.callbacks import CallbackManagerForChainRun
from langchain_core.documents import Document
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import RunnableConfig, RunnableSerializable, ensure_config
from langchain_core.runnables.config import patch_config
from pydantic import ConfigDict, Field

from moss_agent.chains.conversation import input_text
from moss_agent.chat_model import ChatMoss
from moss_agent.messages import REASONING, message_text
from moss_agent.protocol import format as fmt
from moss_agent.protocol import plugins as _plugins

__all__ = ["MossRetrievalChain", "bracket_citations", "find_citations"]

logger = logging.getLogger(__name__)

_SEARCH = _plugins.WEB_SEARCH
SEARCH_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": str(_SEARCH.api),
        "description": "Search the documents. Output: numbered snippets, to be cited as <|N|>.",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string", "description": "What to search for."}},
            "required": [str(_SEARCH.arg)],
        },
    },
}
"""The Search tool ChatMoss is bound to: MOSS's trained ``Search(query)`` switch."""

THOUGHTS_EN = "To answer this question, I need to search for relevant information."
THOUGHTS_ZH = "为了回答这个问题，需要搜索一下相关信息。"
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")

# A citation as the data writes it: <sup><|1|></sup>, also <sup><|1|><|2|></sup> and <sup><|1|>, <|2|></sup>.
_CITATION = re.compile(r"<sup>((?:\s*,?\s*<\|\d+\|>)+)\s*</sup>")
_NUMBER = re.compile(r"<\|(\d+)\|>")


def find_citations(text: str) -> list[int]:
    """The hit numbers a reply cites in ``<sup><|N|></sup>`` marks, distinct, in order of first citation."""
    numbers = (int(n) for mark in _CITATION.finditer(text) for n in _NUMBER.findall(mark.group(1)))
    return list(dict.fromkeys(numbers))


def bracket_citations(text: str, valid: int | None = None) -> str:
    """Write ``<sup><|1|></sup>`` marks as ``[1]`` (``<sup><|1|>, <|2|></sup>`` as ``[1][2]``).

    Args:
        text: The reply.
        valid: The number of hits shown; a mark citing a number outside ``1..valid`` is dropped (it points
            nowhere). None keeps every number.
    """

    def mark(match: re.Match[str]) -> str:
        numbers = [int(n) for n in _NUMBER.findall(match.group(1))]
        return "".join(f"[{n}]" for n in numbers if valid is None or 1 <= n <= valid)

    return _CITATION.sub(mark, text)


def default_thoughts(question: str) -> str:
    """Inner thoughts for a search the chain decided on, in the question's language (English or Chinese)."""
    return THOUGHTS_ZH if _CJK.search(question) else THOUGHTS_EN


class MossRetrievalChain(RunnableSerializable[dict[str, Any] | str, dict[str, Any]]):
    """A retriever's documents answered by MOSS through its Search plugin format, with citations.

    Input: ``{"question": str}`` (or ``input``/``query``, or a plain str). Output::

        {"question": str, "answer": str, "raw_answer": str, "documents": [Document, ...],
         "citations": [{"n": int, "document": Document}, ...]}

    ``documents[i]`` is hit ``<|i+1|>``; ``citations`` lists the cited hits in order of first citation
    (numbers that point at no hit are left out); ``answer`` has the citations written as ``[N]`` when
    ``render_citations`` is set, ``raw_answer`` is MOSS's reply as written.

    With ``search="always"`` (the default) the question itself is searched, and MOSS's pass 2 reads the hits:
    one generation. With ``search="auto"`` MOSS decides in pass 1 whether and what to search (its queries go
    to the retriever; at most four), then answers; when it does not search, ``documents`` is empty.

    Retriever errors propagate: the retriever belongs to the application, and an answer written without its
    documents would hide the failure.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    chat: ChatMoss
    """The chat model (a MOSS plugin checkpoint such as ``moss-moon-003-sft-plugin``)."""
    retriever: BaseRetriever
    """Where the documents come from."""
    k: int = Field(default=3, ge=1, le=20)
    """Most documents shown per search (MOSS's search showed 3)."""
    snippet_chars: int = Field(default=_plugins.SNIPPET_LIMIT, ge=1)
    """Each document is cut to this many characters (production: 400)."""
    search: Literal["always", "auto"] = "always"
    """``always`` searches the question; ``auto`` lets MOSS decide and write the queries."""
    thoughts: str | None = None
    """Inner thoughts written before an ``always`` search; by default a short English or Chinese sentence."""
    system: str | None = None
    """Extra instructions, added to the meta instruction; or a whole MOSS system text, used as it is."""
    render_citations: bool = True
    """Write ``<sup><|N|></sup>`` as ``[N]`` in ``answer``."""

    # ------------------------------------------------------------------ retrieval

    def _retrieve(self, query: str, config: RunnableConfig) -> list[Document]:
        """The first ``k`` documents with text, for one query."""
        documents = self.retriever.invoke(query, config=config)
        return [d for d in documents if fmt.scrub(d.page_content).strip()][: self.k]

    def _hit_lines(self, documents: Sequence[Document]) -> str:
        """The documents as MOSS's hit lines ``<|N|>: '...'`` (scrubbed, flattened, cut), or ``No result.``."""
        snippets = [fmt.scrub(d.page_content) for d in documents]
        return _plugins.format_search_hits(snippets, start=1, limit=self.snippet_chars)

    # ------------------------------------------------------------------ the passes

    def _head(self, question: str) -> list[BaseMessage]:
        system = [SystemMessage(self.system)] if self.system else []
        return [*system, HumanMessage(question)]

    def _answer_always(self, question: str, child: RunnableConfig) -> tuple[AIMessage, list[Document]]:
        query = " ".join(fmt.scrub(question).split())[:400]
        documents = self._retrieve(query, child)
        call = {"name": SEARCH_TOOL["function"]["name"], "args": {"query": query}, "id": "call_search_0"}
        thoughts = self.thoughts or default_thoughts(question)
        messages = [
            *self._head(question),
            AIMessage("", tool_calls=[call], additional_kwargs={REASONING: thoughts}),
            ToolMessage(self._hit_lines(documents), tool_call_id=call["id"], name=call["name"]),
        ]
        reply = self.chat.bind_tools([SEARCH_TOOL], max_tool_rounds=1).invoke(messages, config=child)
        return reply, documents

    def _answer_auto(self, question: str, child: RunnableConfig) -> tuple[AIMessage, list[Document]]:
        chat = self.chat.bind_tools([SEARCH_TOOL], max_tool_rounds=1)  # one search round, then the reply
        head = self._head(question)
        first = chat.invoke(head, config=child)
        if not first.tool_calls:
            if first.invalid_tool_calls:  # MOSS wanted to search but wrote a bad command: search the question
                logger.info(
                    "MOSS wrote no readable Search command (%s); searching the question", first.invalid_tool_calls
                )
                return self._answer_always(question, child)
            return first, []  # MOSS answered without searching
        documents: list[Document] = []
        answers: list[BaseMessage] = []
        for number, call in enumerate(first.tool_calls):
            found: list[Document] = []
            if number < _plugins.MAX_COMMANDS:
                found = self._retrieve(str(call["args"].get("query", "")), child)
            documents.extend(found)  # hits are numbered on across the searches, in this order
            answers.append(ToolMessage(self._hit_lines(found), tool_call_id=str(call["id"]), name=call["name"]))
        reply = chat.invoke([*head, first, *answers], config=child)
        return reply, documents

    def _invoke(self, value: Any, run_manager: CallbackManagerForChainRun, config: RunnableConfig) -> dict[str, Any]:
        question = input_text(value, ("question", "input", "query", "text"))
        child = patch_config(config, callbacks=run_manager.get_child())
        if self.search == "always":
            reply, documents = self._answer_always(question, child)
        else:
            reply, documents = self._answer_auto(question, child)
        raw = message_text(reply)
        cited = [n for n in find_citations(raw) if 1 <= n <= len(documents)]
        answer = bracket_citations(raw, len(documents)) if self.render_citations else raw
        return {
            "question": question,
            "answer": answer,
            "raw_answer": raw,
            "documents": documents,
            "citations": [{"n": n, "document": documents[n - 1]} for n in cited],
        }

    def invoke(
        self, input: dict[str, Any] | str, config: RunnableConfig | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """Retrieve, let MOSS answer from the hits, and map its citations to the documents."""
        return self._call_with_config(self._invoke, input, ensure_config(config), **kwargs)
