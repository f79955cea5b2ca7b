"""Typed dependencies: a route's signature says what it needs.

``SessionDep`` commits when the route returns and rolls back when it raises; routes that
enqueue work commit first themselves, so a worker never sees a job that is not in the database.
``CurrentTeam`` authenticates the bearer key; ``AdminDep`` checks the admin key.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator
from typing import Annotated

from celery import Celery
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.db.models import ApiKey, Team
from api.errors import Unauthorized
from api.settings import Settings
from api.storage import ArtifactStore


def get_settings(request: Request) -> Settings:
    """The app's settings (set by create_app)."""
    settings: Settings = request.app.state.settings
    return settings


def get_session(request: Request) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session: Session = request.app.state.sessions()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def get_store(request: Request) -> ArtifactStore:
    """The artifact store."""
    store: ArtifactStore = request.app.state.store
    return store


def get_queue(request: Request) -> Celery:
    """The Celery app used to enqueue jobs (by task name)."""
    queue: Celery = request.app.state.queue
    return queue


SettingsDep = Annotated[Settings, Depends(get_settings)]
# scope="function": commit before the response is sent, so a client's next request sees the
# write and a failed commit is an error answer, not a 200 (the default runs it afterwards).
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]
QueueDep = Annotated[Celery, Depends(get_queue)]


def hash_key(key: str) -> str:
    """How keys are stored: SHA-256 hex (keys are random tokens, so no slow hash is needed)."""
    return hashlib.sha256(key.encode()).hexdigest()


# Declares the scheme in the OpenAPI document (so /docs can send keys); checks are ours.
_BEARER_SCHEME = HTTPBearer(auto_error=False, description="A team key, or the admin key.")


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized(
            "missing_api_key",
            "send your API key as 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return token.strip()


def current_team(
    request: Request,
    session: SessionDep,
    _: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER_SCHEME)] = None,
) -> Team:
    """The team whose (unrevoked) key authenticates the request."""
    key = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(_bearer(request))))
    # The lookup is by hash, but compare once more in constant time: equal work either way.
    if (
        key is None
        or key.revoked_at is not None
        or not hmac.compare_digest(key.key_hash, hash_key(_bearer(request)))
    ):
        raise Unauthorized(
            "invalid_api_key",
            "the API key is unknown or revoked",
            headers={"WWW-Authenticate": "Bearer"},
        )
    team = session.get(Team, key.team_id)
    assert team is not None
    return team


def require_admin(
    request: Request,
    settings: SettingsDep,
    _: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER_SCHEME)] = None,
) -> None:
    """Allow only the admin key from the settings (compared in constant time)."""
    token = _bearer(request)
    if settings.admin_key is None or not hmac.compare_digest(
        token.encode(), settings.admin_key.encode()
    ):
        raise Unauthorized(
            "invalid_admin_key",
            "this endpoint needs the admin key",
            headers={"WWW-Authenticate": "Bearer"},
        )


CurrentTeam = Annotated[Team, Depends(current_team)]
AdminDep = Depends(require_admin)
