"""Shapes shared by every resource: the error envelope and list pages."""

from __future__ import annotations

import json
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel

T = TypeVar("T")

# Names and references sent in bodies (a model, a key's name, a folder): no control characters.
# PostgreSQL text cannot hold NUL (SQLite can, so the two would disagree), and the rest garble
# logs and headers.
PLAIN_TEXT = r"^[^\x00-\x1f\x7f]*$"


class ErrorBody(BaseModel):
    """What went wrong; ``code`` is machine-readable, ``param`` names the field."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every 4xx and 5xx answer has this body."""

    error: ErrorBody

    model_config = {
        "json_schema_extra": {
            "examples": [
                {
                    "error": {
                        "message": "line 3: invalid JSON: Expecting value",
                        "type": "invalid_request_error",
                        "param": "training_file",
                        "code": "invalid_json",
                    }
                }
            ]
        }
    }


class Page(BaseModel, Generic[T]):
    """One page of a list, newest first; pass the last id as ``after`` for the next page."""

    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


def json_page(items: list[bytes], ids: list[str], has_more: bool) -> bytes:
    """A :class:`Page` as JSON, from its items already encoded (``ids``: theirs, in order)."""
    tail = {
        "has_more": has_more,
        "first_id": ids[0] if ids else None,
        "last_id": ids[-1] if ids else None,
    }
    return b'{"object":"list","data":[%b],%b' % (
        b",".join(items),
        json.dumps(tail, separators=(",", ":"))[1:].encode(),
    )


def page_of(data: list[T], has_more: bool) -> Page[T]:
    """A page of ``data`` (items with an ``id``), its first and last ids filled in."""
    return Page(
        data=data,
        has_more=has_more,
        first_id=getattr(data[0], "id", None) if data else None,
        last_id=getattr(data[-1], "id", None) if data else None,
    )


_DESCRIPTIONS = {
    400: "Malformed request: a body that cannot be parsed, or a bad Content-Length.",
    401: "Missing, unknown or revoked API key.",
    403: "The team may not use this resource (a model that failed the safety gate).",
    404: "No such resource for this team (another team's ids answer 404 too).",
    409: "The resource's state does not allow this.",
    413: "The body is larger than the limit.",
    422: "Invalid parameters or an unusable dataset (the error names the line).",
    429: "Too many requests: the key's rate limit (or, for missing and wrong keys, the "
    "address's), with Retry-After; creating or starting a job, also the team's limit of active "
    "jobs.",
    431: "The request's headers are too many or too large.",
    502: "The inference server could not load the model's adapter (the service's fault).",
    503: "The database, broker or inference server is unreachable, or the schema is out of "
    "date; with Retry-After where trying again helps.",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the error codes a route can return.

    Every route can answer 400 (the body limit refuses a malformed Content-Length on any
    path), 401, 422, 429 (rate limits) and 431 (header limits); ``codes`` adds the route's own.
    """
    return {
        code: {"model": ErrorResponse, "description": _DESCRIPTIONS[code]}
        for code in sorted({400, 401, 422, 429, 431, *codes})
    }
