"""The FastAPI app: OpenAI-compatible routes, conversations, images and the chat page.

See :mod:`moss_agent.server` for the API. Every model call goes through one :class:`ModelQueue`, so the
model runs one request at a time in arrival order; everything else (listing, images, the page) answers at once.
"""

from __future__ import annotations

import contextlib
import hmac
import importlib.resources
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from langchain_core.tools import BaseTool
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from moss_agent.chat_model import ChatMoss
from moss_agent.engines.base import ContextWindowExceededError
from moss_agent.memory import ContextBudgetError
from moss_agent.memory.store import SQLiteStore, new_session_id
from moss_agent.server.queue import ModelQueue, QueueFullError, RequestTimeoutError
from moss_agent.server.schemas import (
    CONVERSATION_ID,
    ApiError,
    ChatCompletionRequest,
    PluginsUpdate,
    ServerSettings,
    chunk,
    completion,
    error_body,
    new_completion_id,
    to_langchain,
    usage,
)
from moss_agent.server.service import Event, MossService, TurnRequest
from moss_agent.tool_binding import bind_tools

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

_STATIC = {"page.js": "text/javascript", "page.css": "text/css"}
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _asset(name: str) -> str:
    return importlib.resources.files("moss_agent.server").joinpath(name).read_text(encoding="utf-8")


def _job_error(err: BaseException) -> ApiError:
    """The API error for what a queued job raised."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, QueueFullError):
        return ApiError(429, str(err), type="rate_limit_error", code="queue_full")
    if isinstance(err, RequestTimeoutError):
        return ApiError(504, str(err), type="timeout_error", code="timeout")
    if isinstance(err, ContextBudgetError | ContextWindowExceededError):
        return ApiError(400, str(err), code="context_length_exceeded", param="messages")
    if isinstance(err, ValueError):
        return ApiError(400, str(err))
    logger.error("request failed", exc_info=err)
    return ApiError(500, f"the server failed: {type(err).__name__}", type="server_error")


def create_app(
    model: ChatMoss | Any,
    *,
    tools: Sequence[BaseTool] = (),
    store: SQLiteStore | str | os.PathLike[str] | None = None,
    image_dir: str | os.PathLike[str] | None = None,
    settings: ServerSettings | None = None,
) -> FastAPI:
    """Build the server app.

    Args:
        model: A ChatMoss, an :class:`~moss_agent.engines.base.Engine`, or a checkpoint path / hub id (loaded on the
            first request; load it beforehand to keep that out of the first request's time limit).
        tools: The server-side plugins (e.g. ``moss_agent.tools.make_tools(...)``).
        store: The conversation store, or a path for one; an in-memory database when None (lost at exit).
        image_dir: The folder whose PNGs ``/v1/images/{name}`` serves; by default the Text2Image tool's.
        settings: Limits, API key and defaults.

    Raises:
        ValueError: For default plugins that are not among ``tools``.
    """
    settings = settings or ServerSettings()
    if isinstance(model, ChatMoss):
        chat = model
    elif isinstance(model, str):
        chat = ChatMoss(model=model)
    else:
        chat = ChatMoss(engine=model)
    if not isinstance(store, SQLiteStore):
        if store is None:
            logger.warning("no store given: conversations are kept in memory and lost when the server stops")
        store = SQLiteStore(store if store is not None else ":memory:")
    if image_dir is None:
        folders = (getattr(t, "output_dir", None) for t in tools)  # the Text2Image tool's
        image_dir = next((f for f in folders if isinstance(f, Path)), None)
    service = MossService(
        chat, tools, store, Path(image_dir) if image_dir is not None else None, settings.default_plugins
    )
    queue = ModelQueue(settings.max_queue)
    model_name = settings.model_name or getattr(chat.engine, "model_name", None) or chat.model or "moss"
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        queue.shutdown()

    app = FastAPI(title="moss-agent", version="1", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.service, app.state.queue, app.state.settings = service, queue, settings

    async def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # Constant-time compare: the time taken must not tell how much of a guess was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    async def read_body(request: Request) -> bytes:
        limit = settings.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(
                413, f"the request is larger than this server's limit of {limit} bytes", code="request_too_large"
            )
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise ApiError(
                    413, f"the request is larger than this server's limit of {limit} bytes", code="request_too_large"
                )
        return bytes(body)

    async def run_job(job: Any, deadline: float) -> list[Any]:
        try:
            return [item async for item in queue.stream(job, deadline)]
        except Exception as err:
            raise _job_error(err) from err

    def check_id(conversation_id: str) -> str:
        if not CONVERSATION_ID.fullmatch(conversation_id):
            raise ApiError(400, "a conversation id has 1 to 64 letters, digits, '_' or '-'", param="conversation_id")
        return conversation_id

    # ------------------------------------------------------------------ errors

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse(
            error_body(str(first.get("msg", "invalid request")), "invalid_request_error", None, param), 400
        )

    @app.exception_handler(HTTPException)
    async def _http(_: Request, err: HTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(err.detail), kind), status_code=err.status_code)

    # ------------------------------------------------------------------ open routes

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(_asset("page.html"))

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in _STATIC:
            raise ApiError(404, f"no static file {name!r}", type="not_found_error")
        return Response(_asset(name), media_type=_STATIC[name])

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "auth": settings.api_key is not None, "queue": queue.pending}

    # ------------------------------------------------------------------ the API

    api = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @api.get("/models")
    async def models() -> dict[str, Any]:
        entry = {"id": model_name, "object": "model", "created": started, "owned_by": "moss-agent"}
        return {"object": "list", "data": [entry]}

    @api.get("/plugins")
    async def plugins() -> dict[str, Any]:
        data = [{"key": k, "name": t.name, "description": t.description} for k, t in service.tools.items()]
        return {"object": "list", "data": data, "default": service.default_plugins}

    @api.get("/conversations")
    def conversations() -> dict[str, Any]:
        return {"object": "list", "data": service.list_conversations()}

    @api.get("/conversations/{conversation_id}")
    def conversation(conversation_id: str) -> dict[str, Any]:
        found = service.conversation(check_id(conversation_id))
        if found is None:
            raise ApiError(404, f"no conversation {conversation_id!r}", type="not_found_error")
        return found

    @api.put("/conversations/{conversation_id}/plugins")
    async def set_plugins(conversation_id: str, request: Request) -> dict[str, Any]:
        check_id(conversation_id)
        try:
            update = PluginsUpdate.model_validate_json(await read_body(request))
        except ValidationError as err:
            raise ApiError(400, f"invalid body: {err.errors()[0]['msg']}", param="plugins") from err
        deadline = time.monotonic() + settings.request_timeout_s
        (keys,) = await run_job(lambda: iter([service.set_plugins(conversation_id, update.plugins)]), deadline)
        return {"id": conversation_id, "object": "conversation.plugins", "plugins": keys}

    @api.delete("/conversations/{conversation_id}")
    async def delete(conversation_id: str) -> dict[str, Any]:
        check_id(conversation_id)
        deadline = time.monotonic() + settings.request_timeout_s
        (deleted,) = await run_job(lambda: iter([service.store.delete(conversation_id)]), deadline)
        return {"id": conversation_id, "object": "conversation.deleted", "deleted": deleted}

    @api.get("/images/{name}")
    async def image(name: str) -> FileResponse:
        path = service.image_path(name)
        if path is None:
            raise ApiError(404, "no such image", type="not_found_error")
        return FileResponse(path, media_type="image/png")

    @api.post("/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> JSONResponse | StreamingResponse:
        try:
            body = ChatCompletionRequest.model_validate_json(await read_body(request))
        except ValidationError as err:
            problem = err.errors()[0]
            param = ".".join(str(p) for p in problem["loc"])
            raise ApiError(400, f"{param}: {problem['msg']}", param=param) from err
        max_tokens = body.requested_max_tokens() or min(chat.max_new_tokens, settings.max_tokens_limit)
        if max_tokens > settings.max_tokens_limit:
            raise ApiError(
                400,
                f"max_tokens is {max_tokens}, over this server's limit of {settings.max_tokens_limit}",
                param="max_tokens",
            )
        if body.plugins is not None:
            try:
                service.check_plugins(body.plugins)
            except ValueError as err:
                raise ApiError(400, str(err), param="plugins") from err
        if body.tools:
            try:
                bind_tools(body.tools)
            except (ValueError, KeyError, TypeError) as err:
                raise ApiError(400, f"tools: {err}", param="tools") from err
        conversation_id = check_id(body.conversation_id or request.headers.get("x-conversation-id") or new_session_id())
        turn = TurnRequest(
            conversation_id,
            to_langchain(body.messages),
            plugins=body.plugins,
            tools=body.tools,
            tool_choice=body.tool_choice,
            sampling=body.sampling(),
            max_tokens=max_tokens,
        )
        deadline = time.monotonic() + settings.request_timeout_s
        completion_id = new_completion_id()
        headers = {"X-Conversation-Id": conversation_id}
        if not body.stream:
            events: list[Event] = await run_job(lambda: service.run(turn), deadline)
            final = events[-1].data
            content = completion(
                completion_id,
                model_name,
                conversation_id,
                final["message"],
                final["finish_reason"],
                usage(final["usage"]),
            )
            return JSONResponse(content, headers=headers)
        stream = queue.stream(lambda: service.run(turn), deadline)
        try:
            first = await anext(stream)  # errors before the first event are answered with their HTTP status
        except Exception as err:
            raise _job_error(err) from err
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        sse = _sse(stream, first, completion_id, model_name, conversation_id, include_usage)
        return StreamingResponse(sse, media_type="text/event-stream", headers={**headers, **_SSE_HEADERS})

    app.include_router(api)

    return app


async def _sse(
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
        error = _job_error(err)
        yield f"data: {json.dumps(error.body())}\n\n"
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
