"""The chat page's files and the small parsing its own routes need (the routes are in :mod:`.app`)."""

from __future__ import annotations

import json

from moss_agent.server.schemas import ApiError

__all__ = ["PAGE_FILES", "TITLE_LIMIT", "parse_title"]

PAGE_FILES = {
    "page.js": "text/javascript",
    "markdown.js": "text/javascript",
    "turn.js": "text/javascript",
    "page.css": "text/css",
    "favicon.svg": "image/svg+xml",
}
"""The files under ``/static/`` and their media types (the page loads nothing from elsewhere)."""

TITLE_LIMIT = 200
"""The longest title a conversation may be given."""


def parse_title(body: bytes) -> str | None:
    """The title of a ``PATCH /v1/conversations/{id}`` body ``{"title": "..."}``; None (or "") resets it.

    Raises:
        ApiError: 400 for anything else.
    """
    try:
        data = json.loads(body)
    except ValueError:
        raise ApiError(400, "the body is not JSON", param="title") from None
    title = data.get("title") if isinstance(data, dict) else None
    if title is not None and not isinstance(title, str):
        raise ApiError(400, "title: a string or null", param="title")
    title = " ".join((title or "").split())
    if len(title) > TITLE_LIMIT:
        raise ApiError(400, f"title: at most {TITLE_LIMIT} characters", param="title")
    return title or None
