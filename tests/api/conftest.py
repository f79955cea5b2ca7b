"""API fixtures: a migrated database (SQLite, and a fresh PostgreSQL database per test run),
an app on it, an httpx client over ASGI, and helpers to make teams, files and model pairs.

PostgreSQL tests skip when no server is reachable on a developer machine, and fail under
``CI=true``, where the server must be there.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api.main import create_app
from service.settings import Settings

ADMIN_KEY = "admin-test-key"


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    """Settings on the fresh database, with artifacts and the broker under tmp_path."""
    return Settings(
        _env_file=None,
        data_dir=tmp_path / "data",
        database_url=database_url,
        admin_key=ADMIN_KEY,
        max_upload_bytes=1 << 20,
        max_active_jobs_per_team=3,
        # On, so every test goes through the limiter, but too high for any test to reach;
        # tests/api/test_security.py sets small limits.
        rate_limit_per_minute=1_000_000,
    )


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    """The app on those settings."""
    return create_app(settings)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    """An httpx client speaking HTTP to the ASGI app."""
    with TestClient(app) as test_client:
        yield test_client


def auth(key: str) -> dict[str, str]:
    """The Authorization header for ``key``."""
    return {"Authorization": f"Bearer {key}"}


ADMIN = auth(ADMIN_KEY)


@pytest.fixture
def make_team(client: TestClient) -> Callable[[str], tuple[str, str]]:
    """Create a team through the admin API; returns (team id, key)."""

    def make(name: str) -> tuple[str, str]:
        team = client.post("/v1/admin/teams", json={"name": name}, headers=ADMIN)
        assert team.status_code == 200, team.text
        key = client.post(f"/v1/admin/teams/{team.json()['id']}/keys", json={}, headers=ADMIN)
        assert key.status_code == 200, key.text
        return team.json()["id"], key.json()["key"]

    return make


@pytest.fixture
def team_key(make_team: Callable[[str], tuple[str, str]]) -> str:
    """The key of a fresh team 'alpha'."""
    return make_team("alpha")[1]


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    """Rows as JSONL bytes."""
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def sentiment_rows(count: int, start: int = 0) -> list[dict[str, Any]]:
    """``count`` distinct prompt/completion rows."""
    labels = ("positive", "negative")
    return [
        {
            "prompt": f"Review {i}: it was {'great' if i % 2 else 'awful'}.",
            "completion": labels[i % 2 == 0],
        }
        for i in range(start, start + count)
    ]


@pytest.fixture
def upload(client: TestClient) -> Callable[..., dict[str, Any]]:
    """Upload bytes as a fine-tune file; returns the response JSON (asserting 200)."""

    def send(key: str, content: bytes, filename: str = "train.jsonl") -> dict[str, Any]:
        response = client.post(
            "/v1/files",
            headers=auth(key),
            files={"file": (filename, io.BytesIO(content), "application/jsonl")},
            data={"purpose": "fine-tune"},
        )
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    return send


@pytest.fixture
def model_pair(client: TestClient) -> str:
    """A registered model pair (hub-style ids: nothing is loaded by the API)."""
    response = client.post(
        "/v1/models",
        json={"id": "tiny-chat", "aligned_model": "org/tiny-chat", "base_model": "org/tiny-base"},
        headers=ADMIN,
    )
    assert response.status_code == 200, response.text
    return "tiny-chat"


@pytest.fixture
def training_file(team_key: str, upload: Callable[..., dict[str, Any]]) -> str:
    """A valid 20-row training file of team alpha."""
    return str(upload(team_key, jsonl(sentiment_rows(20)))["id"])
