r"""``moss-agent serve``: an OpenAI-compatible MOSS backend that runs MOSS's plugins, and a web chat page.

The MOSS release shipped a Go backend (runs the plugins, stores conversations) and a Flutter front end; this
is their equivalent on the library, for any OpenAI-compatible client. Needs the ``serve`` extra (FastAPI,
uvicorn)::

    moss-agent serve --model fnlp/moss-moon-003-sft-plugin --plugins calculator,solver,text2image --api-key KEY

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
    reply = client.chat.completions.create(model="moss", messages=[{"role": "user", "content": "2^10?"}])
    reply.choices[0].message.content, reply.conversation_id, reply.choices[0].message.moss

Routes (all ``/v1`` routes need ``Authorization: Bearer KEY`` when the server has keys; POST and PUT bodies
must be ``application/json``; see "Safety" below):

* ``POST /v1/chat/completions``: OpenAI's request (``stream``, ``max_tokens``, ``temperature``, ``top_p``,
  ``stop``, ``seed``, ``tools``, ``tool_choice``) plus two fields, ``conversation_id`` (or the
  ``X-Conversation-Id`` header; a new id when absent, returned as ``conversation_id`` and in the
  ``X-Conversation-Id`` response header) and ``plugins`` (plugin keys to switch on for the conversation).
* ``GET /v1/models``, ``GET /health`` (open), ``GET /v1/plugins``.
* ``GET /v1/conversations``, ``GET|DELETE /v1/conversations/{id}``, ``PUT /v1/conversations/{id}/plugins``
  with ``{"plugins": [...]}``.
* ``GET /v1/images/{uuid}.png``: pictures Text2Image drew (only uuid names inside the image folder).
* ``GET /``: the chat page (``/static/page.js``, ``/static/page.css``); no build step, nothing from a CDN.
* ``GET /v1/openapi.json``: the schema, only with ``ServerSettings(openapi=True)``.

Conversations. The earlier turns come from the store when the conversation has stored turns; otherwise from
the request's messages before the last user message (at most ``max_history_messages`` messages and
``max_history_bytes`` bytes), which are stored with the turn, in one transaction, as the conversation's
start. So a client either sends the whole history each time (as OpenAI clients do) or only the new message
with a ``conversation_id``. The conversation's plugin switches are the switch block of its stored system text;
a system message sets the conversation's instructions when it starts and later applies to its own turn only.
A turn stores nothing until it is whole: a refused, cancelled or cut-off request leaves no trace.

Server-side plugins. A request without ``tools`` runs MOSS's plugin loop (pass 1, the switched-on plugins,
pass 2) and returns the reply as ``content`` with the extension field ``moss`` on the message::

    "moss": {"conversation_id": "...", "turn_index": 0, "plugins": ["calculator"],
             "inner_thoughts": "..." | null, "commands": "Calculate(\"2^10\")", "results": "<raw results>",
             "runs": [{"command": "Calculate(\"2^10\")", "tool": "Calculate", "args": {...}, "output": "'1024'",
                       "error": null, "ran": true, "artifact": <JSON> | null, "image_url": "/v1/images/..." | null}],
             "images": ["/v1/images/<uuid>.png"]}

and the inner thoughts also as ``reasoning_content``. Streamed, the reply comes as ``delta.content``; the
thoughts, each command and each result as ``delta.moss`` events (``{"type": "thoughts", "text"}``,
``{"type": "command", "command", "tool"}``, ``{"type": "result", ...run}``), and the last chunk carries
``delta.moss`` with ``"type": "turn"`` and the whole object above.

Client-side tools. A request with ``tools`` binds them to ChatMoss (``bind_tools``): MOSS's commands come back
as ``tool_calls`` (OpenAI shape, ``arguments`` a JSON string, ``finish_reason: "tool_calls"``); the client runs
them and sends ``role: "tool"`` answers; the turn is stored once MOSS replies. A malformed command comes back
as a call whose arguments do not parse; the client's error answer reaches MOSS as its result.

Limits: request bodies over ``max_request_bytes`` get 413, ``max_tokens`` over ``max_tokens_limit`` 400 (and a
plugin turn whose two passes cannot fit the context window 400, before pass 1), a full queue or a user's full
share of it 429 with ``Retry-After``, a request past its time limit 504. A temperature below 1e-5 means greedy;
``top_p``, ``seed`` and ``stop`` are checked (400). Errors have OpenAI's shape ``{"error": {"message", "type",
"param", "code"}}``; during a stream, an error is sent as such an event.

Scheduling. Turns run side by side (``workers``), one at a time per conversation, taken from the users' queues
in turn (:class:`~moss_agent.server.queue.ModelQueue`); their generations share the model's forward passes
(continuous batching, :class:`~moss_agent.server.batching.BatchingEngine`). A client that disconnects, streamed
or not, cancels its turn: a waiting one never runs, a running one stops within a token.

Safety (:mod:`~moss_agent.server.security`, :mod:`~moss_agent.server.users`). Requests must name an allowed
``Host`` (loopback names, ``--host``, ``--allowed-host``) and, from a browser, come from the server's own
origin; every response carries a CSP (own origin, ``frame-ancestors 'none'``), ``X-Frame-Options`` and
``nosniff``. Keys: none (loopback only), one ``api_key``, or a keys file mapping keys to users, each of whom
sees only their own conversations (another's id is 404), plus an optional admin key. Every untrusted string
that reaches a prompt is scrubbed (:mod:`~moss_agent.server.schemas`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moss_agent.server.app import create_app
    from moss_agent.server.schemas import ServerSettings

__all__ = ["ServerSettings", "create_app"]


def __getattr__(name: str) -> Any:
    # FastAPI is imported only when the app is built, so that the CLI starts fast without the serve extra.
    if name == "create_app":
        from moss_agent.server.app import create_app

        return create_app
    if name == "ServerSettings":
        from moss_agent.server.schemas import ServerSettings

        return ServerSettings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
