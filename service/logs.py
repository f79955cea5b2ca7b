"""Structured logs: one JSON object per line, carrying the request id or job id in scope.

The API sets ``request_id`` per request (from ``X-Request-ID`` or a fresh one, echoed back);
the worker sets ``job_id`` while it runs a job. Both processes call :func:`configure_logging`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
job_id: ContextVar[str | None] = ContextVar("job_id", default=None)


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", "request_id"?, "job_id"?, "exc"?}``."""

    def format(self, record: logging.LogRecord) -> str:
        """One JSON line."""
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, variable in (("request_id", request_id), ("job_id", job_id)):
            value = getattr(record, name, None) or variable.get()
            if value:
                entry[name] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _not_filesystem_broker_noise(record: logging.LogRecord) -> bool:
    # kombu warns on every connection to the filesystem broker, which has no host by design.
    return not record.getMessage().startswith("No hostname was supplied")


def configure_logging(level: str = "INFO") -> None:
    """Send every logger's records to stderr as JSON lines at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(_not_filesystem_broker_noise)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
