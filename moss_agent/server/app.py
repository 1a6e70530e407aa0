"""The FastAPI app: OpenAI-compatible routes, conversations, images and the chat page.

See :mod:`moss_agent.server` for the API. Every job that touches the model or a conversation goes through the
:class:`ModelQueue` (fair between users, one job at a time per conversation); the turns it runs at once share
the model's forward passes (:mod:`moss_agent.server.batching`). Listing, images and the page answer at once.
In front of everything, :class:`~moss_agent.server.security.GuardMiddleware` keeps other web sites out.

A request whose client goes away is cancelled: a streamed one when its stream is closed, a non-streamed one
when the server notices the closed connection (it looks every ``_POLL_S`` seconds while the job runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from langchain_core.tools import BaseTool
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from moss_agent.chat_model import ChatMoss
from moss_agent.memory.store import SQLiteStore, new_session_id
from moss_agent.messages import message_text
from moss_agent.server.batching import BatchingEngine
from moss_agent.server.page import PAGE_FILES, parse_title
from moss_agent.server.queue import ModelQueue
from moss_agent.server.responses import collect, job_error, sse
from moss_agent.server.schemas import (
    CONVERSATION_ID,
    ApiError,
    ChatCompletionRequest,
    PluginsUpdate,
    ServerSettings,
    completion,
    error_body,
    new_completion_id,
    scrub_json,
    to_langchain,
    usage,
)
from moss_agent.server.security import GuardMiddleware
from moss_agent.server.service import Event, MossService, TurnRequest
from moss_agent.server.users import ADMIN_ID, KeyRing, Principal
from moss_agent.tool_binding import bind_tools

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

_STATIC = PAGE_FILES
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_POLL_S = 0.1
"""How often a waiting non-streamed request checks whether its client is still there."""


class ClientGoneError(Exception):
    """The client closed its connection before the answer was ready."""


async def _authorize(request: Request) -> Principal:
    """The caller of a ``/v1`` request (401 without a valid key)."""
    principal: Principal | None = request.app.state.keys.authenticate(request.headers.get("authorization", ""))
    if principal is None:
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
    return principal


Caller = Annotated[Principal, Depends(_authorize)]


def _asset(name: str) -> str:
    return importlib.resources.files("moss_agent.server").joinpath(name).read_text(encoding="utf-8")


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
        settings: Limits, keys, allowed hosts and defaults.

    Raises:
        ValueError: For default plugins that are not among ``tools``, or keys given twice.
    """
    settings = settings or ServerSettings()
    if isinstance(settings.keys, KeyRing):
        ring = settings.keys
    else:
        ring = KeyRing(settings.keys, api_key=settings.api_key, admin_key=settings.admin_key)
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
        chat,
        tools,
        store,
        Path(image_dir) if image_dir is not None else None,
        settings.default_plugins,
        max_batch=settings.max_batch,
    )
    several = len(ring.users) > 1
    per_user = settings.max_queue_per_user or (max(1, settings.max_queue // 2) if several else settings.max_queue)
    queue = ModelQueue(
        settings.max_queue, workers=settings.workers or settings.max_batch, max_pending_per_user=per_user
    )
    model_name = settings.model_name or getattr(chat.engine, "model_name", None) or chat.model or "moss"
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        queue.shutdown()
        if isinstance(service.chat.engine, BatchingEngine):  # its thread; the model itself is the caller's
            service.chat.engine.close()

    app = FastAPI(title="moss-agent", version="1", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(GuardMiddleware, allowed_hosts=settings.allowed_hosts)
    app.state.service, app.state.queue, app.state.settings, app.state.keys = service, queue, settings, ring

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

    async def watched(request: Request, work: Awaitable[Any]) -> Any:
        """Await ``work``; cancel it (and so its job) when the client closes its connection first."""
        task = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=_POLL_S)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    raise ClientGoneError
        except ClientGoneError:
            raise
        except Exception as err:
            raise job_error(err) from err
        finally:
            if not task.done():  # the job's stream closes here: a waiting job is dropped, a running one stops
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    async def run_job(request: Request, job: Any, who: Principal, key: str, stop: Any = None) -> list[Any]:
        deadline = time.monotonic() + settings.request_timeout_s
        stream = queue.stream(job, deadline, user=who.name, key=key, stop=stop)
        return await watched(request, collect(stream))  # type: ignore[no-any-return]

    def check_id(who: Principal, conversation_id: str) -> str:
        """The store id of the caller's conversation ``conversation_id`` (400 for a malformed id)."""
        if not (ADMIN_ID if who.admin else CONVERSATION_ID).fullmatch(conversation_id):
            raise ApiError(400, "a conversation id has 1 to 64 letters, digits, '_' or '-'", param="conversation_id")
        return who.store_id(conversation_id)

    # ------------------------------------------------------------------ errors

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(ClientGoneError)
    async def _gone(_: Request, err: ClientGoneError) -> Response:
        return Response(status_code=499)  # nobody reads it: the connection is closed

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
        return {"status": "ok", "model": model_name, "auth": not ring.open, "queue": queue.pending}

    # ------------------------------------------------------------------ the API

    api = APIRouter(prefix="/v1", dependencies=[Depends(_authorize)])

    @api.get("/models")
    async def models() -> dict[str, Any]:
        entry = {"id": model_name, "object": "model", "created": started, "owned_by": "moss-agent"}
        return {"object": "list", "data": [entry]}

    @api.get("/plugins")
    async def plugins() -> dict[str, Any]:
        data = [{"key": k, "name": t.name, "description": t.description} for k, t in service.tools.items()]
        return {"object": "list", "data": data, "default": service.default_plugins}

    if settings.openapi:

        @api.get("/openapi.json", include_in_schema=False)
        async def openapi() -> dict[str, Any]:
            return app.openapi()

    @api.get("/conversations")
    def conversations(who: Caller) -> dict[str, Any]:
        return {"object": "list", "data": service.list_conversations(who.public_id)}

    @api.get("/conversations/{conversation_id}")
    def conversation(conversation_id: str, who: Caller) -> dict[str, Any]:
        found = service.conversation(check_id(who, conversation_id), conversation_id)
        if found is None:  # another user's conversation is no different from one that does not exist
            raise ApiError(404, f"no conversation {conversation_id!r}", type="not_found_error")
        return found

    @api.put("/conversations/{conversation_id}/plugins")
    async def set_plugins(conversation_id: str, request: Request, who: Caller) -> Any:
        sid = check_id(who, conversation_id)
        try:
            update = PluginsUpdate.model_validate_json(await read_body(request))
        except ValidationError as err:
            raise ApiError(400, f"invalid body: {err.errors()[0]['msg']}", param="plugins") from err
        (keys,) = await run_job(request, lambda: iter([service.set_plugins(sid, update.plugins)]), who, sid)
        return {"id": conversation_id, "object": "conversation.plugins", "plugins": keys}

    @api.delete("/conversations/{conversation_id}")
    async def delete(conversation_id: str, request: Request, who: Caller) -> Any:
        sid = check_id(who, conversation_id)
        (deleted,) = await run_job(request, lambda: iter([service.store.delete(sid)]), who, sid)
        if not deleted:
            raise ApiError(404, f"no conversation {conversation_id!r}", type="not_found_error")
        return {"id": conversation_id, "object": "conversation.deleted", "deleted": deleted}

    @api.patch("/conversations/{conversation_id}")
    async def rename(conversation_id: str, request: Request, who: Caller) -> Any:
        sid, title = check_id(who, conversation_id), parse_title(await read_body(request))
        (found,) = await run_job(request, lambda: iter([service.store.set_title(sid, title)]), who, sid)
        if not found:
            raise ApiError(404, f"no conversation {conversation_id!r}", type="not_found_error")
        return {"id": conversation_id, "object": "conversation", "title": title}

    @api.delete("/conversations/{conversation_id}/turns/last")
    async def drop_last_turn(conversation_id: str, request: Request, who: Caller) -> Any:
        sid = check_id(who, conversation_id)  # regenerate: drop the last turn, then the page asks it again
        (record,) = await run_job(request, lambda: iter([service.store.pop_turn(sid)]), who, sid)
        if record is None:
            raise ApiError(404, f"no turn in conversation {conversation_id!r}", type="not_found_error")
        return {"id": conversation_id, "object": "conversation.turn.deleted", "human": record.turn.human}

    @api.get("/images/{name}")
    async def image(name: str) -> FileResponse:
        path = service.image_path(name)
        if path is None:
            raise ApiError(404, "no such image", type="not_found_error")
        return FileResponse(path, media_type="image/png")

    @api.post("/chat/completions", response_model=None)
    async def chat_completions(request: Request, who: Caller) -> JSONResponse | StreamingResponse:
        try:
            body = ChatCompletionRequest.model_validate_json(await read_body(request))
        except ValidationError as err:
            problem = err.errors()[0]
            param = ".".join(str(p) for p in problem["loc"])
            raise ApiError(400, f"{param}: {problem['msg']}", param=param) from err
        messages = to_langchain(body.messages)
        size = sum(len(message_text(m).encode()) for m in messages)
        if len(messages) > settings.max_history_messages or size > settings.max_history_bytes:
            raise ApiError(
                400,
                f"the request carries {len(messages)} messages of {size} bytes; this server takes at most "
                f"{settings.max_history_messages} messages of {settings.max_history_bytes} bytes",
                param="messages",
            )
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
        conversation_id = body.conversation_id or request.headers.get("x-conversation-id") or new_session_id()
        sid = check_id(Principal(who.user), conversation_id)  # a turn always runs in the caller's own namespace
        stop = threading.Event()
        turn = TurnRequest(
            sid,
            messages,
            plugins=body.plugins,
            tools=scrub_json(body.tools) if body.tools else None,
            tool_choice=body.tool_choice,
            sampling=body.sampling(),
            max_tokens=max_tokens,
            max_tokens_given=body.requested_max_tokens() is not None,
            public_id=conversation_id,
            cancelled=stop.is_set,
        )
        completion_id = new_completion_id()
        headers = {"X-Conversation-Id": conversation_id}
        if not body.stream:
            events: list[Event] = await run_job(request, lambda: service.run(turn), who, sid, stop)
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
        deadline = time.monotonic() + settings.request_timeout_s
        stream = queue.stream(lambda: service.run(turn), deadline, user=who.name, key=sid, stop=stop)
        try:  # errors before the first event are answered with their HTTP status
            first = await watched(request, anext(stream))
        except BaseException:
            await stream.aclose()  # type: ignore[attr-defined]
            raise
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        events_out = sse(stream, first, completion_id, model_name, conversation_id, include_usage)
        return StreamingResponse(events_out, media_type="text/event-stream", headers={**headers, **_SSE_HEADERS})

    app.include_router(api)

    return app
