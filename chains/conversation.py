r"""A MOSS conversation as an LCEL Runnable: ChatMoss plus a MOSS memory.

Each call is one turn. The memory's turns are sent to :class:`~moss_agent.chat_model.ChatMoss` as messages
that render back to exactly the stored text, the reply comes back as an ``AIMessage``, and the finished turn
is saved in the memory. Because the saved turn is byte for byte what the prompt held (plus the reply), the
prompt of turn n+1 starts with the whole prompt of turn n, and the engine's prefix cache serves it::

    turn 1: <system><|Human|>: Hi<eoh>\n<|Inner Thoughts|>: None<eot>\n ... <|MOSS|>:
    turn 2: <system><|Human|>: Hi<eoh>\n<|Inner Thoughts|>: None<eot>\n ... <|MOSS|>: Hello!<eom>\n<|Human|>: ...

Example:
    .. code-block:: python

        from langchain_core.output_parsers import StrOutputParser
        from moss_agent import ChatMoss
        from moss_agent.chains import MossConversationChain

        chain = MossConversationChain(chat=ChatMoss(model="fnlp/moss-moon-003-sft"))
        chain.invoke({"input": "Hi, I'm Ann."}).content
        (chain | StrOutputParser()).invoke("What is my name?")  # the first turn is in the prompt
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from typing import Any, cast

from langchain_core.callbacks import CallbackManagerForChainRun
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage
from langchain_core.runnables import RunnableConfig, RunnableSerializable, ensure_config
from langchain_core.runnables.config import patch_config
from langchain_core.runnables.utils import ConfigurableFieldSpec
from pydantic import ConfigDict, Field, PrivateAttr

from moss_agent.chat_model import ChatMoss
from moss_agent.messages import VERBATIM, message_text, stored_messages
from moss_agent.protocol import format as fmt
from moss_agent.rendering import system_text

__all__ = ["MossConversationChain", "input_text"]

MemoryFactory = Callable[[str], Any]
"""Builds (or reopens) the memory of one session id."""


def input_text(value: Any, keys: tuple[str, ...] = ("input", "question", "query", "text")) -> str:
    """The user text of a chain input: a string, a message, or a dict with one of ``keys``.

    Raises:
        ValueError: For a dict with none of the keys, or another type.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, BaseMessage):
        return message_text(value)
    if isinstance(value, dict):
        for key in keys:
            if key in value:
                return input_text(value[key], keys)
        raise ValueError(f"the chain input needs one of the keys {list(keys)}; got keys {sorted(value)}")
    raise ValueError(f"the chain input must be a string or a dict with an {keys[0]!r} key, got {type(value).__name__}")


def history_messages(memory: Any) -> list[BaseMessage]:
    """The memory's system text and shown turns as messages that ChatMoss renders back byte for byte."""
    return stored_messages(memory.system, memory.turns())


class MossConversationChain(RunnableSerializable[dict[str, Any] | str, AIMessage]):
    """ChatMoss with a MOSS memory: ``{"input": str}`` (or a str) in, the reply ``AIMessage`` out.

    Every call runs one plain-chat turn (no tools; use :class:`~moss_agent.agent.MossAgent` for plugins) and
    saves it in the memory before returning. Pipe into ``StrOutputParser()`` for the reply text.

    Sessions: with ``memory_factory`` (or :meth:`from_sqlite`), the memory is chosen per call by
    ``config={"configurable": {"session_id": "..."}}``, as LangChain's message-history runnables do. Turns of
    one memory run one after another (``batch`` over one memory is serialised, in no promised order); different
    sessions run concurrently.

    Streaming yields ``AIMessageChunk`` pieces of the reply; the turn is saved once the stream is consumed.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    chat: ChatMoss
    """The chat model (its engine, sampling settings and switch style)."""
    memory: Any = None
    """A :mod:`moss_agent.memory.turns` memory for calls without a session id; a :class:`BufferMemory` by default."""
    memory_factory: MemoryFactory | None = Field(default=None, exclude=True)
    """Builds the memory of a session id (called once per id; the memory is then kept)."""

    _sessions: dict[str, Any] = PrivateAttr(default_factory=dict)
    _locks: dict[int, threading.Lock] = PrivateAttr(default_factory=dict)
    _guard: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def model_post_init(self, context: Any) -> None:
        """Give calls without a session a fresh buffer memory in the chat model's switch style."""
        if self.memory is None and self.memory_factory is None:
            from moss_agent.memory import BufferMemory

            self.memory = BufferMemory(system=system_text(None, [], style=self.chat.switch_style))

    @classmethod
    def from_sqlite(
        cls,
        chat: ChatMoss,
        path: str | os.PathLike[str],
        *,
        memory_class: type | None = None,
        **memory_kwargs: Any,
    ) -> MossConversationChain:
        """A chain whose sessions persist in the SQLite file ``path`` (one memory per ``session_id``).

        Args:
            chat: The chat model.
            path: The database file.
            memory_class: A memory class of :mod:`moss_agent.memory.turns` (``BufferMemory`` by default).
            **memory_kwargs: Further arguments of the memory class (``k=`` for a window, ...).
        """
        from moss_agent.memory import BufferMemory
        from moss_agent.memory.store import SQLiteStore

        store = SQLiteStore(path)
        kind = memory_class or BufferMemory
        memory_kwargs.setdefault("system", system_text(None, [], style=chat.switch_style))

        def factory(session_id: str) -> Any:
            return kind(store=store, session_id=session_id, **memory_kwargs)

        return cls(chat=chat, memory_factory=factory)

    @property
    def config_specs(self) -> list[ConfigurableFieldSpec]:
        """``session_id`` when the chain keeps one memory per session."""
        if self.memory_factory is None:
            return []
        spec = ConfigurableFieldSpec(
            id="session_id", annotation=str, name="Session ID", description="The conversation to continue."
        )
        return [spec]

    def memory_for(self, session_id: str | None = None) -> Any:
        """The memory a call with this session id uses (``None``: the chain's own memory).

        Raises:
            ValueError: For a session id without a ``memory_factory``, or no session id with only a factory.
        """
        if session_id is None:
            if self.memory is None:
                raise ValueError(
                    'this chain keeps one memory per session: pass config={"configurable": {"session_id": "..."}}'
                )
            return self.memory
        if self.memory_factory is None:
            raise ValueError(
                f"session_id {session_id!r} given but the chain has no memory_factory: build it with "
                "MossConversationChain.from_sqlite(chat, path) or memory_factory=lambda session_id: ..."
            )
        with self._guard:
            if session_id not in self._sessions:
                self._sessions[session_id] = self.memory_factory(session_id)
            return self._sessions[session_id]

    def _lock(self, memory: Any) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(id(memory), threading.Lock())

    # ------------------------------------------------------------------ one turn

    def _turn(
        self, value: Any, run_manager: CallbackManagerForChainRun, config: RunnableConfig, stream: bool
    ) -> Iterator[AIMessageChunk | AIMessage]:
        human = fmt.scrub(input_text(value))
        session = (config.get("configurable") or {}).get("session_id")
        memory = self.memory_for(session)
        child = patch_config(config, callbacks=run_manager.get_child())
        with self._lock(memory):
            memory.fit(fmt.chat_prompt("", [], human))  # budgeted memories drop or compact turns if needed
            messages = [*history_messages(memory), HumanMessage(human, additional_kwargs={VERBATIM: True})]
            if stream:
                final: AIMessageChunk | None = None
                for chunk in self.chat.stream(messages, config=child):
                    final = chunk if final is None else final + chunk
                    yield chunk
                reply = message_text(final) if final is not None else ""
            else:
                message = self.chat.invoke(messages, config=child)
                reply = message_text(message)
                yield message
            # The turn exactly as ChatMoss's plain-chat prompt wrote it, so the next prompt extends this one.
            memory.add_turn(fmt.MossTurn(human, reply, fmt.NONE, fmt.NONE, " None"))

    def _invoke(self, value: Any, run_manager: CallbackManagerForChainRun, config: RunnableConfig) -> AIMessage:
        *_, message = self._turn(value, run_manager, config, stream=False)
        assert isinstance(message, AIMessage)
        return message

    def _transform(
        self, values: Iterator[Any], run_manager: CallbackManagerForChainRun, config: RunnableConfig
    ) -> Iterator[AIMessageChunk]:
        value: Any = None
        for value in values:  # noqa: B007 - the whole input is the last one (inputs are not chunked)
            pass
        for chunk in self._turn(value, run_manager, config, stream=True):
            assert isinstance(chunk, AIMessageChunk)
            yield chunk

    # ------------------------------------------------------------------ Runnable

    def invoke(self, input: dict[str, Any] | str, config: RunnableConfig | None = None, **kwargs: Any) -> AIMessage:
        """Run one turn and return MOSS's reply; the turn is in the memory afterwards."""
        return self._call_with_config(self._invoke, input, ensure_config(config), **kwargs)

    def stream(
        self, input: dict[str, Any] | str, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[AIMessageChunk]:
        """Run one turn, yielding the reply as ``AIMessageChunk`` pieces; the turn is saved at the end."""
        yield from cast(
            Iterator[AIMessageChunk],
            self._transform_stream_with_config(iter([input]), self._transform, config, **kwargs),
        )

    def transform(
        self, input: Iterator[dict[str, Any] | str], config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[AIMessageChunk]:
        """Stream a turn inside a streaming pipeline (the input is taken whole)."""
        yield from cast(
            Iterator[AIMessageChunk], self._transform_stream_with_config(input, self._transform, config, **kwargs)
        )
