"""Typed dependencies: a route's signature says what it needs.

``SessionDep`` commits when the route returns and rolls back when it raises; routes that
enqueue work commit first themselves, so a worker never sees a job that is not in the database.
``CurrentTeam`` authenticates the bearer key and applies the key's rate limit; ``AdminDep``
checks the admin key. Secrets are compared in constant time, and requests with a missing or
wrong key are rate limited per client address, so a flood of guesses is throttled without
spending a real key's budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated, TypeVar

from celery import Celery
from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import QueuePool

from api.errors import TooMany, Unauthorized
from api.ratelimit import Decision, RateLimiter
from service.db.models import ApiKey, Team
from service.settings import Settings
from service.storage import ArtifactStore
from service.teams import hash_key

# Dependencies that do no I/O are ``async``: FastAPI runs a plain ``def`` dependency in its
# thread pool, and each such hop costs more CPU than the rest of these functions together.


async def app_settings(request: Request) -> Settings:
    """The app's settings (set by create_app)."""
    settings: Settings = request.app.state.settings
    return settings


def _end_session(session: Session, commit: bool) -> None:
    """Commit (or roll back) and close ``session``; a failed commit is rolled back."""
    try:
        if commit:
            session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def pool_size(engine: Engine) -> int | None:
    """How many connections ``engine``'s pool keeps open (None: it sets no bound)."""
    pool = engine.pool
    if not isinstance(pool, QueuePool) or pool.size() < 1:
        return None
    return pool.size()


def _session_slots(request: Request) -> asyncio.Semaphore | None:
    """The app's session slots, one per connection its pool keeps open (None: no bound).

    A request takes a slot, waiting on the event loop, before its session exists, so:
    - no thread ever waits in the pool's checkout. Without slots, requests beyond the pool's
      capacity park thread-pool threads there; once every thread is parked, the requests
      holding connections get no thread to finish on, and the process stalls until the
      checkouts time out (30 s): 96 connections on one uvicorn worker did it;
    - sessions never need the pool's overflow connections, which it closes when they come
      back to a full pool: at 64 connections it opened ~50 PostgreSQL connections a second;
    - few threads compete for the GIL: at 64 connections, ~20% less CPU per request.
    """
    state = request.app.state
    if not hasattr(state, "session_slots"):
        size = pool_size(state.engine)
        # Created on first use, inside the event loop that serves the app.
        state.session_slots = None if size is None else asyncio.Semaphore(size)
    slots: asyncio.Semaphore | None = state.session_slots
    return slots


@contextlib.asynccontextmanager
async def session_slot(request: Request) -> AsyncIterator[None]:
    """Hold one of the app's session slots for the block (one per request: a request that
    already holds one does not wait for a second, which could deadlock under load)."""
    slots = _session_slots(request)
    if slots is None or getattr(request.state, "holds_session_slot", False):
        yield
        return
    async with slots:
        request.state.holds_session_slot = True
        try:
            yield
        finally:
            request.state.holds_session_slot = False


async def get_session(request: Request) -> AsyncIterator[Session]:
    """A session that commits on success and rolls back on error, within a session slot.

    Opening a session does no I/O (it connects at its first query), so that part runs on the
    event loop; the commit or rollback and the close, which do, run in the thread pool in one
    hop. (A sync generator costs two hops: FastAPI runs its setup and its teardown there.)
    """
    async with session_slot(request):
        session: Session = request.app.state.sessions()
        request.state.session = session
        try:
            yield session
        except BaseException:
            await run_in_threadpool(_end_session, session, False)
            raise
        finally:
            request.state.session = None
        if session.in_transaction():
            await run_in_threadpool(_end_session, session, True)
        else:
            # Nothing to commit and no connection held: closing does no I/O.
            session.close()


T = TypeVar("T")


def _in_new_session(sessions: sessionmaker[Session], function: Callable[[Session], T]) -> T:
    with sessions() as session:
        return function(session)


async def read_in_session(request: Request, function: Callable[[Session], T]) -> T:
    """Run ``function(session)`` in the thread pool: in the request's session when it has
    one, else in a short one of its own, within a session slot.

    For async routes and dependencies: the event loop never waits on the database.
    """
    session: Session | None = getattr(request.state, "session", None)
    if session is not None:
        return await run_in_threadpool(function, session)
    async with session_slot(request):
        return await run_in_threadpool(_in_new_session, request.app.state.sessions, function)


async def get_store(request: Request) -> ArtifactStore:
    """The artifact store."""
    store: ArtifactStore = request.app.state.store
    return store


async def get_queue(request: Request) -> Celery:
    """The Celery app used to enqueue jobs (by task name)."""
    queue: Celery = request.app.state.queue
    return queue


async def get_rate_limiter(request: Request) -> RateLimiter | None:
    """The app's rate limiter (None when limits are off)."""
    limiter: RateLimiter | None = request.app.state.rate_limiter
    return limiter


SettingsDep = Annotated[Settings, Depends(app_settings)]
RateLimiterDep = Annotated[RateLimiter | None, Depends(get_rate_limiter)]
# scope="function": commit before the response is sent, so a client's next request sees the
# write and a failed commit is an error answer, not a 200 (the default runs it afterwards).
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]
QueueDep = Annotated[Celery, Depends(get_queue)]


# Declares the scheme in the OpenAPI document (so /docs can send keys); checks are ours.
_BEARER_SCHEME = HTTPBearer(auto_error=False, description="A team key, or the admin key.")


def _bearer(request: Request) -> str | None:
    """The bearer token of the request, or None when there is none."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def client_address(request: Request) -> str:
    """The client's IP address as the server saw it (behind a trusted proxy: the forwarded one)."""
    return request.client.host if request.client is not None else "unknown"


def rate_limited(decision: Decision) -> TooMany:
    """The 429 for a refused request, with ``Retry-After`` and the rate-limit headers."""
    return TooMany(
        "rate_limit_exceeded",
        f"rate limit of {decision.limit} requests per minute reached; "
        f"retry after {decision.headers()['Retry-After']} s",
        headers=decision.headers(),
    )


def _refuse(request: Request, limiter: RateLimiter | None, code: str, message: str) -> Unauthorized:
    """The 401 for a missing or wrong key, after counting it against the client's address.

    Raises the 429 instead once that address has failed more often than the limit allows.
    """
    if limiter is not None:
        decision = limiter.hit(f"address:{client_address(request)}")
        if decision is not None and not decision.allowed:
            raise rate_limited(decision)
    return Unauthorized(code, message, headers={"WWW-Authenticate": "Bearer"})


@dataclass(frozen=True)
class KeyGrant:
    """What a valid key grants: its id (for its rate limit) and its team."""

    key_id: str
    team_id: str


_MISSING = ("missing_api_key", "send your API key as 'Authorization: Bearer <key>'")


def _grant_for(session: Session, *, presented: str) -> KeyGrant | None:
    """What the key whose hash is ``presented`` grants; None when it is unknown or revoked.

    Ends its transaction, so a request that needs nothing more from the database closes its
    session without another trip to the thread pool.
    """
    found = session.scalars(select(ApiKey).where(ApiKey.key_hash == presented)).first()
    session.commit()
    # The database compares hashes, not keys: its timing could only tell how many leading
    # digits of SHA-256(guess) match a stored hash, which says nothing about a key. The
    # comparison here is in constant time all the same, so no step compares the key itself
    # in variable time whatever the database does.
    if (
        found is None
        or found.revoked_at is not None
        or not hmac.compare_digest(found.key_hash.encode(), presented.encode())
    ):
        return None
    return KeyGrant(key_id=found.id, team_id=found.team_id)


async def _hit(limiter: RateLimiter, identity: str, cost: int = 1) -> Decision | None:
    """``limiter.hit``, from the thread pool when it waits on the network."""
    if limiter.blocking:
        return await run_in_threadpool(limiter.hit, identity, cost)
    return limiter.hit(identity, cost)


async def _refused(
    request: Request, limiter: RateLimiter | None, code: str, message: str
) -> Unauthorized:
    """:func:`_refuse` without blocking the event loop on a networked limiter."""
    if limiter is not None and limiter.blocking:
        return await run_in_threadpool(_refuse, request, limiter, code, message)
    return _refuse(request, limiter, code, message)


async def current_team_id(
    request: Request,
    _: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER_SCHEME)] = None,
) -> str:
    """The id of the team whose (unrevoked) key authenticates the request, within the key's
    rate limit.

    The limit is counted per key id, so a team's keys have separate budgets; keys listed in
    ``rate_limit_exempt_keys`` have none. One async dependency that does all of it: each
    extra dependency costs FastAPI more than this function's own work.
    """
    state = request.app.state
    settings: Settings = state.settings
    limiter: RateLimiter | None = state.rate_limiter
    token = _bearer(request)
    if token is None:
        raise await _refused(request, limiter, *_MISSING)
    presented = hash_key(token)
    grant = await read_in_session(request, functools.partial(_grant_for, presented=presented))
    if grant is None:
        raise await _refused(
            request, limiter, "invalid_api_key", "the API key is unknown or revoked"
        )
    if limiter is not None and grant.key_id not in settings.rate_limit_exempt_key_ids:
        decision = await _hit(limiter, f"key:{grant.key_id}")
        if decision is not None:
            if not decision.allowed:
                raise rate_limited(decision)
            # RequestContextMiddleware puts the headers on the response, whatever its type.
            request.state.rate_limit = decision
    return grant.team_id


CurrentTeamId = Annotated[str, Depends(current_team_id)]


def current_team(team_id: CurrentTeamId, session: SessionDep) -> Team:
    """The authenticated team's row, for routes that need more than its id."""
    team = session.get(Team, team_id)
    if team is None:  # deleted (with its keys) since the key was checked
        raise Unauthorized(
            "invalid_api_key",
            "the API key is unknown or revoked",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return team


def admin_key_matches(token: str, admin_key: str | None) -> bool:
    """Whether ``token`` is the admin key; constant time in the token's content.

    Both sides are hashed first, so the comparison also takes the same time whatever the
    token's length (``compare_digest`` returns early on a length mismatch).
    """
    if admin_key is None:
        return False
    return hmac.compare_digest(hash_key(token).encode(), hash_key(admin_key).encode())


def require_admin(
    request: Request,
    settings: SettingsDep,
    limiter: RateLimiterDep,
    _: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER_SCHEME)] = None,
) -> None:
    """Allow only the admin key from the settings (compared in constant time).

    The admin key may be a chosen word rather than a random token, so guessing it is the
    attack to slow down: an address that failed more often than the rate limit allows is
    refused (429) before its key is even compared. Requests with the admin key itself are not
    rate limited: they are the operator's.
    """
    if limiter is not None:
        budget = limiter.hit(f"address:{client_address(request)}", cost=0)
        if budget is not None and not budget.allowed:
            raise rate_limited(budget)
    token = _bearer(request)
    if token is None:
        raise _refuse(request, limiter, *_MISSING)
    if settings.admin_key is None:
        # Say so plainly: an operator who forgot the setting would otherwise chase a typo.
        raise _refuse(
            request,
            limiter,
            "invalid_admin_key",
            "admin endpoints are off: the service was started without ASFT_ADMIN_KEY",
        )
    if not admin_key_matches(token, settings.admin_key):
        raise _refuse(request, limiter, "invalid_admin_key", "this endpoint needs the admin key")


CurrentTeam = Annotated[Team, Depends(current_team)]
AdminDep = Depends(require_admin)
