"""LangChain chat history over a SQLite session, every whole turn stored as a MOSS turn."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import AIMessage, BaseMessage, SystemMessage, messages_from_dict, messages_to_dict

from moss_agent.memory.store import SQLiteStore, TurnRecord

__all__ = ["MossChatMessageHistory"]


class MossChatMessageHistory(BaseChatMessageHistory):
    """LangChain chat history over a :class:`SQLiteStore` session; every whole turn is stored as a MOSS turn.

    Messages become turns through :func:`moss_agent.messages.from_messages` once a reply closes them; messages
    that do not make a whole turn yet (a question awaiting its answer) are kept as they are until one does.
    ``BaseChatMessageHistory`` (and ``RunnableWithMessageHistory``) are deprecated since langchain-core 1.6.4,
    for removal in 2.0, in favour of LangGraph checkpointers; this adapter serves the many apps that still
    use them.

    Args:
        store: The store, or a path to open one at.
        session_id: The session.
        system: The session's system text (meta instruction and switches; ChatMoss's, say) when it has none
            yet. Without one, the first messages' SystemMessage, else the switches their tool calls imply,
            become the session's; its switches decide how later turns write empty segments.
        include_system: Put the session's system text first, as a SystemMessage; then the messages convert
            back to exactly the stored turns (without it, the reader's own switches decide empty segments).
    """

    def __init__(
        self,
        store: SQLiteStore | str | os.PathLike[str],
        session_id: str,
        *,
        system: str | None = None,
        include_system: bool = False,
    ) -> None:
        self.store = store if isinstance(store, SQLiteStore) else SQLiteStore(store)
        self.session_id = self.store.create_session(session_id, system=system)
        saved = self.store.load(self.session_id)
        if system is not None and saved is not None and saved.system is None:
            self.store.set_system(self.session_id, system)
        self.include_system = include_system

    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]
        """The stored turns as messages, then any messages of an unfinished turn."""
        from moss_agent.messages import to_messages

        saved = self.store.load(self.session_id)
        if saved is None:
            return []
        out = [m for m in to_messages(saved.to_conversation()) if self.include_system or m.type != "system"]
        return out + (messages_from_dict(json.loads(saved.pending)) if saved.pending else [])

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Store the turns the messages complete, in one transaction; keep the rest for later."""
        from moss_agent.messages import from_messages

        saved = self.store.load(self.session_id)
        combined = (messages_from_dict(json.loads(saved.pending)) if saved and saved.pending else []) + list(messages)
        cut = 0  # a reply (an AIMessage without tool calls) closes a turn
        for i, message in enumerate(combined):
            if isinstance(message, AIMessage) and not message.tool_calls:
                cut = i + 1
        done, rest = combined[:cut], combined[cut:]
        known = saved.system if saved is not None else None
        keep_system = any(isinstance(m, SystemMessage) for m in done) or known is None
        if done and not keep_system:
            # The session's switches decide how empty segments are written (plugin or plain form).
            done = [SystemMessage(known or ""), *done]
        conversation = from_messages(done) if done else None
        self.store.append_turns(
            self.session_id,
            [TurnRecord(t) for t in conversation.turns] if conversation else [],
            pending=json.dumps(messages_to_dict(rest)) if rest else None,
            system=conversation.system if conversation and keep_system else ...,
        )

    def clear(self) -> None:
        """Forget the session's turns (its system text stays)."""
        self.store.clear_turns(self.session_id)
