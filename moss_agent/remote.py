"""The remote engine's old import path (``from moss_agent.remote import RemoteEngine``), kept for README users."""

from moss_agent.engines.remote import RemoteEngine, RemoteEngineError, ServerResponseError, ServerUnavailableError

__all__ = ["RemoteEngine", "RemoteEngineError", "ServerResponseError", "ServerUnavailableError"]
