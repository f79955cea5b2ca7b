"""``/v1/admin``: teams, their limits and gate thresholds, and API keys (admin key only)."""

from __future__ import annotations

import secrets

from fastapi import APIRouter
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from api.deps import AdminDep, SessionDep, SettingsDep
from api.errors import Conflict, NotFound, Unprocessable
from api.lookup import owned_row
from api.schemas.admin import KeyCreate, KeyObject, TeamCreate, TeamObject, TeamUpdate
from api.schemas.common import Page, errors
from service.db.models import ApiKey, Team, new_id, now
from service.storage import is_id
from service.teams import issue_key
from service.webhooks import WebhookRefused, check_url

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[AdminDep])


def team_object(team: Team) -> TeamObject:
    """The API shape of a team."""
    return TeamObject(
        id=team.id,
        name=team.name,
        created_at=team.created_at,
        max_active_jobs=team.max_active_jobs,
        gate_max_harmful_score=team.gate_max_harmful_score,
        gate_max_harmful_increase=team.gate_max_harmful_increase,
        data_policy=team.data_policy,
        allow_unapproved_chat=team.allow_unapproved_chat,
        webhook_url=team.webhook_url,
        webhook_secret=team.webhook_secret,
    )


def key_object(key: ApiKey, secret: str | None = None) -> KeyObject:
    """The API shape of a key; the secret only when just created."""
    return KeyObject(
        id=key.id,
        team_id=key.team_id,
        name=key.name,
        prefix=key.prefix,
        created_at=key.created_at,
        revoked_at=key.revoked_at,
        key=secret,
    )


def _team(session: SessionDep, team_id: str) -> Team:
    # A string that is not an id names no team (and a NUL in it would make PostgreSQL fail).
    team = session.get(Team, team_id) if is_id(team_id) else None
    if team is None:
        raise NotFound("team_not_found", f"no team {team_id!r}", "team_id")
    return team


@router.post("/teams", response_model=TeamObject, responses=errors(409, 413))
def create_team(session: SessionDep, body: TeamCreate) -> TeamObject:
    """Create a team (then give it keys)."""
    if session.scalar(select(Team).where(Team.name == body.name)) is not None:
        raise Conflict("team_exists", f"a team named {body.name!r} exists", "name")
    team = Team(id=new_id("team"), name=body.name)
    session.add(team)
    try:
        session.flush()
    except IntegrityError:  # created concurrently by another request
        raise Conflict("team_exists", f"a team named {body.name!r} exists", "name") from None
    return team_object(team)


@router.get("/teams", response_model=Page[TeamObject], responses=errors())
def list_teams(session: SessionDep) -> Page[TeamObject]:
    """Every team."""
    teams = session.scalars(select(Team).order_by(Team.created_at, Team.id))
    return Page(data=[team_object(t) for t in teams], has_more=False)


@router.patch("/teams/{team_id}", response_model=TeamObject, responses=errors(404, 413))
def update_team(
    session: SessionDep, settings: SettingsDep, team_id: str, body: TeamUpdate
) -> TeamObject:
    """Set a team's job limit, safety-gate thresholds, data policy, chat or webhook URL.

    A webhook URL must not reach private or loopback addresses unless allow-listed (422
    ``webhook_url_not_allowed``); the first URL set gives the team its signing secret.
    """
    team = _team(session, team_id)
    for field, value in body.model_dump(exclude_unset=True).items():
        if field == "webhook_url" and value:
            value = str(value)
            try:
                check_url(value, settings.webhook_allowlist, require_resolution=False)
            except WebhookRefused as error:
                raise Unprocessable(error.code, str(error), "webhook_url") from None
            team.webhook_secret = team.webhook_secret or secrets.token_hex(32)
        if field == "allow_unapproved_chat":
            value = bool(value)  # null: back to the default, off
        setattr(team, field, value)
    session.flush()
    return team_object(team)


@router.post("/teams/{team_id}/keys", response_model=KeyObject, responses=errors(404, 413))
def create_key(session: SessionDep, team_id: str, body: KeyCreate) -> KeyObject:
    """A new key for the team; its secret is in this answer only."""
    _team(session, team_id)
    key, secret = issue_key(session, team_id, body.name)
    return key_object(key, secret)


@router.get("/teams/{team_id}/keys", response_model=Page[KeyObject], responses=errors(404))
def list_keys(session: SessionDep, team_id: str) -> Page[KeyObject]:
    """The team's keys, without their secrets."""
    _team(session, team_id)
    keys = session.scalars(
        select(ApiKey).where(ApiKey.team_id == team_id).order_by(ApiKey.created_at, ApiKey.id)
    )
    return Page(data=[key_object(k) for k in keys], has_more=False)


@router.delete("/teams/{team_id}/keys/{key_id}", response_model=KeyObject, responses=errors(404))
def revoke_key(session: SessionDep, team_id: str, key_id: str) -> KeyObject:
    """Revoke a key: it answers 401 from now on."""
    missing = NotFound("key_not_found", f"no key {key_id!r} in team {team_id!r}", "key_id")
    key = owned_row(session, ApiKey, key_id, team_id, missing)
    if key.revoked_at is None:
        key.revoked_at = now()
    session.flush()
    return key_object(key)
