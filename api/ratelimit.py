"""Request rate limits: a token bucket per API key, kept in Redis or in this process.

A key may send ``limit`` requests at once and then ``limit`` per minute: its bucket holds at
most ``limit`` tokens, refills at ``limit / 60`` tokens per second, and every request takes
one. A bucket is a pair (tokens, time of the last update); the refill is computed when the
next request comes, so an idle key costs nothing.

With a Redis broker the buckets live in Redis and one server-side script updates a bucket
atomically, so the limit holds across uvicorn worker processes and API replicas. Otherwise
they live in this process, which suits the embedded default (one process). If Redis cannot be
reached, requests go through (the limit protects the service, it is not a quota to account
for) and a warning is logged.

Identities are strings chosen by the caller (``key:<key id>``, ``address:<client ip>``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from service.settings import Settings

logger = logging.getLogger("asft.api")

WINDOW_S = 60.0
# The in-process store forgets full buckets (equal to absent ones) once it holds this many.
MAX_MEMORY_BUCKETS = 100_000
# After Redis fails, skip it for this long, so an outage does not add a timeout to every call.
REDIS_BACKOFF_S = 5.0
REDIS_TIMEOUT_S = 0.5
REDIS_PREFIX = "asft:ratelimit:"


@dataclass(frozen=True)
class Decision:
    """What one request found in its bucket."""

    allowed: bool
    limit: int
    remaining: int
    """Whole tokens left after this request."""
    reset_s: float
    """Seconds until the bucket is full again."""
    retry_after_s: float
    """Seconds until a refused request would be allowed (0 when allowed)."""

    def headers(self) -> dict[str, str]:
        """OpenAI's rate-limit headers, and ``Retry-After`` (whole seconds) on a refusal."""
        headers = {
            "x-ratelimit-limit-requests": str(self.limit),
            "x-ratelimit-remaining-requests": str(self.remaining),
            "x-ratelimit-reset-requests": f"{round(self.reset_s, 3):g}s",
        }
        if not self.allowed:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        return headers


def refill(tokens: float, elapsed_s: float, limit: int) -> float:
    """The tokens of a bucket that held ``tokens`` ``elapsed_s`` seconds ago (at most ``limit``).

    A negative ``elapsed_s`` (a clock stepping back) refills nothing.
    """
    return min(float(limit), tokens + max(0.0, elapsed_s) * limit / WINDOW_S)


def decide(limit: int, tokens: float, allowed: bool) -> Decision:
    """The decision for a bucket left with ``tokens`` (after the request's token was taken)."""
    rate = limit / WINDOW_S
    return Decision(
        allowed=allowed,
        limit=limit,
        remaining=max(0, math.floor(tokens)),
        reset_s=(limit - tokens) / rate,
        retry_after_s=0.0 if allowed else (1.0 - tokens) / rate,
    )


class RateLimiter(Protocol):
    """A store of token buckets."""

    limit: int
    # Whether hit() waits on the network (async code must call it from the thread pool).
    blocking: bool

    def hit(self, identity: str, cost: int = 1) -> Decision | None:
        """Take ``cost`` tokens from ``identity``'s bucket when it holds at least one.

        ``cost=0`` only looks. Returns None when the store cannot be reached (let it through).
        """
        ...


class MemoryRateLimiter:
    """Buckets in this process (one uvicorn worker, the embedded default)."""

    blocking = False

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        """``limit`` requests per minute per identity; ``clock`` in seconds (tests pass one)."""
        self.limit = limit
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        # Sync routes run in a thread pool: two requests of one key may race.
        self._lock = threading.Lock()

    def hit(self, identity: str, cost: int = 1) -> Decision:
        """See :meth:`RateLimiter.hit`; never None."""
        with self._lock:
            now = self._clock()
            tokens, updated_at = self._buckets.get(identity, (float(self.limit), now))
            tokens = refill(tokens, now - updated_at, self.limit)
            allowed = tokens >= 1.0
            if allowed and cost:
                tokens -= cost
                if len(self._buckets) >= MAX_MEMORY_BUCKETS:
                    self._forget_full_buckets(now)
                self._buckets[identity] = (tokens, now)
            return decide(self.limit, tokens, allowed)

    def _forget_full_buckets(self, now: float) -> None:
        for identity, (tokens, updated_at) in list(self._buckets.items()):
            if refill(tokens, now - updated_at, self.limit) >= self.limit:
                del self._buckets[identity]


# KEYS[1]: the bucket; ARGV: limit, cost, window in seconds. The server's clock (TIME) is the
# one clock every API process shares. Returns {allowed (0/1), tokens left as a string} (Redis
# would truncate a Lua number to an integer).
_TAKE_SCRIPT = """
local limit = tonumber(ARGV[1])
local cost = tonumber(ARGV[2])
local rate = limit / tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or limit
local at = tonumber(state[2]) or now
tokens = math.min(limit, tokens + math.max(0, now - at) * rate)
local allowed = 0
if tokens >= 1 then
  allowed = 1
  if cost > 0 then
    tokens = tokens - cost
    redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
    -- A full bucket equals an absent one: let Redis drop it then.
    redis.call('PEXPIRE', KEYS[1], math.ceil((limit - tokens) / rate * 1000) + 1000)
  end
end
return {allowed, tostring(tokens)}
"""


class RedisRateLimiter:
    """Buckets in Redis, shared by every API process using it."""

    blocking = True

    def __init__(self, limit: int, url: str) -> None:
        """``limit`` requests per minute per identity, buckets in the Redis at ``url``."""
        import redis

        self.limit = limit
        self._errors = redis.RedisError
        client: Any = redis.Redis.from_url(
            url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
        )
        self._take = client.register_script(_TAKE_SCRIPT)
        self._skip_until = 0.0

    def hit(self, identity: str, cost: int = 1) -> Decision | None:
        """See :meth:`RateLimiter.hit`."""
        if time.monotonic() < self._skip_until:
            return None
        try:
            allowed, tokens = self._take(
                keys=[REDIS_PREFIX + identity], args=[self.limit, cost, WINDOW_S]
            )
        except self._errors as error:
            self._skip_until = time.monotonic() + REDIS_BACKOFF_S
            logger.warning(
                "rate limits not enforced for %.0f s: Redis failed: %s", REDIS_BACKOFF_S, error
            )
            return None
        return decide(self.limit, float(tokens), bool(allowed))


def make_rate_limiter(settings: Settings) -> RateLimiter | None:
    """The limiter for ``settings``: None when limits are off, Redis with a Redis broker."""
    if settings.rate_limit_per_minute == 0:
        return None
    broker = settings.broker_url or ""
    if broker.startswith(("redis://", "rediss://")):
        return RedisRateLimiter(settings.rate_limit_per_minute, broker)
    return MemoryRateLimiter(settings.rate_limit_per_minute)
