"""``/v1/admin``: teams, their limits and gate thresholds, API keys; who may call it; and the
embedded first start that creates team ``default`` with a key on disk."""

from __future__ import annotations

import hashlib
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, text

from api.main import create_app
from service.bootstrap import DEFAULT_TEAM, bootstrap_embedded
from service.db.migrate import upgrade_head
from service.db.models import ApiKey, Team
from service.db.session import engine_for
from service.settings import Settings
from tests.api.conftest import ADMIN, auth

MakeTeam = Callable[[str], tuple[str, str]]

# Every admin-only operation, with a body that would be valid for an admin.
ADMIN_CALLS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/v1/admin/teams", None),
    ("POST", "/v1/admin/teams", {"name": "intruders"}),
    ("PATCH", "/v1/admin/teams/{team_id}", {"max_active_jobs": 99}),
    ("POST", "/v1/admin/teams/{team_id}/keys", {"name": "stolen"}),
    ("GET", "/v1/admin/teams/{team_id}/keys", None),
    ("DELETE", "/v1/admin/teams/{team_id}/keys/{key_id}", None),
    ("POST", "/v1/models", {"id": "evil", "aligned_model": "a/b", "base_model": "a/c"}),
]


def _key_id(client: TestClient, team_id: str) -> str:
    keys = client.get(f"/v1/admin/teams/{team_id}/keys", headers=ADMIN).json()["data"]
    key_id: str = keys[0]["id"]
    return key_id


def _call(
    client: TestClient,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    headers: dict[str, str],
) -> Any:
    return client.request(method, path, json=body, headers=headers)


def test_create_and_list_teams(client: TestClient) -> None:
    created = client.post("/v1/admin/teams", json={"name": "search"}, headers=ADMIN)
    assert created.status_code == 200, created.text
    team = created.json()
    assert team["object"] == "team"
    assert team["id"].startswith("team-")
    assert team["name"] == "search"
    # Limits and gates start unset: the service defaults apply.
    for field in ("max_active_jobs", "gate_max_harmful_score", "gate_max_harmful_increase"):
        assert team[field] is None
    assert team["webhook_url"] is None
    client.post("/v1/admin/teams", json={"name": "ads"}, headers=ADMIN)

    listed = client.get("/v1/admin/teams", headers=ADMIN).json()
    assert listed["object"] == "list"
    assert listed["has_more"] is False
    # Creation order by the second only: teams made in the same second come in id order.
    assert sorted(t["name"] for t in listed["data"]) == ["ads", "search"]
    assert team in listed["data"]


def test_duplicate_team_name_is_409(client: TestClient) -> None:
    assert client.post("/v1/admin/teams", json={"name": "dup"}, headers=ADMIN).status_code == 200
    again = client.post("/v1/admin/teams", json={"name": "dup"}, headers=ADMIN)
    assert again.status_code == 409
    assert again.json()["error"] == {
        "message": "a team named 'dup' exists",
        "type": "conflict_error",
        "param": "name",
        "code": "team_exists",
    }
    assert len(client.get("/v1/admin/teams", headers=ADMIN).json()["data"]) == 1


@pytest.mark.parametrize(
    "body",
    [{"name": ""}, {"name": "has space"}, {"name": "x" * 65}, {"name": "a:b"}, {}],
    ids=["empty", "space", "too-long", "colon", "missing"],
)
def test_team_names_are_validated(client: TestClient, body: dict[str, Any]) -> None:
    response = client.post("/v1/admin/teams", json=body, headers=ADMIN)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == "name"
    assert client.get("/v1/admin/teams", headers=ADMIN).json()["data"] == []


def test_patch_sets_limits_gates_and_webhook(client: TestClient, make_team: MakeTeam) -> None:
    team_id, _ = make_team("search")
    patched = client.patch(
        f"/v1/admin/teams/{team_id}",
        json={
            "max_active_jobs": 2,
            "gate_max_harmful_score": 0.25,
            "gate_max_harmful_increase": 0.0,
            "webhook_url": "https://hooks.example.com/asft",
        },
        headers=ADMIN,
    )
    assert patched.status_code == 200, patched.text
    body = patched.json()
    assert body["max_active_jobs"] == 2
    assert body["gate_max_harmful_score"] == 0.25
    assert body["gate_max_harmful_increase"] == 0.0
    assert body["webhook_url"] == "https://hooks.example.com/asft"

    # Only the fields given change; null clears a field back to the service default.
    cleared = client.patch(
        f"/v1/admin/teams/{team_id}", json={"webhook_url": None}, headers=ADMIN
    ).json()
    assert cleared["webhook_url"] is None
    assert cleared["max_active_jobs"] == 2
    assert cleared["gate_max_harmful_score"] == 0.25
    listed = client.get("/v1/admin/teams", headers=ADMIN).json()["data"]
    assert listed == [cleared]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("gate_max_harmful_score", -0.01),
        ("gate_max_harmful_score", 1.5),
        ("gate_max_harmful_increase", -1),
        ("gate_max_harmful_increase", 1.01),
        ("max_active_jobs", 0),
        ("max_active_jobs", -3),
        ("webhook_url", "not a url"),
        ("unknown_field", 1),
    ],
)
def test_patch_validation(
    client: TestClient, make_team: MakeTeam, field: str, value: object
) -> None:
    team_id, _ = make_team("search")
    response = client.patch(f"/v1/admin/teams/{team_id}", json={field: value}, headers=ADMIN)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == field
    team = client.get("/v1/admin/teams", headers=ADMIN).json()["data"][0]
    assert team.get(field) is None


def test_patch_of_an_unknown_team_is_404(client: TestClient) -> None:
    response = client.patch("/v1/admin/teams/team-nope", json={"max_active_jobs": 1}, headers=ADMIN)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "team_not_found"


def test_patched_job_limit_applies_to_job_creation(
    client: TestClient, team_key: str, model_pair: str, training_file: str
) -> None:
    (team,) = client.get("/v1/admin/teams", headers=ADMIN).json()["data"]
    client.patch(f"/v1/admin/teams/{team['id']}", json={"max_active_jobs": 1}, headers=ADMIN)
    body = {"model": model_pair, "training_file": training_file}
    first = client.post("/v1/fine_tuning/jobs", json=body, headers=auth(team_key))
    assert first.status_code == 200, first.text
    second = client.post("/v1/fine_tuning/jobs", json=body, headers=auth(team_key))
    assert second.status_code == 429
    assert second.json()["error"]["code"] == "too_many_active_jobs"


def test_key_lifecycle(client: TestClient) -> None:
    team_id = client.post("/v1/admin/teams", json={"name": "search"}, headers=ADMIN).json()["id"]
    created = client.post(f"/v1/admin/teams/{team_id}/keys", json={"name": "ci"}, headers=ADMIN)
    assert created.status_code == 200, created.text
    key = created.json()
    secret = key["key"]
    assert secret.startswith("asft-") and len(secret) > 40
    assert key["object"] == "api_key"
    assert key["team_id"] == team_id
    assert key["name"] == "ci"
    assert key["prefix"] == secret[:12]
    assert key["revoked_at"] is None

    # The key works at once.
    assert client.get("/v1/files", headers=auth(secret)).status_code == 200

    # Listings show the prefix, never the secret.
    other = client.post(f"/v1/admin/teams/{team_id}/keys", json={}, headers=ADMIN).json()
    listing = client.get(f"/v1/admin/teams/{team_id}/keys", headers=ADMIN)
    assert listing.status_code == 200
    assert secret not in listing.text and other["key"] not in listing.text
    data = {k["id"]: k for k in listing.json()["data"]}
    assert set(data) == {key["id"], other["id"]}
    assert all(k["key"] is None for k in data.values())
    assert data[key["id"]]["prefix"] == secret[:12]
    assert data[other["id"]]["prefix"] == other["key"][:12]

    revoked = client.delete(f"/v1/admin/teams/{team_id}/keys/{key['id']}", headers=ADMIN)
    assert revoked.status_code == 200
    assert revoked.json()["revoked_at"] is not None
    assert revoked.json()["key"] is None

    refused = client.get("/v1/files", headers=auth(secret))
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"
    assert refused.headers["www-authenticate"] == "Bearer"
    # The team's other key is untouched.
    assert client.get("/v1/files", headers=auth(other["key"])).status_code == 200

    # Revoking twice keeps the first revocation time.
    again = client.delete(f"/v1/admin/teams/{team_id}/keys/{key['id']}", headers=ADMIN)
    assert again.json()["revoked_at"] == revoked.json()["revoked_at"]
    listed = client.get(f"/v1/admin/teams/{team_id}/keys", headers=ADMIN).json()["data"]
    revoked_ids = {k["id"] for k in listed if k["revoked_at"] is not None}
    assert revoked_ids == {key["id"]}


def test_keys_of_unknown_teams_or_other_teams_are_404(
    client: TestClient, make_team: MakeTeam
) -> None:
    alpha, _ = make_team("alpha")
    beta, _ = make_team("beta")
    beta_key = _key_id(client, beta)
    for method, path in (
        ("POST", "/v1/admin/teams/team-nope/keys"),
        ("GET", "/v1/admin/teams/team-nope/keys"),
        ("DELETE", f"/v1/admin/teams/{alpha}/keys/key-nope"),
        # A real key, named under the wrong team: not revoked.
        ("DELETE", f"/v1/admin/teams/{alpha}/keys/{beta_key}"),
    ):
        body: dict[str, Any] | None = {} if method == "POST" else None
        response = client.request(method, path, json=body, headers=ADMIN)
        assert response.status_code == 404, (method, path, response.text)
    keys = client.get(f"/v1/admin/teams/{beta}/keys", headers=ADMIN).json()["data"]
    assert keys[0]["revoked_at"] is None


def test_keys_are_stored_hashed(app: Any, client: TestClient, make_team: MakeTeam) -> None:
    _, first = make_team("alpha")
    _, second = make_team("beta")
    with app.state.engine.connect() as connection:
        rows = [dict(row) for row in connection.execute(text("SELECT * FROM api_keys")).mappings()]
    assert len(rows) == 2
    stored = " ".join(str(value) for row in rows for value in row.values())
    assert first not in stored and second not in stored
    assert sorted(row["key_hash"] for row in rows) == sorted(
        hashlib.sha256(secret.encode()).hexdigest() for secret in (first, second)
    )


def _fill(path: str, team_id: str, key_id: str) -> str:
    return path.format(team_id=team_id, key_id=key_id)


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_CALLS)
def test_admin_endpoints_refuse_missing_and_team_keys(
    client: TestClient,
    make_team: MakeTeam,
    method: str,
    path: str,
    body: dict[str, Any] | None,
) -> None:
    team_id, team_key = make_team("alpha")
    url = _fill(path, team_id, _key_id(client, team_id))

    missing = _call(client, method, url, body, {})
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "missing_api_key"

    as_team = _call(client, method, url, body, auth(team_key))
    assert as_team.status_code == 401
    assert as_team.json()["error"]["code"] == "invalid_admin_key"
    assert as_team.json()["error"]["type"] == "authentication_error"

    wrong = _call(client, method, url, body, auth("admin-test-key-not"))
    assert wrong.status_code == 401

    # Nothing was changed by the refused calls: the team key still works, no team was added.
    assert client.get("/v1/files", headers=auth(team_key)).status_code == 200
    teams = client.get("/v1/admin/teams", headers=ADMIN).json()["data"]
    assert [(t["name"], t["max_active_jobs"]) for t in teams] == [("alpha", None)]
    assert client.get("/v1/models", headers=auth(team_key)).json()["data"] == []


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_CALLS)
def test_admin_endpoints_are_closed_without_an_admin_key(
    settings: Settings,
    client: TestClient,
    make_team: MakeTeam,
    method: str,
    path: str,
    body: dict[str, Any] | None,
) -> None:
    team_id, _ = make_team("alpha")
    url = _fill(path, team_id, _key_id(client, team_id))
    closed = Settings(
        _env_file=None,
        data_dir=settings.data_dir,
        database_url=settings.database_url,
        admin_key=None,
    )
    with TestClient(create_app(closed)) as closed_client:
        for headers in ({}, ADMIN, auth("")):
            response = _call(closed_client, method, url, body, headers)
            assert response.status_code == 401, (headers, response.text)
        error = _call(closed_client, method, url, body, ADMIN).json()["error"]
        assert error["code"] == "invalid_admin_key"
        assert "started without ASFT_ADMIN_KEY" in error["message"]


def _embedded_settings(data_dir: Path) -> Settings:
    return Settings(_env_file=None, data_dir=data_dir, database_url=None, admin_key=None)


def test_bootstrap_creates_the_default_team_once(tmp_path: Path) -> None:
    settings = _embedded_settings(tmp_path / "data")
    settings.data_dir.mkdir()
    upgrade_head(settings.resolved_database_url, settings.data_dir)
    engine = engine_for(settings.resolved_database_url)

    secret = bootstrap_embedded(settings, engine)
    assert secret is not None and secret.startswith("asft-")
    key_file = settings.data_dir / "api-key"
    assert key_file.read_text() == secret + "\n"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    # No temporary file is left beside it.
    assert sorted(p.name for p in settings.data_dir.iterdir() if p.name.startswith(".key-")) == []

    assert bootstrap_embedded(settings, engine) is None
    assert key_file.read_text() == secret + "\n"
    with create_app(settings).state.sessions() as session:
        teams = session.scalars(select(Team)).all()
        assert [t.name for t in teams] == [DEFAULT_TEAM]
        assert len(session.scalars(select(ApiKey)).all()) == 1

    with TestClient(create_app(settings)) as client:
        response = client.get("/v1/files", headers=auth(secret))
        assert response.status_code == 200, response.text
        assert client.get("/v1/files", headers=auth(secret + "x")).status_code == 401


def test_bootstrap_does_nothing_with_an_explicit_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'explicit.db'}"
    upgrade_head(url, tmp_path)
    settings = Settings(_env_file=None, data_dir=tmp_path / "data", database_url=url)
    assert bootstrap_embedded(settings, engine_for(url)) is None
    assert not (settings.data_dir / "api-key").exists()
    with engine_for(url).connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM teams")).scalar() == 0
