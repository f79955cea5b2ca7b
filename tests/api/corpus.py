"""Helpers shared by the bad-input corpora (``test_bad_inputs_*.py``).

Each corpus serves all its cases from one app per database (a refused request changes
nothing, which each case checks), so the cases run in seconds. This module builds that app,
sets up its teams, files and model pair, and holds the checks every case makes: the error
envelope, and that the rows (and stored files) are as they were.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api.main import create_app
from service.db.migrate import upgrade_head
from service.settings import Settings
from tests.api.conftest import ADMIN, ADMIN_KEY, auth
from tests.conftest import postgres_database

DATABASES = ["sqlite", "postgresql"]
# Marks where a case's param is not asserted exactly.
ANY: Any = object()
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    422: "invalid_request_error",
}
PAIR = {"id": "tiny-chat", "aligned_model": "org/tiny-chat", "base_model": "org/tiny-base"}


def fresh_database(kind: str, folder: Path) -> Iterator[str]:
    """A migrated database of ``kind`` (sqlite or postgresql), dropped afterwards."""
    urls = [f"sqlite:///{folder / 'asft.db'}"] if kind == "sqlite" else postgres_database()
    for url in urls:
        upgrade_head(url, folder)
        yield url


def shared_app(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    **settings: Any,
) -> Iterator[tuple[FastAPI, TestClient, Settings, Path]]:
    """An app (and a client over it) on a fresh database of the fixture's kind, with its data
    under a new folder ``name``; ``settings`` are added to the corpora's common ones."""
    folder = tmp_path_factory.mktemp(name)
    for url in fresh_database(request.param, folder):
        app_settings = Settings(
            _env_file=None,
            data_dir=folder / "data",
            database_url=url,
            admin_key=ADMIN_KEY,
            max_upload_bytes=1 << 20,
            rate_limit_per_minute=1_000_000,
            **settings,
        )
        app = create_app(app_settings)
        with TestClient(app) as client:
            yield app, client, app_settings, folder


def create_team(client: TestClient, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A team made through the admin API, and a key of it (both as the API returns them)."""
    team: dict[str, Any] = client.post("/v1/admin/teams", json={"name": name}, headers=ADMIN).json()
    key: dict[str, Any] = client.post(
        f"/v1/admin/teams/{team['id']}/keys", json={}, headers=ADMIN
    ).json()
    return team, key


def register_pair(client: TestClient, pair: dict[str, str] = PAIR) -> None:
    """Register a model pair (hub-style ids: nothing is loaded by the API)."""
    assert client.post("/v1/models", json=pair, headers=ADMIN).status_code == 200


def upload_file(
    client: TestClient,
    key: str,
    content: bytes,
    filename: str = "data.jsonl",
    content_type: str = "application/jsonl",
) -> str:
    """Upload ``content`` as a fine-tune file of ``key``'s team; its id."""
    response = client.post(
        "/v1/files",
        headers=auth(key),
        files={"file": (filename, io.BytesIO(content), content_type)},
        data={"purpose": "fine-tune"},
    )
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def row_counts(app: FastAPI, *models: Any) -> dict[str, int]:
    """Rows of each of ``models``' tables."""
    with app.state.sessions() as session:
        return {
            model.__tablename__: int(session.scalar(select(func.count()).select_from(model)) or 0)
            for model in models
        }


@contextmanager
def unchanged(snapshot: Callable[[], object]) -> Iterator[None]:
    """Asserts that ``snapshot()`` (row counts, stored files) is the same after the block."""
    before = snapshot()
    yield
    assert snapshot() == before


def assert_envelope(
    response: httpx.Response,
    status: int,
    code: str,
    *,
    param: Any = ANY,
    param_prefix: str | None = None,
    message_has: str | None = None,
) -> dict[str, Any]:
    """The response is ``status`` (never a 5xx) with the OpenAI error envelope carrying
    ``code``, and ``param`` (unless ANY), a param starting ``param_prefix`` and a message
    holding ``message_has`` where given; the error."""
    assert response.status_code < 500, response.text
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code, error
    assert error["type"] == ERROR_TYPES[status]
    assert isinstance(error["message"], str) and error["message"]
    if param is not ANY:
        assert error["param"] == param, error
    if param_prefix is not None:
        assert str(error["param"]).startswith(param_prefix), error
    if message_has is not None:
        assert message_has in error["message"], error
    return error
