"""Ready-made LangChain chains over MOSS (installed as ``moss_agent.chains``).

=========================  =========================================================================
name                       what it does
=========================  =========================================================================
MossConversationChain      ChatMoss + a MOSS memory: one turn per call, prompts in MOSS's multi-turn layout
MossRetrievalChain         a retriever's documents through MOSS's Search format; citations -> Documents
create_extraction_chain    text -> a pydantic object (or dict) via ``with_structured_output``
=========================  =========================================================================

Each is a LangChain Runnable and composes with others (``|``, ``.with_config``, ``batch``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moss_agent.chains.conversation import MossConversationChain
    from moss_agent.chains.extraction import create_extraction_chain
    from moss_agent.chains.retrieval import MossRetrievalChain

__all__ = ["MossConversationChain", "MossRetrievalChain", "create_extraction_chain"]

# Imported on first use, so that importing the package stays light.
_EXPORTS = {
    "MossConversationChain": "moss_agent.chains.conversation",
    "MossRetrievalChain": "moss_agent.chains.retrieval",
    "create_extraction_chain": "moss_agent.chains.extraction",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return [*globals(), *_EXPORTS]
