"""Tenancy: every route with an id in its path answers another team's ids with a 404, exactly
as it answers ids that do not exist, and changes nothing; admin routes answer any team's key
with a 401. The test walks all of the app's routes, every method, so a route added later is
covered without editing this file, or the test fails naming it (a path parameter it has no id
for, or a route that takes an id but authenticates no one)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.testclient import TestClient
from starlette.routing import compile_path

from api.deps import current_team_id, require_admin
from tests.api.conftest import ADMIN, ADMIN_KEY, auth, jsonl, sentiment_rows
from tests.api.finished_jobs import FinishedJob, create_job, finish_job

MakeTeam = Callable[[str], tuple[str, str]]
JOBS = "/v1/fine_tuning/jobs/{fine_tuning_job_id}"
TEAMS = "/v1/admin/teams/{team_id}"
# Routes the walk must find among those it covers: a walk that found nothing would prove
# nothing. New routes need not be added here; they are covered anyway.
KNOWN_ID_ROUTES = {
    ("GET", "/v1/files/{file_id}"),
    ("GET", "/v1/files/{file_id}/content"),
    ("DELETE", "/v1/files/{file_id}"),
    ("GET", JOBS),
    ("POST", f"{JOBS}/cancel"),
    ("POST", f"{JOBS}/start"),
    ("GET", f"{JOBS}/events"),
    ("GET", f"{JOBS}/checkpoints"),
    ("GET", f"{JOBS}/report"),
    ("GET", f"{JOBS}/adapter"),
    ("GET", f"{JOBS}/checkpoints/{{step}}/adapter"),
    ("GET", "/v1/models/{model_id}"),
    ("DELETE", "/v1/models/{model_id}"),
    ("PATCH", TEAMS),
    ("POST", f"{TEAMS}/keys"),
    ("GET", f"{TEAMS}/keys"),
    ("DELETE", f"{TEAMS}/keys/{{key_id}}"),
}
# Ids of the right shape that name nothing.
MISSING = {
    "file_id": "file-missing",
    "fine_tuning_job_id": "ftjob-missing",
    "model_id": "ft:tiny-chat:alpha::missing",
    "step": "999",
    "team_id": "team-missing",
    "key_id": "key-missing",
}


# Routes whose parameter names a file of the dashboard, not a team's resource.
STATIC_FILE_ROUTES = {"/ui/static/{name}"}


@dataclass(frozen=True)
class IdRoute:
    """One method of a route with path parameters, and who may call it."""

    method: str
    path: str
    admin: bool


def _calls(dependant: Dependant) -> Iterator[Any]:
    """Every callable in a route's dependency tree."""
    yield dependant.call
    for child in dependant.dependencies:
        yield from _calls(child)


def id_routes(app: FastAPI) -> list[IdRoute]:
    """Every (method, path) of the app whose path has parameters, sorted.

    ``app.routes`` holds included routers, not their routes, in this FastAPI version;
    ``iter_route_contexts`` walks them with their prefixes, as the OpenAPI generator does
    (and sees routes hidden from the schema too). A route with parameters that is not a
    FastAPI route, or that depends on neither key check, fails the test.
    """
    found: list[IdRoute] = []
    for context in iter_route_contexts(app.routes):
        path = context.path
        if path is None or not compile_path(path)[2]:
            continue
        if path in STATIC_FILE_ROUTES:
            continue
        route = context.original_route
        if not isinstance(route, APIRoute):
            pytest.fail(f"{path}: a {type(route).__name__} with path parameters; extend id_routes")
        checks = set(_calls(route.dependant))
        if require_admin not in checks and current_team_id not in checks:
            pytest.fail(f"{sorted(context.methods or ())} {path} takes an id but checks no key")
        found.extend(
            IdRoute(method, path, require_admin in checks) for method in context.methods or ()
        )
    return sorted(found, key=lambda route: (route.path, route.method))


class Alpha:
    """Team alpha: its key, a file, a finished job and what the job produced."""

    def __init__(self, team_id: str, key_id: str, file_id: str, finished: FinishedJob) -> None:
        self.values = {
            "file_id": file_id,
            "fine_tuning_job_id": finished.job_id,
            "model_id": finished.model_id,
            "step": str(finished.checkpoint_step),
            "team_id": team_id,
            "key_id": key_id,
        }
        self.file_id = file_id
        self.finished = finished

    def fill(self, path: str, values: dict[str, str] | None = None) -> str:
        """``path`` with alpha's ids (or ``values``); a parameter without one fails the test."""
        values = values or self.values
        unknown = set(compile_path(path)[2]) - set(values)
        if unknown:
            pytest.fail(f"{path}: no id of team alpha for {sorted(unknown)}; extend Alpha")
        return path.format(**values)


@pytest.fixture
def alpha(
    app: FastAPI, client: TestClient, team_key: str, model_pair: str, training_file: str
) -> Alpha:
    """Team alpha (``team_key``) with a file and a succeeded job: checkpoint, report, model."""
    teams = client.get("/v1/admin/teams", headers=ADMIN).json()["data"]
    team_id = next(team["id"] for team in teams if team["name"] == "alpha")
    key_id = client.get(f"/v1/admin/teams/{team_id}/keys", headers=ADMIN).json()["data"][0]["id"]
    finished = finish_job(app, create_job(client, team_key, model_pair, training_file))
    return Alpha(team_id, key_id, training_file, finished)


def call(client: TestClient, route: IdRoute, url: str, key: str) -> httpx.Response:
    """``route`` at ``url`` with ``key``; writes get an empty JSON body (valid for all)."""
    body: dict[str, Any] | None = {} if route.method in ("POST", "PUT", "PATCH") else None
    return client.request(route.method, url, headers=auth(key), json=body)


def error_of(response: httpx.Response) -> tuple[int, str, str, str | None]:
    """What a client can tell from an error: status, code, type, param."""
    error = response.json()["error"]
    return response.status_code, error["code"], error["type"], error["param"]


def test_the_route_walk_finds_the_known_id_routes(app: FastAPI) -> None:
    walked = {(route.method, route.path) for route in id_routes(app)}
    assert walked >= KNOWN_ID_ROUTES, KNOWN_ID_ROUTES - walked
    admin = {route.path for route in id_routes(app) if route.admin}
    assert admin == {path for _, path in KNOWN_ID_ROUTES if path.startswith("/v1/admin")}


def test_another_teams_ids_answer_404_on_every_route(
    app: FastAPI, client: TestClient, make_team: MakeTeam, team_key: str, alpha: Alpha
) -> None:
    _, beta_key = make_team("beta")
    routes = id_routes(app)
    for route in routes:
        other = call(client, route, alpha.fill(route.path), beta_key)
        absent = call(client, route, alpha.fill(route.path, MISSING), beta_key)
        if route.admin:
            # Not beta's to call at all, and not alpha's either: a team key is no admin key.
            assert error_of(other)[:2] == (401, "invalid_admin_key"), (route, other.text)
            own = call(client, route, alpha.fill(route.path), team_key)
            assert error_of(own)[:2] == (401, "invalid_admin_key"), (route, own.text)
        else:
            assert other.status_code == 404, (route, other.text)
            assert error_of(other)[2] == "not_found_error"
        # Another team's id tells beta no more than an id that does not exist.
        assert error_of(other) == error_of(absent), route

    # Beta's cancel, start, deletes and admin calls changed nothing.
    job = client.get(f"/v1/fine_tuning/jobs/{alpha.finished.job_id}", headers=auth(team_key))
    assert job.status_code == 200 and job.json()["status"] == "succeeded"
    for path in ("/v1/files/{file_id}", "/v1/models/{model_id}", f"{TEAMS}/keys"):
        headers = ADMIN if path.startswith("/v1/admin") else auth(team_key)
        assert client.get(alpha.fill(path), headers=headers).status_code == 200, path
    keys = client.get(alpha.fill(f"{TEAMS}/keys"), headers=ADMIN).json()["data"]
    assert [key["revoked_at"] for key in keys] == [None]

    # Alpha's ids do work for alpha (team routes) and the admin (admin routes), so the answers
    # above are about ownership. Deletes go last, revoking alpha's key very last.
    for route in sorted(routes, key=lambda r: (r.method == "DELETE", r.admin, r.path)):
        key = ADMIN_KEY if route.admin else team_key
        response = call(client, route, alpha.fill(route.path), key)
        assert response.status_code in (200, 409), (route, response.text)
        if route.method == "GET":
            assert response.status_code == 200, (route, response.text)


def test_another_teams_ids_in_bodies_and_cursors_answer_404(
    client: TestClient,
    make_team: MakeTeam,
    model_pair: str,
    alpha: Alpha,
    upload: Callable[..., dict[str, Any]],
) -> None:
    _, beta_key = make_team("beta")
    beta_file = upload(beta_key, jsonl(sentiment_rows(20, start=100)))["id"]
    for body in (
        {"model": model_pair, "training_file": alpha.file_id},
        {"model": model_pair, "training_file": beta_file, "validation_file": alpha.file_id},
        {
            "model": model_pair,
            "training_file": beta_file,
            "evaluation": {"matcher": "exact_label", "file": alpha.file_id},
        },
    ):
        response = client.post("/v1/fine_tuning/jobs", json=body, headers=auth(beta_key))
        assert response.status_code == 404, (body, response.text)
        assert response.json()["error"]["code"] == "file_not_found"
    for path in (
        f"/v1/files?after={alpha.file_id}",
        f"/v1/fine_tuning/jobs?after={alpha.finished.job_id}",
    ):
        response = client.get(path, headers=auth(beta_key))
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "invalid_cursor"
    assert client.get("/v1/fine_tuning/jobs", headers=auth(beta_key)).json()["data"] == []


def test_lists_hold_only_the_teams_own_rows(
    client: TestClient, make_team: MakeTeam, team_key: str, alpha: Alpha
) -> None:
    _, beta_key = make_team("beta")
    files = client.get("/v1/files", headers=auth(beta_key)).json()["data"]
    assert files == []
    models = client.get("/v1/models", headers=auth(beta_key)).json()["data"]
    assert [m["kind"] for m in models] == ["model_pair"]
    # ...while alpha sees its own.
    assert [f["id"] for f in client.get("/v1/files", headers=auth(team_key)).json()["data"]] == [
        alpha.file_id
    ]
    jobs = client.get("/v1/fine_tuning/jobs", headers=auth(team_key)).json()["data"]
    assert [j["id"] for j in jobs] == [alpha.finished.job_id]
