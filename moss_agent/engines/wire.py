"""The wire of OpenAI-compatible servers: the remote engine's errors, error bodies and server-sent events."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from langchain_core.exceptions import (
    ModelAPIError,
    ModelAuthenticationError,
    ModelConnectionError,
    ModelError,
    ModelInvalidRequestError,
    ModelNotFoundError,
    ModelPermissionDeniedError,
    ModelTimeoutError,
)

__all__ = [
    "RemoteEngineError",
    "ServerResponseError",
    "ServerTimeoutError",
    "ServerUnavailableError",
    "error_detail",
    "json_object",
    "retry_after",
    "sse_events",
    "status_error",
]


class RemoteEngineError(RuntimeError):
    """The server could not be used."""


class ServerUnavailableError(RemoteEngineError, ModelConnectionError):
    """No answer: connection refused, timed out, or the server stayed overloaded through every retry."""


class ServerTimeoutError(ServerUnavailableError, ModelTimeoutError):
    """The server sent nothing for ``timeout`` seconds."""


class ServerResponseError(RemoteEngineError, ModelError):
    """The server refused the request or answered something that is not an OpenAI completion."""


_STATUS_KINDS: dict[int, type[ModelError]] = {
    400: ModelInvalidRequestError,
    401: ModelAuthenticationError,
    403: ModelPermissionDeniedError,
    404: ModelNotFoundError,
    422: ModelInvalidRequestError,
}


_STATUS_CLASSES: dict[type[ModelError], type[ServerResponseError]] = {}


def status_error(status: int) -> type[ServerResponseError]:
    """The error for an HTTP status: also LangChain's ModelError of that status, where it has one."""
    kind = _STATUS_KINDS.get(status, ModelAPIError if status >= 500 else None)
    if kind is None:
        return ServerResponseError
    if kind not in _STATUS_CLASSES:
        name = f"Server{kind.__name__.removeprefix('Model')}"
        _STATUS_CLASSES[kind] = type(name, (ServerResponseError, kind), {"__module__": __name__})
    return _STATUS_CLASSES[kind]


def error_detail(response: Any) -> str:
    """The server's error message from an error response (JSON ``error`` / ``detail`` / ``message``, or text)."""
    text = response.read().decode("utf-8", "replace")
    response.close()
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    error = data.get("error", data.get("detail", data.get("message", text))) if isinstance(data, dict) else text
    error = error.get("message", error) if isinstance(error, dict) else error
    return str(error)[:500] or str(response.reason_phrase)


def retry_after(response: Any, default: float) -> float:
    """Seconds a ``Retry-After`` header asks for (at most 60), else ``default``."""
    value = response.headers.get("retry-after", "")
    try:
        return min(float(value), 60.0)
    except ValueError:
        return default


def json_object(text: str, what: str) -> dict[str, Any]:
    """``text`` parsed as a JSON object, or a :class:`ServerResponseError` naming ``what`` it came from."""
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise ServerResponseError(f"{what} is not a JSON object: {text[:300]!r}")
    if "error" in data:
        error = data["error"]
        raise ServerResponseError(
            f"{what} reports an error: {error.get('message', error) if isinstance(error, dict) else error}"
        )
    return data


def sse_events(response: Any, base_url: str) -> Iterator[dict[str, Any]]:
    """The JSON events of a server-sent-event stream (or the one JSON body of a server that ignores ``stream``)."""
    kind = response.headers.get("content-type", "")
    if "text/event-stream" not in kind:
        data = json_object(response.read().decode("utf-8", "replace"), f"{base_url}/completions' {kind} answer")
        if "choices" not in data:
            raise ServerResponseError(f"{base_url}/completions answered JSON without choices: {data}")
        yield data
        return
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue  # comments, event names and blank separators
        if (payload := line[5:].strip()) == "[DONE]":
            return
        yield json_object(payload, f"a streamed line of {base_url}/completions")
