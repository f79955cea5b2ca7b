"""One exception family, one handler, one envelope: ``{"error": {message, type, param, code}}``.

Routes raise :class:`ApiError` (or a subclass with its status); FastAPI's validation errors and
HTTP errors are rendered in the same OpenAI-shaped envelope, and anything unexpected becomes a
500 with code ``internal_error`` (logged, never shown).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from service.jobs.create import Refused

logger = logging.getLogger("asft.api")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    502: "server_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """An error with an HTTP status and a machine-readable code."""

    status_code = 400

    def __init__(
        self,
        code: str,
        message: str,
        param: str | None = None,
        status_code: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.headers = headers
        if status_code is not None:
            self.status_code = status_code


class NotFound(ApiError):
    """404: also what another team's ids answer, so ids reveal nothing."""

    status_code = 404


class Unauthorized(ApiError):
    """401: missing, malformed, unknown or revoked key."""

    status_code = 401


def refused(error: Refused) -> ApiError:
    """The API's answer to a request the service refused (403, 404, 422 or 429)."""
    status = {"not_found": 404, "invalid": 422, "limit": 429, "forbidden": 403}[error.kind]
    return ApiError(error.code, error.message, error.param, status_code=status)


class Conflict(ApiError):
    """409: the resource's state forbids the request (e.g. cancelling a finished job)."""

    status_code = 409


class Unprocessable(ApiError):
    """422: well-formed request whose content is unusable (e.g. a dataset without answers)."""

    status_code = 422


class TooLarge(ApiError):
    """413: a body over its size limit."""

    status_code = 413


class TooMany(ApiError):
    """429: a per-team limit is reached."""

    status_code = 429


def envelope(
    status: int, code: str | None, message: str, param: str | None = None
) -> dict[str, Any]:
    """The OpenAI error body."""
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Every method some route serves at ``path``, for the ``Allow`` header of a 405.

    Each method is its own route, and the router puts only the first partly matching route's
    methods in ``Allow``; a client must learn all of them (RFC 9110, section 15.5.6).
    """
    methods: set[str] = set()
    for context in iter_route_contexts(app.routes):
        if context.path is not None and context.methods:
            regex, _, _ = compile_path(context.path)
            if regex.match(path):
                methods |= context.methods
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    """Render every error, ours and the framework's, in the one envelope."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(
            envelope(error.status_code, error.code, error.message, error.param),
            status_code=error.status_code,
            headers=error.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        if first.get("type") == "json_invalid":
            # Its location is a character offset in the body, not a field to name in param.
            offset = first.get("loc", ("body", "?"))[-1]
            reason = first.get("ctx", {}).get("error", "JSON decode error")
            message = f"the body is not valid JSON: {reason} (character {offset})"
            return JSONResponse(envelope(422, "invalid_json", message), status_code=422)
        # The part of the request is not part of the name ("body.model" -> "model").
        parts = ("body", "query", "path", "header")
        location = [str(part) for part in first.get("loc", ()) if part not in parts]
        param = ".".join(location) or None
        message = first.get("msg", "invalid request")
        if param:
            message = f"{param}: {message}"
        return JSONResponse(envelope(422, "invalid_request", message, param), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        # The framework's 400s all come from a body it could not parse (bytes that are not
        # UTF-8 JSON, multipart without a boundary or garbled).
        codes = {
            400: "invalid_body",
            401: "unauthorized",
            404: "not_found",
            405: "method_not_allowed",
        }
        headers = dict(getattr(error, "headers", None) or {})
        if error.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(request.app, request.scope["path"]))
        return JSONResponse(
            envelope(
                error.status_code, codes.get(error.status_code, "http_error"), str(error.detail)
            ),
            status_code=error.status_code,
            headers=headers or None,
        )

    @app.exception_handler(DataError)
    async def _data_error(_: Request, error: DataError) -> JSONResponse:
        # A value the database cannot hold (a NUL character on PostgreSQL, say): the client
        # sent it, so it is a 422, not a 500.
        logger.info("database refused a value: %s", error.orig)
        return JSONResponse(
            envelope(422, "invalid_value", "a value in the request cannot be stored or matched"),
            status_code=422,
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=error)
        return JSONResponse(
            envelope(500, "internal_error", "internal server error"), status_code=500
        )
