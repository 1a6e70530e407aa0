r"""MOSS's ``Search(query)`` plugin as a LangChain tool.

The tool asks a pluggable backend (see :mod:`moss_agent.tools.search_backends`) and writes the hits the way
MOSS read them in training: ``<|1|>: 'snippet'`` lines, top 3, snippets flattened, cut to 400 characters,
quoted, and scrubbed so that a web page cannot forge a turn. The hits themselves (title, url, snippet) are the
tool's artifact, for citations. A failing or slow backend gives ``No result.`` and a logged warning, never an
exception.

Example::

    from moss_agent.tools.search import SearchTool
    from moss_agent.tools.search_backends import LocalDocumentsBackend

    tool = SearchTool(backend=LocalDocumentsBackend.from_files(["notes/"]))
    message = tool.invoke({"type": "tool_call", "id": "1", "name": "Search", "args": {"query": "MOSS"}})
    message.content   # "<|1|>: '...'\n<|2|>: '...'"
    message.artifact  # [{"title": ..., "url": ..., "snippet": ...}, ...]
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any, Literal, TypeVar

from langchain_core.callbacks import CallbackManagerForToolRun
from langchain_core.retrievers import BaseRetriever
from langchain_core.tools import BaseTool
from pydantic import BaseModel, Field, field_validator

from moss_agent.protocol.format import scrub
from moss_agent.protocol.plugins import NO_RESULT, SNIPPET_LIMIT, WEB_SEARCH, format_search_hits
from moss_agent.tools.search_backends import (
    LocalDocumentsBackend,
    RetrieverBackend,
    SearchBackend,
    SearchHit,
    default_backend,
)

__all__ = ["SearchInput", "SearchTool"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


class SearchInput(BaseModel):
    """Arguments of ``Search``."""

    query: str = Field(description="What to search the web for, e.g. a question or a few keywords.")


def _call_with_deadline(fn: Callable[[], _T], timeout: float) -> _T:
    """Run ``fn`` in a daemon thread and give up after ``timeout`` seconds.

    A backend without its own timeout (a retriever, a community wrapper) must not hang the agent; the
    abandoned thread is a daemon so it cannot keep the interpreter alive either.

    Raises:
        TimeoutError: When ``fn`` has not returned in time.
    """
    box: dict[str, Any] = {}
    done = threading.Event()

    def work() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # handed to the caller's thread, which decides
            box["error"] = err
        finally:
            done.set()

    threading.Thread(target=work, name="moss-search", daemon=True).start()
    if not done.wait(timeout):
        raise TimeoutError(f"search took longer than {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


class SearchTool(BaseTool):
    """Web search in MOSS's result format (``Search(query)``), over any backend.

    The content is the hit lines numbered from 1 (MossAgent renumbers them across the Search calls of one turn
    with ``moss_agent.protocol.plugins.renumber_search_hits``); the artifact is the list of hits as dicts with
    ``title``, ``url`` and ``snippet`` (scrubbed, uncut).

    By default the backend is Tavily when ``TAVILY_API_KEY`` is set, else an empty local index (which finds
    nothing until documents are added): use :meth:`from_documents` to search local files offline, or pass
    ``backend=`` any :class:`SearchBackend` or LangChain ``BaseRetriever``.
    """

    name: str = str(WEB_SEARCH.api)
    description: str = (
        "Search the web. Input: a search query. Output: numbered snippets of the best pages, to be cited as <|N|>."
    )
    args_schema: type[BaseModel] = SearchInput
    response_format: Literal["content", "content_and_artifact"] = "content_and_artifact"

    backend: Any = Field(default_factory=default_backend)
    """A :class:`SearchBackend` (a LangChain ``BaseRetriever`` is wrapped automatically)."""
    top_k: int = Field(default=3, ge=1, le=20)
    """How many hits to show the model (production showed 3)."""
    snippet_chars: int = Field(default=SNIPPET_LIMIT, ge=1)
    """Each snippet is cut to this many characters (production: 400)."""
    max_query_chars: int = Field(default=400, ge=1)
    """Longer queries from the model are cut to this length before they are sent anywhere."""
    timeout: float = Field(default=20.0, gt=0)
    """Seconds before a search is abandoned with ``No result.`` (backends also have their own timeout)."""

    @field_validator("backend", mode="before")
    @classmethod
    def _wrap_backend(cls, value: Any) -> Any:
        if isinstance(value, BaseRetriever):
            return RetrieverBackend(value)
        if not isinstance(value, SearchBackend):
            raise TypeError(
                f"backend must have a search(query, k) method or be a LangChain retriever, got {type(value).__name__}"
            )
        return value

    @classmethod
    def from_documents(
        cls,
        documents: Iterable[str | tuple[str, str] | SearchHit] = (),
        files: Iterable[str | os.PathLike[str]] = (),
        **kwargs: Any,
    ) -> SearchTool:
        """A Search tool over a local BM25 index of texts and files (offline).

        Args:
            documents: Texts, ``(title, text)`` pairs or hits.
            files: Text files or folders of them.
            **kwargs: Further fields of the tool (``top_k``...).
        """
        index = LocalDocumentsBackend.from_files(files)
        index.add(documents)
        return cls(backend=index, **kwargs)

    def _run(
        self, query: str, run_manager: CallbackManagerForToolRun | None = None
    ) -> tuple[str, list[dict[str, str]]]:
        """Search and format; every failure becomes ``No result.``."""
        query = " ".join(query.split())[: self.max_query_chars]
        if not query:
            return NO_RESULT, []
        try:
            hits = _call_with_deadline(lambda: self.backend.search(query, self.top_k), self.timeout)
        except Exception as err:
            logger.warning("Search(%r) failed with %s: %s", query, type(err).__name__, err)
            return NO_RESULT, []
        clean = [
            SearchHit(scrub(hit.title), scrub(hit.url), scrub(hit.snippet or hit.title))
            for hit in list(hits)[: self.top_k]
        ]
        clean = [hit for hit in clean if hit.snippet.strip()]
        if not clean:
            return NO_RESULT, []
        content = format_search_hits([hit.snippet for hit in clean], start=1, limit=self.snippet_chars)
        return content.rstrip("\n"), [hit.as_dict() for hit in clean]
