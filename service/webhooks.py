"""Job webhooks: where they may go, how they are signed, and delivery with retries.

A team's URL receives ``fine_tuning.job.succeeded|failed|cancelled`` as JSON, signed with
``X-ASFT-Signature: t=<epoch>,v1=<hex HMAC-SHA256 of "<epoch>.<body>" under the team's
secret>``. URLs that resolve to private, loopback or link-local addresses are refused (no
reaching into the service's own network) unless their host is allow-listed in settings; the
check is made when the URL is set and again before every delivery (DNS can change).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx

SIGNATURE_HEADER = "X-ASFT-Signature"


class WebhookRefused(ValueError):
    """A URL the service will not call; ``code`` is machine-readable."""

    code = "webhook_url_not_allowed"


def _allowed(host: str, address: str, allowlist: Sequence[str]) -> bool:
    ip = ipaddress.ip_address(address)
    for entry in allowlist:
        if entry == host:
            return True
        try:
            if ip in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    return ip.is_global and not ip.is_multicast


def check_url(url: str, allowlist: Sequence[str], require_resolution: bool = True) -> None:
    """Raise :class:`WebhookRefused` unless ``url`` is http(s) to allowed addresses only.

    ``require_resolution=False`` (when a URL is set) lets a host that does not resolve yet
    pass; delivery always resolves and checks again.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookRefused("the webhook URL must be http or https with a host")
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 443, proto=socket.IPPROTO_TCP)
    except socket.gaierror as error:
        if not require_resolution:
            return
        raise WebhookRefused(f"cannot resolve {parts.hostname}: {error}") from None
    for *_, address in infos:
        if not _allowed(parts.hostname, str(address[0]), allowlist):
            raise WebhookRefused(
                f"{parts.hostname} resolves to {address[0]}, a private or loopback address "
                "(allow-list it in ASFT_WEBHOOK_ALLOWLIST to permit it)"
            )


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value for ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


def verify(secret: str, header: str, body: bytes, tolerance_s: int = 300) -> bool:
    """Check a signature header (for receivers, and the tests)."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), header)


def payload(job: dict[str, Any], event_id: str) -> dict[str, Any]:
    """The event body for a finished job."""
    return {
        "object": "event",
        "id": event_id,
        "type": f"fine_tuning.job.{job['status']}",
        "created_at": int(time.time()),
        "data": job,
    }


def deliver(
    url: str,
    secret: str,
    body: dict[str, Any],
    allowlist: Sequence[str],
    attempts: int = 5,
    backoff_s: float = 1.0,
    timeout_s: float = 10.0,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[bool, int, str]:
    """POST ``body`` until a 2xx answer, waiting backoff_s * 2^n between tries.

    Returns (delivered, attempts made, last outcome). 4xx answers other than 408 and 429
    are final: the receiver said no.
    """
    encoded = json.dumps(body, separators=(",", ":")).encode()
    outcome = ""
    for attempt in range(1, attempts + 1):
        try:
            check_url(url, allowlist)
            timestamp = int(time.time())
            response = httpx.post(
                url,
                content=encoded,
                timeout=timeout_s,
                follow_redirects=False,
                headers={
                    "Content-Type": "application/json",
                    SIGNATURE_HEADER: sign(secret, timestamp, encoded),
                    "X-ASFT-Event-Id": str(body["id"]),
                },
            )
            outcome = f"HTTP {response.status_code}"
            if response.is_success:
                return True, attempt, outcome
            if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
                return False, attempt, outcome
        except WebhookRefused as error:
            return False, attempt, str(error)
        except httpx.HTTPError as error:
            outcome = f"{type(error).__name__}: {error}"
        if attempt < attempts:
            sleep(backoff_s * 2 ** (attempt - 1))
    return False, attempts, outcome
