"""Search backends for the ``Search`` tool: one small protocol, several engines behind it.

A backend answers ``search(query, k) -> list[SearchHit]`` and may raise on any failure; the tool turns
failures into ``No result.``. Backends here: Tavily (``tavily-python``), a server speaking the MOSS
WebSearchTool API, any LangChain ``BaseRetriever``, a built-in BM25 index over local documents (offline), and
langchain-community search wrappers (optional ``community`` extra).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import re
import urllib.request
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "CommunitySearchBackend",
    "LocalDocumentsBackend",
    "MossWebSearchBackend",
    "RetrieverBackend",
    "SearchBackend",
    "SearchHit",
    "TavilyBackend",
    "community_backend",
    "default_backend",
]

_MAX_RESPONSE_BYTES = 4 * 1024 * 1024
"""A search answer larger than this is cut off: nothing useful to MOSS is that big."""


@dataclass(frozen=True)
class SearchHit:
    """One search result.

    Attributes:
        title: The page or document title.
        url: Where it comes from (a web address or a ``file://`` URI); may be empty.
        snippet: The text shown to the model.
    """

    title: str
    url: str
    snippet: str

    def as_dict(self) -> dict[str, str]:
        """The hit as a plain dict (``title``, ``url``, ``snippet``)."""
        return asdict(self)


@runtime_checkable
class SearchBackend(Protocol):
    """Anything that can search: returns up to ``k`` hits, best first, and may raise on failure."""

    def search(self, query: str, k: int) -> list[SearchHit]:
        """Search for ``query`` and return at most ``k`` hits."""
        ...


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _require(module: str, extra: str, package: str) -> None:
    """Raise a clear ImportError when an optional dependency is missing (checked without importing it)."""
    if importlib.util.find_spec(module) is None:
        raise ImportError(
            f"this search backend needs {package}: pip install 'moss-agent[{extra}]' (or pip install {package})"
        )


# ---------------------------------------------------------------- Tavily


class TavilyBackend:
    """Web search through Tavily's API with the official ``tavily-python`` client.

    Args:
        api_key: The API key; ``TAVILY_API_KEY`` when omitted (without any, tavily-python's keyless mode).
        base_url: The API root, e.g. a proxy or a self-hosted gateway; Tavily's public API when omitted.
        timeout: Seconds to wait for an answer.
        search_depth: Tavily's ``search_depth`` (``basic``, ``advanced``, ``fast``, ``ultra-fast``).
        **search_kwargs: Further keyword arguments for ``TavilyClient.search`` (``topic``...).

    Raises:
        ImportError: If tavily-python is not installed.
    """

    def __init__(
        self,
        api_key: str | None = None,
        *,
        base_url: str | None = None,
        timeout: float = 10.0,
        search_depth: str = "basic",
        **search_kwargs: Any,
    ) -> None:
        _require("tavily", "search", "tavily-python")
        from tavily import TavilyClient

        self.timeout = timeout
        self.search_kwargs = {"search_depth": search_depth, **search_kwargs}
        self.client = TavilyClient(api_key=api_key or os.environ.get("TAVILY_API_KEY"), api_base_url=base_url)

    def search(self, query: str, k: int) -> list[SearchHit]:
        """Search with Tavily; each result's ``content`` becomes the snippet."""
        answer = self.client.search(query, max_results=k, timeout=self.timeout, **self.search_kwargs)
        return [
            SearchHit(_text(r.get("title")), _text(r.get("url")), _text(r.get("content")))
            for r in answer.get("results", [])[:k]
            if isinstance(r, Mapping)
        ]


# ---------------------------------------------------------------- MOSS WebSearchTool API


class MossWebSearchBackend:
    """A search server that speaks the API of MOSS's WebSearchTool.

    The request is ``POST {"query": q, "topk": "3"}`` (``topk`` as a string, as the release sent it) and the
    answer ``{"0": {"title": ..., "url": ..., "summ": ...}, "1": ...}``.

    Args:
        url: The server's search endpoint.
        timeout: Seconds to wait for an answer.
        headers: Extra HTTP headers (e.g. an authorisation token).
    """

    def __init__(self, url: str, *, timeout: float = 10.0, headers: Mapping[str, str] | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"MossWebSearchBackend needs an http(s) URL, got {url!r}")
        self.url = url
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json", **(headers or {})}

    def search(self, query: str, k: int) -> list[SearchHit]:
        """POST the query and read the numbered hits back, in key order."""
        body = json.dumps({"query": query, "topk": str(k)}).encode()
        request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            answer = json.loads(response.read(_MAX_RESPONSE_BYTES))
        if not isinstance(answer, Mapping):
            raise ValueError(f"WebSearchTool answer is not a JSON object: {type(answer).__name__}")
        numbered = sorted((int(key), hit) for key, hit in answer.items() if str(key).isdigit())
        return [
            SearchHit(_text(hit.get("title")), _text(hit.get("url")), _text(hit.get("summ")))
            for _, hit in numbered[:k]
            if isinstance(hit, Mapping)
        ]


# ---------------------------------------------------------------- LangChain retrievers


class RetrieverBackend:
    """Any LangChain ``BaseRetriever`` (a vector store, a private corpus...) as a search backend.

    A document's ``metadata["title"]`` (else its ``source``) becomes the title and ``metadata["url"]`` (else
    its ``source``) the URL.

    Args:
        retriever: The retriever; it decides how many documents it returns, the tool keeps the first ``k``.
    """

    def __init__(self, retriever: Any) -> None:
        if not callable(getattr(retriever, "invoke", None)):
            raise TypeError(f"RetrieverBackend needs a LangChain retriever, got {type(retriever).__name__}")
        self.retriever = retriever

    def search(self, query: str, k: int) -> list[SearchHit]:
        """Invoke the retriever and map its documents to hits."""
        hits = []
        for doc in self.retriever.invoke(query)[:k]:
            meta = doc.metadata or {}
            source = _text(meta.get("source"))
            hits.append(
                SearchHit(_text(meta.get("title")) or source, _text(meta.get("url")) or source, doc.page_content)
            )
        return hits


# ---------------------------------------------------------------- local documents (BM25)

_CJK = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_TOKEN = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")
_TEXT_SUFFIXES = frozenset({".txt", ".md", ".rst", ".text", ".markdown", ".html", ".htm", ".csv", ".json"})


def _terms(text: str) -> list[str]:
    """Lower-cased word terms; each Chinese, Japanese or Korean character is a term (no spaces there)."""
    return _TOKEN.findall(text.lower())


def _passages(text: str, size: int) -> list[str]:
    """Split a text into passages of about ``size`` characters at paragraph breaks, cutting long ones."""
    passages: list[str] = []
    current = ""
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = paragraph.strip()
        while len(paragraph) > size:
            cut = paragraph.rfind(" ", 0, size)
            cut = cut if cut > size // 2 else size
            passages.append(paragraph[:cut].strip())
            paragraph = paragraph[cut:].strip()
        if current and len(current) + len(paragraph) + 1 > size:
            passages.append(current)
            current = ""
        current = f"{current}\n{paragraph}" if current else paragraph
    if current:
        passages.append(current)
    return [p for p in passages if p]


class LocalDocumentsBackend:
    """A small BM25 index over texts and files the user gives: offline, pure Python, no dependencies.

    Documents are split into passages so that a hit's snippet is the relevant part of a long file. Only
    passages sharing at least one term with the query are returned; an empty index finds nothing.

    Args:
        documents: Texts, or ``(title, text)`` pairs, or :class:`SearchHit` objects.
        passage_chars: Passage size for splitting long texts (about a snippet's length).
        k1: BM25 term-frequency saturation.
        b: BM25 length normalisation.
    """

    def __init__(
        self,
        documents: Iterable[str | tuple[str, str] | SearchHit] = (),
        *,
        passage_chars: int = 400,
        k1: float = 1.5,
        b: float = 0.75,
    ) -> None:
        if passage_chars < 50:
            raise ValueError("passage_chars must be at least 50")
        self.passage_chars, self.k1, self.b = passage_chars, k1, b
        self._passages: list[SearchHit] = []
        self._counts: list[Counter[str]] = []
        self._df: Counter[str] = Counter()
        self.add(documents)

    @classmethod
    def from_files(cls, paths: Iterable[str | os.PathLike[str]], **kwargs: Any) -> LocalDocumentsBackend:
        """Index text files; a folder adds its text files (``.txt``, ``.md``, ``.html``...) recursively.

        Raises:
            FileNotFoundError: If a path does not exist.
        """
        index = cls(**kwargs)
        for raw in paths:
            path = Path(raw)
            if not path.exists():
                raise FileNotFoundError(f"no such file or folder to index: {path}")
            files = (
                sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _TEXT_SUFFIXES)
                if path.is_dir()
                else [path]
            )
            for file in files:
                text = file.read_text(encoding="utf-8", errors="replace")
                index.add([SearchHit(file.name, file.resolve().as_uri(), text)])
        return index

    def __len__(self) -> int:
        """The number of indexed passages."""
        return len(self._passages)

    def add(self, documents: Iterable[str | tuple[str, str] | SearchHit]) -> None:
        """Add documents to the index (same forms as the constructor)."""
        for doc in documents:
            if isinstance(doc, SearchHit):
                title, url, text = doc.title, doc.url, doc.snippet
            elif isinstance(doc, str):
                title, url, text = doc.strip().split("\n", 1)[0][:80], "", doc
            else:
                (title, text), url = doc, ""
            # An explicit title (a file name, a page title) is searchable; one taken from the text is not
            # counted twice.
            extra = "" if isinstance(doc, str) else title
            for passage in _passages(text, self.passage_chars):
                counts = Counter(_terms(f"{extra}\n{passage}"))
                self._passages.append(SearchHit(title, url, passage))
                self._counts.append(counts)
                self._df.update(counts.keys())

    def search(self, query: str, k: int) -> list[SearchHit]:
        """The ``k`` best passages by BM25 (Lucene's non-negative idf), ties in insertion order."""
        terms = set(_terms(query))
        n = len(self._passages)
        if not terms or n == 0:
            return []
        avg_len = sum(sum(c.values()) for c in self._counts) / n
        idf = {t: math.log(1 + (n - self._df[t] + 0.5) / (self._df[t] + 0.5)) for t in terms if self._df[t]}
        scored = []
        for i, counts in enumerate(self._counts):
            length = sum(counts.values())
            score = 0.0
            for term, weight in idf.items():
                tf = counts.get(term, 0)
                if tf:
                    score += weight * tf * (self.k1 + 1) / (tf + self.k1 * (1 - self.b + self.b * length / avg_len))
            if score > 0:
                scored.append((-score, i))
        scored.sort()
        return [self._passages[i] for _, i in scored[:k]]


# ---------------------------------------------------------------- langchain-community wrappers

_COMMUNITY_WRAPPERS = {
    "duckduckgo": "DuckDuckGoSearchAPIWrapper",
    "searx": "SearxSearchWrapper",
    "wikipedia": "WikipediaAPIWrapper",
}


def _first(mapping: Mapping[str, Any], *keys: str) -> str:
    return next((_text(mapping[k]) for k in keys if mapping.get(k)), "")


class CommunitySearchBackend:
    """A langchain-community search wrapper (DuckDuckGo, SearxNG, Bing, Wikipedia...) as a backend.

    Wrappers with ``.results(query, k)`` give one hit per result (``title``, ``link``/``url``,
    ``snippet``/``body``/``content``); wrappers with only ``.run(query)`` give one hit with the whole text.

    Args:
        wrapper: The wrapper object, e.g. ``DuckDuckGoSearchAPIWrapper()``.
    """

    def __init__(self, wrapper: Any) -> None:
        if not callable(getattr(wrapper, "results", None)) and not callable(getattr(wrapper, "run", None)):
            raise TypeError(f"{type(wrapper).__name__} has neither .results(query, k) nor .run(query)")
        self.wrapper = wrapper

    def search(self, query: str, k: int) -> list[SearchHit]:
        """Ask the wrapper and normalise its answer to hits."""
        if callable(getattr(self.wrapper, "results", None)):
            rows: Sequence[Any] = self.wrapper.results(query, k)
            return [
                SearchHit(
                    _first(r, "title"),
                    _first(r, "link", "url", "href"),
                    _first(r, "snippet", "body", "content", "summary"),
                )
                for r in rows[:k]
                if isinstance(r, Mapping) and "Result" not in r  # {"Result": "No good ... found"}
            ]
        text = _text(self.wrapper.run(query)).strip()
        return [SearchHit(query, "", text)] if text else []


def community_backend(name: str, **kwargs: Any) -> CommunitySearchBackend:
    """Build a langchain-community search wrapper by short name and wrap it.

    Args:
        name: ``duckduckgo``, ``searx`` (pass ``searx_host=...``) or ``wikipedia``.
        **kwargs: Keyword arguments for the wrapper's constructor.

    Raises:
        ImportError: If langchain-community is not installed (the ``community`` extra).
        ValueError: For an unknown name.
    """
    if name not in _COMMUNITY_WRAPPERS:
        raise ValueError(f"unknown community search {name!r}; choose from {', '.join(_COMMUNITY_WRAPPERS)}")
    _require("langchain_community", "community", "langchain-community")
    utilities = importlib.import_module("langchain_community.utilities")
    return CommunitySearchBackend(getattr(utilities, _COMMUNITY_WRAPPERS[name])(**kwargs))


def default_backend() -> SearchBackend:
    """Tavily when ``TAVILY_API_KEY`` is set (and tavily-python installed), else an empty local index."""
    if os.environ.get("TAVILY_API_KEY") and importlib.util.find_spec("tavily") is not None:
        return TavilyBackend()
    return LocalDocumentsBackend()
