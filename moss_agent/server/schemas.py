"""The wire format: OpenAI chat-completion requests and responses, the ``moss`` extension, errors, settings.

Everything a client sends that can reach a prompt is scrubbed here, at the boundary (:func:`to_langchain`):
assistant text, ``reasoning_content``, tool-call names and arguments (tool definitions: :func:`scrub_json`, in
the app). A client's messages never carry LangChain ``additional_kwargs``, so no client field (``moss_verbatim``
or any other) can switch scrubbing off. User text, system text and tool answers are scrubbed where the prompt
is built (tool answers keep the ``<|N|>`` hit numbers of Search results only).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.messages.tool import invalid_tool_call, tool_call
from pydantic import BaseModel, ConfigDict, Field, field_validator

from moss_agent.messages import REASONING
from moss_agent.protocol.format import scrub

if TYPE_CHECKING:
    from moss_agent.server.users import KeyRing

__all__ = [
    "CONVERSATION_ID",
    "ApiError",
    "ChatCompletionRequest",
    "ChatMessage",
    "PluginsUpdate",
    "ServerSettings",
    "chunk",
    "completion",
    "error_body",
    "to_langchain",
    "usage",
]

CONVERSATION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""What a conversation id may look like (the store's ids are 32 hex digits)."""
GREEDY_BELOW = 1e-5
"""A temperature below this means greedy decoding (dividing logits by it would overflow)."""


@dataclass(frozen=True)
class ServerSettings:
    """Limits and options of a server.

    Attributes:
        api_key: When set, every ``/v1`` request needs ``Authorization: Bearer <api_key>``.
        model_name: The model id the server reports; the engine's ``model_name`` when None.
        max_request_bytes: Larger request bodies are refused with 413.
        max_tokens_limit: Largest ``max_tokens`` a request may ask for (per generation pass).
        request_timeout_s: Time limit of one request, waiting in the queue included.
        max_queue: Most requests waiting for the model at once; more are refused with 429.
        default_plugins: Plugin keys a new conversation starts with; every configured plugin when None.
        keys: Users and their keys (``--keys FILE``, optional admin key); with ``api_key`` they make one ring.
        admin_key: A key that may list, read and delete every user's conversations.
        allowed_hosts: Host names the server answers to besides the loopback names (``--host``,
            ``--allowed-host``: the public name behind a reverse proxy).
        max_history_messages: Most messages one request may carry (earlier turns it imports included).
        max_history_bytes: Most bytes of message text one request may carry.
        max_batch: Most generations the engine batches together.
        workers: Turns running at once (their generations are batched); ``max_batch`` when None.
        max_queue_per_user: Most requests of one user waiting or running; half of ``max_queue`` when there
            are several users, else ``max_queue``.
        openapi: Serve the OpenAPI schema at ``/v1/openapi.json`` (behind the key).
    """

    api_key: str | None = None
    model_name: str | None = None
    max_request_bytes: int = 1_000_000
    max_tokens_limit: int = 1024
    request_timeout_s: float = 300.0
    max_queue: int = 64
    default_plugins: tuple[str, ...] | None = None
    keys: KeyRing | Mapping[str, str] | None = None
    admin_key: str | None = None
    allowed_hosts: tuple[str, ...] = ()
    max_history_messages: int = 256
    max_history_bytes: int = 400_000
    max_batch: int = 8
    workers: int | None = None
    max_queue_per_user: int | None = None
    openapi: bool = False


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The JSON body."""
        return error_body(self.message, self.type, self.code, self.param)


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """An OpenAI-shaped error body."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---------------------------------------------------------------- requests


class FunctionCall(BaseModel):
    """A function call inside an assistant message."""

    name: str
    arguments: str = ""


class ToolCallIn(BaseModel):
    """A tool call of an assistant message, as the client sends it back."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    """One message of a request (unknown fields are ignored)."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    """MOSS's inner thoughts of an assistant message, as the server sent them (kept when echoed back)."""


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``: OpenAI's fields plus ``conversation_id`` and ``plugins``.

    OpenAI fields the server has no use for (``user``, ``logprobs`` ...) are accepted and ignored.
    """

    model_config = ConfigDict(extra="ignore")

    model: str = ""
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    n: int = Field(default=1, ge=1, le=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    conversation_id: str | None = Field(default=None, pattern=CONVERSATION_ID.pattern)
    """The conversation to continue (or to create under this id); a new one when absent."""
    plugins: list[str] | None = None
    """Plugin keys to switch on for this conversation from this turn on (saved with it)."""

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        strings = [stop] if isinstance(stop, str) else stop or []
        if len(strings) > 4 or any(not 1 <= len(s) <= 100 for s in strings):
            raise ValueError("stop is at most 4 strings of 1 to 100 characters")
        return stop

    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` or ``max_tokens``."""
        return self.max_completion_tokens or self.max_tokens

    def sampling(self) -> dict[str, Any]:
        """The ChatMoss fields this request sets."""
        out: dict[str, Any] = {}
        if self.temperature is not None:
            if self.temperature < GREEDY_BELOW:  # 1e-37 would overflow the logits: it means greedy
                out["do_sample"] = False
            else:
                out["temperature"] = self.temperature
                out["do_sample"] = True
        if self.top_p is not None:
            out["top_p"] = self.top_p
        if self.seed is not None:
            out["seed"] = self.seed
        if self.stop:
            out["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return out


class PluginsUpdate(BaseModel):
    """``PUT /v1/conversations/{id}/plugins``."""

    plugins: list[str]


def _text(message: ChatMessage, index: int) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    parts = []
    for part in message.content:
        if part.get("type") != "text":
            raise ApiError(400, f"MOSS reads text only; messages[{index}] has a {part.get('type')!r} part")
        parts.append(str(part.get("text", "")))
    return "".join(parts)


def scrub_json(value: Any) -> Any:
    """``value`` with every string in it (keys included) scrubbed."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {scrub(str(k)): scrub_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_json(v) for v in value]
    return value


def to_langchain(messages: list[ChatMessage]) -> list[BaseMessage]:
    """OpenAI messages as LangChain messages, with the text that only a client could have written scrubbed.

    Tool-call arguments that are not a JSON object become an invalid tool call with the same id, so that the
    client's error answer reaches MOSS as a result, as LangChain agents do it. User and system text is left
    for the prompt builders, which scrub it (and must see it as sent, to store it as sent).

    Raises:
        ApiError: For content MOSS cannot read.
    """
    out: list[BaseMessage] = []
    for i, message in enumerate(messages):
        text = _text(message, i)
        if message.role in ("system", "developer"):
            out.append(SystemMessage(text))
        elif message.role == "user":
            out.append(HumanMessage(text))
        elif message.role == "tool":
            if not message.tool_call_id:
                raise ApiError(400, f"messages[{i}] (role 'tool') needs a tool_call_id", param=f"messages[{i}]")
            out.append(ToolMessage(text, tool_call_id=message.tool_call_id))  # scrubbed as results are built
        else:
            calls, bad = [], []
            for call in message.tool_calls or ():
                try:
                    args = json.loads(call.function.arguments or "{}")
                except json.JSONDecodeError:
                    args = None
                name = scrub(call.function.name)
                if isinstance(args, dict):
                    calls.append(tool_call(name=name, args=scrub_json(args), id=call.id))
                else:
                    bad.append(invalid_tool_call(name=name, args=scrub(call.function.arguments), id=call.id))
            extra = {REASONING: scrub(message.reasoning_content)} if message.reasoning_content else {}
            out.append(AIMessage(scrub(text), tool_calls=calls, invalid_tool_calls=bad, additional_kwargs=extra))
    return out


# ---------------------------------------------------------------- responses


def new_completion_id() -> str:
    """A fresh ``chatcmpl-...`` id."""
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(metadata: dict[str, Any] | None) -> dict[str, int]:
    """OpenAI usage from LangChain usage metadata (or a TurnResult's usage)."""
    metadata = metadata or {}
    prompt, completion_tokens = int(metadata.get("input_tokens", 0)), int(metadata.get("output_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}


def completion(
    completion_id: str,
    model: str,
    conversation_id: str,
    message: dict[str, Any],
    finish_reason: str,
    token_usage: dict[str, int],
) -> dict[str, Any]:
    """A ``chat.completion`` object."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "conversation_id": conversation_id,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
        "usage": token_usage,
    }


def chunk(
    completion_id: str,
    model: str,
    conversation_id: str,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    token_usage: dict[str, int] | None = None,
) -> str:
    """One server-sent event with a ``chat.completion.chunk`` (no choice when ``delta`` is None: usage only)."""
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "conversation_id": conversation_id,
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }
    if token_usage is not None:
        body["usage"] = token_usage
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
