"""ASGI middleware: header and body limits (431 and 413 before the body is read), rate-limit
headers, request ids and request metrics."""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import logs
from api.errors import envelope
from api.metrics import LATENCY, REQUESTS

_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{8,64}$")
# Multipart framing around an uploaded file (boundaries, part headers, the purpose field).
MULTIPART_OVERHEAD_BYTES = 64 * 1024
# No client of this API needs more; uvicorn (h11 or httptools) has no limit on the count.
MAX_HEADER_COUNT = 100
# What a header line adds to its name and value on the wire: ": " and CRLF.
HEADER_LINE_OVERHEAD_BYTES = 4


class HeaderLimitMiddleware:
    """Refuse requests with too many or too large headers with a 431, before any work.

    The server bounds what it buffers of a request head (``asft api`` passes
    ``max_header_bytes`` to uvicorn), but a head that arrives in one read gets through it; this
    check answers every oversized one the same way, in the error envelope.
    """

    def __init__(self, app: ASGIApp, max_header_bytes: int, max_header_count: int) -> None:
        """Wrap ``app``: at most ``max_header_count`` headers of ``max_header_bytes`` in all."""
        self.app = app
        self.max_header_bytes = max_header_bytes
        self.max_header_count = max_header_count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one request."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        size = sum(len(name) + len(value) + HEADER_LINE_OVERHEAD_BYTES for name, value in headers)
        if len(headers) > self.max_header_count:
            await _respond(
                send,
                431,
                "too_many_headers",
                f"the request has {len(headers)} headers; at most {self.max_header_count} are"
                " accepted",
            )
        elif size > self.max_header_bytes:
            await _respond(
                send,
                431,
                "headers_too_large",
                f"the request's headers take {size} bytes; at most {self.max_header_bytes} are"
                " accepted",
            )
        else:
            await self.app(scope, receive, send)


class RateLimitHeadersMiddleware:
    """Put the rate-limit headers of the request's key on its response.

    ``current_team`` decides (and answers 429 itself); it leaves the decision in the request's
    state, and this adds the headers to whatever response the route returns (JSON, files).
    """

    def __init__(self, app: ASGIApp) -> None:
        """Wrap ``app``."""
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one request."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # The same dict the route's ``request.state`` writes to, even if a layer copies scope.
        state: dict[str, Any] = scope.setdefault("state", {})

        async def send_with_headers(message: Message) -> None:
            decision = state.get("rate_limit")
            if message["type"] == "http.response.start" and decision is not None:
                added = [
                    (name.encode(), value.encode()) for name, value in decision.headers().items()
                ]
                message["headers"] = [*message.get("headers", []), *added]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class BodyLimitMiddleware:
    """Refuse request bodies over their limit with a 413, without buffering them.

    A declared Content-Length over the limit is refused before any byte is read; a body that
    grows past it (chunked uploads) is cut off as soon as it does. Uploads get their own limit.
    """

    def __init__(
        self, app: ASGIApp, default_limit: int, upload_limit: int, upload_paths: set[str]
    ) -> None:
        """Wrap ``app``: ``upload_paths`` get ``upload_limit``, other paths ``default_limit``."""
        self.app = app
        self.default_limit = default_limit
        self.upload_limit = upload_limit
        self.upload_paths = upload_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one request."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = scope["path"] in self.upload_paths
        limit = self.upload_limit + MULTIPART_OVERHEAD_BYTES if upload else self.default_limit
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await _respond(
                    send, 400, "invalid_content_length", "Content-Length is not a number"
                )
                return
            if int(declared) > limit:
                await _reject(send, limit)
                return
        received, rejected, started = 0, False, False

        async def limited_receive() -> Message:
            nonlocal received, rejected
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    rejected = True
                    if not started:
                        await _reject(send, limit)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if rejected:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not rejected:
                raise


async def _reject(send: Send, limit: int) -> None:
    await _respond(send, 413, "request_too_large", f"the request body is larger than {limit} bytes")


async def _respond(send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps(envelope(status, code, message)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestIdMiddleware:
    """Give each request an id (``X-Request-ID`` when the client sends a sane one), put it in
    the logs' context and echo it in the response."""

    def __init__(self, app: ASGIApp) -> None:
        """Wrap ``app``."""
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one request."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        identifier = given if _SAFE_ID.match(given) else uuid.uuid4().hex
        token = logs.request_id.set(identifier)

        async def tagged_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", identifier.encode()),
                ]
            await send(message)

        try:
            await self.app(scope, receive, tagged_send)
        finally:
            logs.request_id.reset(token)


class MetricsMiddleware:
    """Count requests and time them, labelled by route template (not raw path: bounded labels)."""

    def __init__(self, app: ASGIApp) -> None:
        """Wrap ``app``."""
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one request."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status: dict[str, Any] = {"code": 500}

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            REQUESTS.labels(scope["method"], template, str(status["code"])).inc()
            LATENCY.labels(scope["method"], template).observe(time.perf_counter() - started)
