"""MOSS conversation memory: turns in MOSS's layout, windows over them, a token budget.

A memory keeps every turn (human, inner thoughts, commands, results, reply, plus the turn's artifacts) and
decides which of them the next prompt shows. The prompt is ``system + turns``, exactly as MOSS was trained
(:mod:`moss_agent.protocol.format`).

Prefix cache. The engine reuses the KV cache of the longest prompt prefix it has seen, so a memory that only
appends keeps the cost of a turn to its new tokens. Every memory here therefore changes earlier turns only
when it must, and then by enough to stay append-only for several turns:

* :class:`BufferMemory` only appends (with ``compact_results=True`` each finished turn is shown compacted, as
  the production server did, which is still append-only between turns);
* :class:`WindowMemory` lets the history grow to ``k`` turns and then drops down to ``drop_to`` at once;
* :class:`TokenBudgetMemory` appends while the prompt fits ``context_window - max_new_tokens``; when it does
  not, it first compacts results to ``None`` (the cache survives up to the first compacted turn), and if that
  is not enough it drops whole oldest turns down to a low-water mark, so the new prefix holds for a while.

While :attr:`FitReport.shifted` is False, the history rendered for turn n is a prefix of the one for turn n+1.

Any memory takes ``store=`` (a :class:`~moss_agent.memory.store.SQLiteStore`) and ``session_id=``: each turn
is committed before the memory shows it, and a new memory on the same session resumes where the last stopped.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from langchain_core.messages import BaseMessage

from moss_agent.memory.store import SQLiteStore, TurnRecord, json_artifacts, new_session_id
from moss_agent.protocol import format as fmt
from moss_agent.settings import CONTEXT_WINDOW

if TYPE_CHECKING:
    from moss_agent.engines.base import Engine

__all__ = [
    "BufferMemory",
    "ContextBudgetError",
    "FitReport",
    "MossMemory",
    "TokenBudgetMemory",
    "WindowMemory",
]

logger = logging.getLogger(__name__)

_M = TypeVar("_M", bound="BufferMemory")


class MossMemory(Protocol):
    """What an agent needs of a memory (all classes here satisfy it)."""

    system: str

    def turns(self) -> list[fmt.MossTurn]:
        """The turns the next prompt shows, oldest first."""
        ...

    def add_turn(self, turn: fmt.MossTurn, artifacts: Any = None) -> None:
        """Remember a finished turn."""
        ...

    def fit(self, pending: str = "") -> FitReport | None:
        """Choose the turns so that a prompt ending in ``pending`` fits; None for a memory without budget."""
        ...

    def history_text(self, system: str | None = None) -> str:
        """System text followed by the shown turns."""
        ...

    def clear(self) -> None:
        """Forget every turn."""
        ...

    def to_messages(self) -> list[BaseMessage]:
        """The conversation as LangChain messages."""
        ...


class ContextBudgetError(ValueError):
    """The system text and the pending prompt alone leave no room in the context window."""


@dataclass(frozen=True)
class FitReport:
    """What :meth:`TokenBudgetMemory.fit` did.

    Attributes:
        prompt_tokens: Tokens of system text, shown turns and pending prompt after fitting.
        limit: The most prompt tokens allowed (context window minus generation budget and reserve).
        dropped: Turns dropped from the front by this call.
        compacted: Turns whose results this call replaced by ``None``.
        shifted: Whether the history changed other than by appending (the engine re-prefills from there).
        warning: Set when not even the newest turn fits, so the prompt carries no earlier turn.
    """

    prompt_tokens: int
    limit: int
    dropped: int = 0
    compacted: int = 0
    shifted: bool = False
    warning: str | None = None


class BufferMemory:
    """Every turn, in MOSS's layout; the base of the windowed memories.

    Args:
        system: Meta instruction plus switch block; the stored session's, else :func:`format.system_prompt`.
        compact_results: Show earlier turns with their results replaced by ``None``, as production did.
        store: Persist every turn in this store.
        session_id: The stored session to resume or start (a fresh id when omitted).
    """

    def __init__(
        self,
        system: str | None = None,
        *,
        compact_results: bool = False,
        store: SQLiteStore | None = None,
        session_id: str | None = None,
    ) -> None:
        if session_id is not None and store is None:
            raise ValueError("session_id needs a store: pass store=SQLiteStore(path) or use from_sqlite(path, id)")
        self.compact_results = compact_results
        self.store = store
        self.session_id = session_id
        self._system = system or fmt.system_prompt()
        self._records: list[TurnRecord] = []
        self._start = 0  # first shown turn
        self._compact_before = 0  # turns before this index are shown compacted
        self.last_fit: FitReport | None = None
        if store is not None:
            self.session_id = session_id or new_session_id()
            saved = store.load(self.session_id)
            if saved is None or (system is not None and system != saved.system):
                store.set_system(self.session_id, self._system)
            elif saved.system:
                self._system = saved.system
            if saved is not None:
                self._records = list(saved.records)
            self._restore_window()

    @classmethod
    def from_sqlite(cls: type[_M], path: str | os.PathLike[str], session_id: str | None = None, **kwargs: Any) -> _M:
        """A memory persisted in the SQLite file ``path``, resuming ``session_id`` if it exists."""
        return cls(store=SQLiteStore(path), session_id=session_id, **kwargs)

    @classmethod
    def from_messages(cls: type[_M], messages: Sequence[BaseMessage], **kwargs: Any) -> _M:
        """A memory holding the turns of LangChain ``messages`` (see :func:`moss_agent.messages.from_messages`).

        Args:
            messages: The conversation; a SystemMessage gives the system text.
            **kwargs: Further arguments of the memory class (``system=`` overrides the messages' one).
        """
        from moss_agent.messages import from_messages

        conversation = from_messages(list(messages))
        kwargs.setdefault("system", conversation.system)
        memory = cls(**kwargs)
        for turn in conversation.turns:
            memory.add_turn(turn)
        return memory

    # ------------------------------------------------------------------ state

    @property
    def system(self) -> str:
        """Meta instruction plus switch block (persisted with the session)."""
        return self._system

    @system.setter
    def system(self, text: str) -> None:
        if text != self._system and self.store is not None and self.session_id is not None:
            self.store.set_system(self.session_id, text)
        self._system = text

    def __len__(self) -> int:
        return len(self._records)

    def records(self) -> list[TurnRecord]:
        """Every stored turn with its artifacts, oldest first (including turns no longer shown)."""
        return list(self._records)

    def all_turns(self) -> list[fmt.MossTurn]:
        """Every stored turn as recorded, oldest first."""
        return [r.turn for r in self._records]

    def turns(self) -> list[fmt.MossTurn]:
        """The turns the next prompt shows, oldest first, compacted where the memory compacts them."""
        return [
            r.turn.compacted() if i < self._compact_before else r.turn
            for i, r in enumerate(self._records)
            if i >= self._start
        ]

    def add_turn(self, turn: fmt.MossTurn, artifacts: Any = None) -> None:
        """Remember a finished turn; with a store it is committed before the memory shows it.

        Args:
            turn: The turn as it ran (with its full results).
            artifacts: Data of the turn (image paths, search sources ...), kept beside it as JSON
                (see :func:`~moss_agent.memory.store.json_artifacts`).
        """
        record = TurnRecord(turn, json_artifacts(artifacts), time.time())
        if self.store is not None and self.session_id is not None:
            self.store.append_turn(self.session_id, turn, record.artifacts)
        self._records.append(record)
        self._after_add()

    def fit(self, pending: str = "") -> FitReport | None:
        """Nothing to fit: this memory has no token budget."""
        return None

    def history_text(self, system: str | None = None) -> str:
        """System text (this memory's unless given) followed by every shown turn."""
        return (self.system if system is None else system) + "".join(t.to_text() for t in self.turns())

    def render(self, pending: str = "") -> str:
        """The whole prompt: :meth:`fit` for ``pending``, then the history followed by ``pending``.

        Args:
            pending: The open turn's text, e.g. ``<|Human|>: hi<eoh>`` and a newline, then
                ``<|Inner Thoughts|>:``.
        """
        self.fit(pending)
        return self.history_text() + pending

    def clear(self) -> None:
        """Forget every turn (in the store too; the session and its system text stay)."""
        if self.store is not None and self.session_id is not None:
            self.store.clear_turns(self.session_id)
        self._records.clear()
        self._start = self._compact_before = 0

    def to_conversation(self, *, shown_only: bool = False) -> fmt.MossConversation:
        """The conversation: every stored turn, or only the shown ones as the prompt has them."""
        turns = self.turns() if shown_only else self.all_turns()
        return fmt.MossConversation(system=self.system, turns=turns)

    def to_messages(self, *, shown_only: bool = False) -> list[BaseMessage]:
        """The conversation as LangChain messages (see :func:`moss_agent.messages.to_messages`)."""
        from moss_agent.messages import to_messages

        return to_messages(self.to_conversation(shown_only=shown_only))

    # ------------------------------------------------------------------ window hooks

    def _after_add(self) -> None:
        if self.compact_results:
            self._compact_before = len(self._records)

    def _restore_window(self) -> None:
        self._after_add()


class WindowMemory(BufferMemory):
    """The last turns: up to ``k``; past that, drop down to the newest ``drop_to`` at once.

    Dropping several turns at once keeps the prompt's prefix (and the engine's cache) for ``k - drop_to``
    turns; ``drop_to=k`` is the classic sliding window, which re-prefills the whole history every turn once
    full.

    Args:
        k: Most turns shown.
        drop_to: Turns kept when the window overflows (default: half of ``k``, at least 1).
        **kwargs: See :class:`BufferMemory`.
    """

    def __init__(self, k: int, *, drop_to: int | None = None, **kwargs: Any) -> None:
        if k < 1:
            raise ValueError(f"k is the number of turns to show and must be at least 1, got {k}")
        drop_to = max(1, k // 2) if drop_to is None else drop_to
        if not 1 <= drop_to <= k:
            raise ValueError(f"drop_to must be between 1 and k={k}, got {drop_to}")
        self.k, self.drop_to = k, drop_to
        super().__init__(**kwargs)

    def _after_add(self) -> None:
        super()._after_add()
        self._start = self._next_start(len(self._records), self._start)

    def _next_start(self, length: int, start: int) -> int:
        return length - self.drop_to if length - start > self.k else start

    def _restore_window(self) -> None:
        super()._restore_window()
        self._start = 0
        for length in range(1, len(self._records) + 1):  # the same window as before the restart
            self._start = self._next_start(length, self._start)


class TokenBudgetMemory(BufferMemory):
    """As many whole turns as fit the context window beside the generation budget and the pending prompt.

    The history only grows while ``system + turns + pending`` fits ``context_window - max_new_tokens -
    reserve_tokens``. When it does not, results are compacted to ``None`` first (``compact_when_needed``),
    then whole oldest turns are dropped until the turns take at most ``low_water`` of the room left beside the
    system text and the pending prompt, so that the next turns append again. A turn is never cut. Call
    :meth:`fit` (or :meth:`render`) with the pending prompt before each generation; :meth:`add_turn` fits
    with an empty one.

    Args:
        count_tokens: Counts the tokens of a text with the model's tokenizer (e.g. ``engine.count_tokens``).
        context_window: Prompt plus generated tokens (2048 for MOSS).
        max_new_tokens: The generation budget kept free. A plugin turn generates twice and adds results: cover
            both passes here or in ``reserve_tokens``.
        reserve_tokens: Further tokens kept free.
        low_water: After dropping, the turns take at most this share of the room for history.
        compact_when_needed: Compact results to ``None`` before dropping turns.
        **kwargs: See :class:`BufferMemory`.
    """

    def __init__(
        self,
        count_tokens: Callable[[str], int],
        *,
        context_window: int = CONTEXT_WINDOW,
        max_new_tokens: int = 256,
        reserve_tokens: int = 0,
        low_water: float = 0.5,
        compact_when_needed: bool = True,
        **kwargs: Any,
    ) -> None:
        if min(max_new_tokens, reserve_tokens) < 0 or context_window - max_new_tokens - reserve_tokens < 1:
            raise ValueError(
                f"context_window={context_window} leaves no prompt room beside "
                f"max_new_tokens={max_new_tokens} "
                f"and reserve_tokens={reserve_tokens}: lower max_new_tokens or reserve_tokens"
            )
        if not 0 < low_water <= 1:
            raise ValueError(f"low_water is a share of the history room, in (0, 1], got {low_water}")
        self.count_tokens = count_tokens
        self.context_window, self.max_new_tokens, self.reserve_tokens = (
            context_window,
            max_new_tokens,
            reserve_tokens,
        )
        self.low_water, self.compact_when_needed = low_water, compact_when_needed
        self._counts: dict[str, int] = {}
        super().__init__(**kwargs)

    @classmethod
    def for_engine(cls, engine: Engine, *, max_new_tokens: int = 256, **kwargs: Any) -> TokenBudgetMemory:
        """A budget over ``engine``'s tokenizer and context window."""
        return cls(engine.count_tokens, context_window=engine.context_window, max_new_tokens=max_new_tokens, **kwargs)

    @property
    def limit(self) -> int:
        """The most prompt tokens allowed."""
        return self.context_window - self.max_new_tokens - self.reserve_tokens

    def _turn_tokens(self, turn: fmt.MossTurn) -> int:
        text = turn.to_text()
        if text not in self._counts:
            if len(self._counts) > 4096:
                self._counts.clear()
            self._counts[text] = self.count_tokens(text)
        return self._counts[text]

    def fit(self, pending: str = "") -> FitReport:
        """Choose the shown turns so that the prompt ending in ``pending`` fits; change nothing if it does.

        Args:
            pending: The open turn's text that follows the history in the prompt.

        Returns:
            What was done, also kept in :attr:`last_fit`.

        Raises:
            ContextBudgetError: When the system text and ``pending`` alone exceed the limit.
        """
        limit = self.limit
        total = self.count_tokens(self.history_text() + pending)
        compacted = 0
        if total > limit and self.compact_when_needed:
            shown = self._records[max(self._start, self._compact_before) :]
            compacted = sum(r.turn.compacted() != r.turn for r in shown)
            self._compact_before = len(self._records)
            if compacted:
                total = self.count_tokens(self.history_text() + pending)
        if total <= limit:
            self.last_fit = FitReport(total, limit, compacted=compacted, shifted=compacted > 0)
            return self.last_fit
        fixed = self.count_tokens(self.system + pending)
        if fixed > limit:
            raise ContextBudgetError(
                f"the system text and the pending prompt take {fixed} tokens, over the limit of {limit} "
                f"(context_window={self.context_window} - max_new_tokens={self.max_new_tokens} - "
                f"reserve_tokens={self.reserve_tokens}): shorten the input or lower max_new_tokens"
            )
        sizes = [self._turn_tokens(t) for t in self.turns()]
        room = limit - fixed
        keep, used = 0, 0
        for size in reversed(sizes):
            if used + size > room * self.low_water:
                break
            keep, used = keep + 1, used + size
        if keep == 0 and sizes and sizes[-1] <= room:
            keep = 1  # over the low-water mark but within the budget: better than no history at all
        self._start = len(self._records) - keep
        total = self.count_tokens(self.history_text() + pending)
        while total > limit and keep:  # counts of parts need not add up for every tokenizer
            keep -= 1
            self._start += 1
            total = self.count_tokens(self.history_text() + pending)
        warning = None
        if keep == 0 and sizes:
            warning = (
                f"the newest turn ({sizes[-1]} tokens) does not fit the {room} tokens left for history "
                f"(limit {limit} minus {fixed} for the system text and pending prompt): the prompt "
                "carries no earlier turn"
            )
            logger.warning(warning)
        self.last_fit = FitReport(total, limit, len(sizes) - keep, compacted, True, warning)
        return self.last_fit

    def _after_add(self) -> None:
        super()._after_add()
        self.fit()

    def _restore_window(self) -> None:
        super()._restore_window()
        self.fit()
