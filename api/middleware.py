"""ASGI middleware: header and body limits (431 and 413 before the body is read), rate-limit
headers, request ids and request metrics."""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import envelope
from api.metrics import LATENCY, REQUESTS
from service import logs

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


class RequestContextMiddleware:
    """What every answer gets, in one layer (each ASGI layer costs every request):

    - a request id (``X-Request-ID`` when the client sends a sane one), in the logs' context
      and echoed in the response;
    - the rate-limit headers of the request's key: ``current_team_id`` decides (and answers
      429 itself) and leaves its decision in the request's state, and they are added here to
      whatever response the route returns (JSON, files);
    - the request's count and latency, labelled by route template (not raw path: bounded).
    """

    def __init__(self, app: ASGIApp) -> None:
        """Wrap ``app``."""
        self.app = app
        # Prometheus's labels() costs a lookup and a lock; a dict of the children does not.
        self._counters: dict[tuple[str, str, int], Any] = {}
        self._timers: dict[tuple[str, str], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one request."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"")
        identifier = given.decode("latin-1")
        if not _SAFE_ID.match(identifier):
            identifier = uuid.uuid4().hex
        token = logs.request_id.set(identifier)
        # The same dict the route's ``request.state`` writes to, even if a layer copies scope.
        state: dict[str, Any] = scope.setdefault("state", {})
        status = 500

        async def decorated_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", []), (b"x-request-id", identifier.encode())]
                decision = state.get("rate_limit")
                if decision is not None:
                    headers += [(k.encode(), v.encode()) for k, v in decision.headers().items()]
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, decorated_send)
        finally:
            logs.request_id.reset(token)
            self._record(scope, status, time.perf_counter() - started)

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        method = scope["method"]
        template = getattr(scope.get("route"), "path", "unmatched")
        counter = self._counters.get((method, template, status))
        if counter is None:
            counter = REQUESTS.labels(method, template, str(status))
            self._counters[(method, template, status)] = counter
        timer = self._timers.get((method, template))
        if timer is None:
            timer = LATENCY.labels(method, template)
            self._timers[(method, template)] = timer
        counter.inc()
        timer.observe(seconds)
