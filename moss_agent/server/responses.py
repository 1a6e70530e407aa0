"""How job outcomes become HTTP answers: error statuses, and a completion as server-sent events."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from moss_agent.engines.base import ContextWindowExceededError
from moss_agent.memory import ContextBudgetError
from moss_agent.server.queue import QueueFullError, RequestTimeoutError
from moss_agent.server.schemas import ApiError, chunk, usage
from moss_agent.server.service import Event

__all__ = ["collect", "job_error", "sse"]

logger = logging.getLogger("moss_agent.server.app")


def job_error(err: BaseException) -> ApiError:
    """The API error for what a queued job raised."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, QueueFullError):
        retry = {"Retry-After": str(err.retry_after)}
        return ApiError(429, str(err), type="rate_limit_error", code="queue_full", headers=retry)
    if isinstance(err, RequestTimeoutError):
        return ApiError(504, str(err), type="timeout_error", code="timeout")
    if isinstance(err, ContextBudgetError | ContextWindowExceededError):
        return ApiError(400, str(err), code="context_length_exceeded", param="messages")
    if isinstance(err, ValueError):
        return ApiError(400, str(err))
    logger.error("request failed", exc_info=err)
    return ApiError(500, f"the server failed: {type(err).__name__}", type="server_error")


async def collect(stream: AsyncIterator[Any]) -> list[Any]:
    """Every item of ``stream``."""
    return [item async for item in stream]


async def sse(
    stream: AsyncIterator[Event],
    first: Event,
    completion_id: str,
    model: str,
    conversation_id: str,
    include_usage: bool,
) -> AsyncIterator[str]:
    """The server-sent events of a streamed completion; an error after the first event is an error event."""

    def delta(data: dict[str, Any], finish: str | None = None) -> str:
        return chunk(completion_id, model, conversation_id, data, finish)

    try:
        yield delta({"role": "assistant", "content": ""})
        event: Event | None = first
        while event is not None:
            if event.kind == "reply":
                yield delta({"content": event.data})
            elif event.kind == "reasoning":
                yield delta({"reasoning_content": event.data})
            elif event.kind == "moss":
                yield delta({"moss": event.data})
            else:
                message = event.data["message"]
                last: dict[str, Any] = {"moss": {"type": "turn", **message["moss"]}}
                if message.get("tool_calls"):
                    last["tool_calls"] = [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]
                yield delta(last, event.data["finish_reason"])
                if include_usage:
                    yield chunk(completion_id, model, conversation_id, None, token_usage=usage(event.data["usage"]))
            event = await anext(stream, None)
        yield "data: [DONE]\n\n"
    except Exception as err:
        error = job_error(err)
        yield f"data: {json.dumps(error.body())}\n\n"
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
