"""One loaded model per process: engine slots shared by every face that names the same checkpoint.

A 16B MOSS checkpoint takes minutes and tens of GB to load, so ChatMoss, MossLLM, their copies, the instances
LangChain builds for ``configurable_fields``, MossAgent, the chains and the server all draw their engine from
one :class:`EngineSlot` per :func:`engine_key` (checkpoint, precision, device map, adapter, ...). A face takes
its slot when it is constructed (nothing is loaded then) and keeps it; the slot loads the engine on first use
and holds it. The registry itself holds slots weakly: once no face refers to a slot, the slot and its engine
are freed (GPU memory included) and the next face loads the model again.

An explicit ``engine=`` always wins over the registry. Such engines are also remembered weakly under a token,
so that a face that was pickled or deep-copied without its engine finds it again in the same process.
"""

from __future__ import annotations

import itertools
import json
import threading
import uuid
import weakref
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

from moss_agent.engines.base import Engine

__all__ = ["EngineSlot", "engine_for_token", "engine_key", "engine_slot", "live_slots", "token_for_engine"]

Key = tuple[Hashable, ...]


class EngineSlot:
    """Builds one engine on first use and holds it; shared by every face with the same :func:`engine_key`."""

    def __init__(self, key: Key, build: Callable[[], Engine]) -> None:
        self.key = key
        self._build = build
        self._engine: Engine | None = None
        self._lock = threading.Lock()
        self.builds = 0
        """How many times this slot built its engine (0 or 1): the test of "the weights load once"."""

    @property
    def loaded(self) -> bool:
        """Whether the engine has been built."""
        return self._engine is not None

    def get(self) -> Engine:
        """The engine, built on first use (one build even when several threads ask at once)."""
        with self._lock:
            if self._engine is None:
                self._engine = self._build()
                self.builds += 1
            return self._engine


_SLOTS: weakref.WeakValueDictionary[Key, EngineSlot] = weakref.WeakValueDictionary()
_LOCK = threading.Lock()


def _canonical(value: Any) -> Hashable:
    """A hashable, order-independent form of a setting (device maps and memory limits are dicts)."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def engine_key(model: str, **settings: Any) -> Key:
    """The registry key of a checkpoint loaded with ``settings`` (precision, device map, adapter, ...).

    A local directory counts by its resolved path, so ``./moss`` and ``/abs/moss`` share one engine; a hub id
    counts as written. Settings that are None are left out, so adding a new optional setting keeps old keys.
    """
    path = Path(model).expanduser()
    where = str(path.resolve()) if path.exists() else model
    adapter = settings.get("adapter")
    if isinstance(adapter, str | Path) and Path(adapter).expanduser().exists():
        settings = {**settings, "adapter": str(Path(adapter).expanduser().resolve())}
    return (where, *sorted((k, _canonical(v)) for k, v in settings.items() if v is not None))


def engine_slot(key: Key, build: Callable[[], Engine]) -> EngineSlot:
    """The live slot for ``key``, or a new one that builds with ``build`` (nothing is loaded here)."""
    with _LOCK:
        slot = _SLOTS.get(key)
        if slot is None:
            slot = EngineSlot(key, build)
            _SLOTS[key] = slot
        return slot


def live_slots() -> list[EngineSlot]:
    """The slots some face still refers to (for diagnostics and tests)."""
    with _LOCK:
        return list(_SLOTS.values())


_GIVEN: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
_TOKENS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
_COUNTER = itertools.count(1)
_PROCESS = uuid.uuid4().hex  # a token from another process (a pickle) never matches an engine of this one


def token_for_engine(engine: Any) -> str | None:
    """A token under which an explicitly given engine can be found again in this process.

    None when the engine cannot be weakly referenced.
    """
    with _LOCK:
        try:
            token = _TOKENS.get(engine)
            if token is None:
                token = f"{_PROCESS}:{next(_COUNTER)}"
                _TOKENS[engine] = token
                _GIVEN[token] = engine
        except TypeError:
            return None
        return token


def engine_for_token(token: str | None) -> Any:
    """The engine remembered under ``token``, or None when it is gone (or was given in another process)."""
    if token is None:
        return None
    with _LOCK:
        return _GIVEN.get(token)
