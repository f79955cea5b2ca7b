"""Conditional GETs: an ``ETag`` on polled answers, and 304 when the client already has it.

The tag is a hash of the exact bytes sent, so it is correct by construction: whoever changed
the row (API, worker, an operator's SQL), a different answer has a different tag, and a 304
is only sent when the client holds these very bytes. The row is still read and encoded to
hash it, so a 304 saves no server CPU: only the bytes on the wire and the client's parsing.
"""

from __future__ import annotations

import hashlib
from typing import Any

from fastapi import Request, Response

# The OpenAPI entry for routes that answer conditional GETs.
NOT_MODIFIED: dict[int | str, dict[str, Any]] = {
    304: {"description": "Not Modified: the ETag sent as If-None-Match is still current."}
}


def entity_tag(body: bytes) -> str:
    """The strong ``ETag`` of ``body`` (quoted, as HTTP wants)."""
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def matches(if_none_match: str | None, tag: str) -> bool:
    """Whether an ``If-None-Match`` header names ``tag`` (``*``, lists and ``W/`` included).

    GET compares weakly (RFC 9110 13.1.2), so ``W/"x"`` matches ``"x"``.
    """
    if not if_none_match:
        return False
    for candidate in if_none_match.split(","):
        candidate = candidate.strip()
        if candidate == "*" or candidate.removeprefix("W/") == tag:
            return True
    return False


def conditional_json(request: Request, body: bytes) -> Response:
    """``body`` as JSON with its ``ETag``, or a bodiless 304 when the client has it."""
    tag = entity_tag(body)
    headers = {"ETag": tag, "Cache-Control": "private, no-cache"}
    if matches(request.headers.get("if-none-match"), tag):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type="application/json", headers=headers)
