"""Admin shapes: teams, their limits and gate thresholds, and API keys."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl

from api.schemas.common import PLAIN_TEXT
from api.schemas.jobs import DataPolicyBody


class TeamCreate(BaseModel):
    """``POST /v1/admin/teams``."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")

    model_config = ConfigDict(
        extra="forbid", strict=True, json_schema_extra={"examples": [{"name": "search"}]}
    )


class TeamUpdate(BaseModel):
    """``PATCH /v1/admin/teams/{id}``: only the fields given change."""

    max_active_jobs: int | None = Field(None, ge=1, le=10_000)
    gate_max_harmful_score: float | None = Field(None, ge=0, le=1)
    gate_max_harmful_increase: float | None = Field(None, ge=0, le=1)
    data_policy: DataPolicyBody | None = Field(
        None, description="The default data policy of the team's jobs (null: flag)."
    )
    webhook_url: HttpUrl | None = None
    allow_unapproved_chat: bool | None = Field(
        None,
        description="Chat with adapters that failed the safety gate and with checkpoints "
        "(never evaluated); off by default.",
    )

    # strict: false is not a score of 0, nor "5" a limit of 5 (lax mode would coerce them).
    model_config = ConfigDict(extra="forbid", strict=True)


class TeamObject(BaseModel):
    """A team and its settings (None: the service default)."""

    id: str
    object: Literal["team"] = "team"
    name: str
    created_at: int
    max_active_jobs: int | None
    gate_max_harmful_score: float | None
    gate_max_harmful_increase: float | None
    data_policy: dict[str, Any] | None = None
    allow_unapproved_chat: bool = False
    webhook_url: str | None
    webhook_secret: str | None = Field(
        None, description="Verifies the X-ASFT-Signature of webhook calls (HMAC-SHA256)."
    )


class KeyCreate(BaseModel):
    """``POST /v1/admin/teams/{id}/keys``."""

    name: str = Field("", max_length=200, pattern=PLAIN_TEXT)

    model_config = ConfigDict(extra="forbid", strict=True)


class KeyObject(BaseModel):
    """An API key; ``key`` is present only in the answer that creates it."""

    id: str
    object: Literal["api_key"] = "api_key"
    team_id: str
    name: str
    prefix: str
    created_at: int
    revoked_at: int | None = None
    key: str | None = Field(None, description="The secret, shown once at creation.")
