"""MossAgent's inputs and sessions: what a call asks, and which conversation it continues.

An agent input is a string, ``{"input": ...}``, a HumanMessage, a list of messages, a PromptValue or
``{"messages": [...]}``. The last message is the question; SystemMessages before it add instructions for the
call; earlier Human/AI messages are the conversation so far, which starts a session that has no turns yet.

A call continues the session named by ``config["configurable"]["session_id"]`` (as RunnableWithMessageHistory
reads it), else the agent's own conversation. Turns of one session run one at a time, in order; sessions never
share turns.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage, convert_to_messages
from langchain_core.prompt_values import PromptValue
from langchain_core.runnables import RunnableConfig

from moss_agent.messages import from_messages, message_text
from moss_agent.protocol.format import MossTurn
from moss_agent.rendering import check_content

__all__ = ["AgentInput", "Session", "Sessions", "parse_input", "session_id"]

_TEXT_KEYS = ("input", "question", "query", "text")


@dataclass
class AgentInput:
    """One call's question, extra instructions and earlier conversation.

    Attributes:
        text: The question.
        system: Instructions from SystemMessages of the input, if any.
        earlier: The Human/AI messages before the question.
    """

    text: str
    system: str | None = None
    earlier: list[BaseMessage] = field(default_factory=list)


def parse_input(value: Any) -> AgentInput:
    """Read an agent input (see the module docstring).

    Raises:
        ValueError: For a dict without a known key, an empty list, a list not ending with a HumanMessage, or
            image/audio content (MOSS reads text only).
    """
    if isinstance(value, str):
        return AgentInput(value)
    if isinstance(value, PromptValue):
        messages = value.to_messages()
    elif isinstance(value, BaseMessage):
        messages = [value]
    elif isinstance(value, Mapping):
        if "messages" in value:
            messages = convert_to_messages(value["messages"])
        else:
            key = next((k for k in _TEXT_KEYS if k in value), None)
            if key is None:
                raise ValueError(
                    f"MossAgent input needs an 'input' (or 'messages') key; got keys {sorted(map(str, value))}"
                )
            return parse_input(value[key])
    elif isinstance(value, Sequence):
        messages = convert_to_messages(value)
    else:
        raise ValueError(
            "MossAgent takes a string, a message, a list of messages, a PromptValue or a dict; got "
            + type(value).__name__
        )
    if not messages or not isinstance(messages[-1], HumanMessage):
        last = type(messages[-1]).__name__ if messages else "nothing"
        raise ValueError(f"MossAgent input must end with a HumanMessage (the question); it ends with {last}")
    check_content(messages)
    systems = [message_text(m) for m in messages[:-1] if isinstance(m, SystemMessage)]
    earlier = [m for m in messages[:-1] if not isinstance(m, SystemMessage)]
    return AgentInput(message_text(messages[-1]), "\n".join(systems) or None, earlier)


def session_id(config: RunnableConfig | None) -> str | None:
    """``config["configurable"]["session_id"]``, if given."""
    value = ((config or {}).get("configurable") or {}).get("session_id")
    return None if value is None else str(value)


@dataclass
class Session:
    """One conversation: a memory, or a plain list of turns, and the lock its turns take."""

    memory: Any = None
    history: list[MossTurn] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def turns(self) -> list[MossTurn]:
        """The turns so far (those the memory shows)."""
        return list(self.memory.turns()) if self.memory is not None else list(self.history)

    def remember(self, turn: MossTurn, artifacts: list[Any]) -> None:
        """Add a finished turn."""
        if self.memory is not None:
            self.memory.add_turn(turn, artifacts=artifacts or None)
        else:
            self.history.append(turn)

    def seed(self, earlier: Sequence[BaseMessage]) -> None:
        """Start the conversation with the messages a caller sent before its question.

        Raises:
            ValueError: When the session already has turns (send only the new message then).
        """
        if not earlier:
            return
        if self.turns():
            raise ValueError(
                f"this session already holds {len(self.turns())} turns: send only the new message (or use another "
                "session_id); earlier messages in the input only start a new conversation"
            )
        for turn in from_messages(earlier).turns:
            self.remember(turn, [])

    @contextmanager
    def turn(self) -> Iterator[Session]:
        """Hold the session for one turn (another turn of it waits)."""
        with self.lock:
            yield self


class Sessions:
    """The agent's conversations: its own (no session id) and one per session id."""

    def __init__(self, default: Session, factory: Callable[[str], Any] | None = None) -> None:
        self.default = default
        self._factory = factory
        self._named: dict[str, Session] = {}
        self._lock = threading.Lock()

    def get(self, sid: str | None) -> Session:
        """The session of ``sid`` (created on first use, with ``factory(sid)`` as its memory when given)."""
        if sid is None:
            return self.default
        with self._lock:
            if sid not in self._named:
                self._named[sid] = Session(self._factory(sid) if self._factory else None)
            return self._named[sid]

    def ids(self) -> list[str]:
        """The session ids used so far."""
        with self._lock:
            return list(self._named)
