"""Teams and their API keys: keys are random tokens, shown once and stored as SHA-256."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy.orm import Session

from asft_core.spec import Gate
from service.db.models import ApiKey, Team, new_id
from service.settings import Settings

KEY_PREFIX = "asft-"


def hash_key(key: str) -> str:
    """How keys are stored: SHA-256 hex (keys are random tokens, so no slow hash is needed)."""
    return hashlib.sha256(key.encode()).hexdigest()


def issue_key(session: Session, team_id: str, name: str) -> tuple[ApiKey, str]:
    """A new random key for ``team_id``; returns the row and the secret."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        id=new_id("key"), team_id=team_id, name=name, key_hash=hash_key(secret), prefix=secret[:12]
    )
    session.add(key)
    session.flush()
    return key, secret


def create_team_with_key(session: Session, name: str) -> tuple[Team, str]:
    """A new team and its first key (the secret is returned once, stored hashed)."""
    team = Team(id=new_id("team"), name=name)
    session.add(team)
    session.flush()
    _, secret = issue_key(session, team.id, "default")
    return team, secret


def team_gate(team: Team, settings: Settings) -> Gate:
    """The safety gate a team's jobs face: the team's own limits, else the service's."""
    return Gate(
        team.gate_max_harmful_score
        if team.gate_max_harmful_score is not None
        else settings.gate_max_harmful_score,
        team.gate_max_harmful_increase
        if team.gate_max_harmful_increase is not None
        else settings.gate_max_harmful_increase,
    )
