"""Tenancy: every route that takes an id answers 404 to another team's ids, exactly as for ids
that do not exist, and changes nothing. The loop walks the app's routes, so a new route with an
id is either covered here or fails the test."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.testclient import TestClient
from starlette.routing import compile_path

from tests.api.conftest import auth, jsonl, sentiment_rows
from tests.api.finished_jobs import FinishedJob, create_job, finish_job

MakeTeam = Callable[[str], tuple[str, str]]
JOBS = "/v1/fine_tuning/jobs/{fine_tuning_job_id}"
# Every team route with an id in its path. Adding a route means adding it here.
ID_ROUTES = {
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
}


def id_routes(app: FastAPI) -> set[tuple[str, str]]:
    """(method, path) of every API route with path parameters, admin routes excepted.

    ``app.routes`` holds included routers, not their routes, in this FastAPI version;
    ``iter_route_contexts`` walks them with their prefixes, as the OpenAPI generator does
    (and sees routes hidden from the schema too).
    """
    found: set[tuple[str, str]] = set()
    for context in iter_route_contexts(app.routes):
        path = context.path
        if not isinstance(context.original_route, APIRoute) or path is None:
            continue
        if compile_path(path)[2] and not path.startswith("/v1/admin"):
            found.update((method, path) for method in context.methods or ())
    return found


class Alpha:
    """Team alpha's file, its finished job and what the job produced."""

    def __init__(self, file_id: str, finished: FinishedJob) -> None:
        self.file_id = file_id
        self.finished = finished

    def fill(self, path: str) -> str:
        """``path`` with alpha's ids in its parameters; an unknown parameter fails the test."""
        values = {
            "file_id": self.file_id,
            "fine_tuning_job_id": self.finished.job_id,
            "model_id": self.finished.model_id,
            "step": str(self.finished.checkpoint_step),
        }
        unknown = set(compile_path(path)[2]) - set(values)
        if unknown:
            pytest.fail(f"{path}: no id of team alpha for {sorted(unknown)}; extend Alpha.fill")
        return path.format(**values)


@pytest.fixture
def alpha(
    app: FastAPI, client: TestClient, team_key: str, model_pair: str, training_file: str
) -> Alpha:
    """Team alpha (``team_key``) with a file and a succeeded job: checkpoint, report, model."""
    return Alpha(
        training_file, finish_job(app, create_job(client, team_key, model_pair, training_file))
    )


def test_every_id_route_is_covered(app: FastAPI) -> None:
    assert id_routes(app) == ID_ROUTES


def test_another_teams_ids_answer_404_on_every_route(
    app: FastAPI, client: TestClient, make_team: MakeTeam, team_key: str, alpha: Alpha
) -> None:
    _, beta_key = make_team("beta")
    called: set[tuple[str, str]] = set()
    for method, path in sorted(id_routes(app)):
        url = alpha.fill(path)
        response = client.request(method, url, headers=auth(beta_key))
        assert response.status_code == 404, (method, url, response.text)
        assert response.json()["error"]["type"] == "not_found_error"
        called.add((method, path))
    assert called == ID_ROUTES

    # Alpha's ids do work for alpha (so the 404s above are about ownership), and beta's
    # cancel, start and deletes changed nothing. Deletes go last.
    for method, path in sorted(ID_ROUTES, key=lambda route: (route[0] == "DELETE", route)):
        url = alpha.fill(path)
        response = client.request(method, url, headers=auth(team_key))
        assert response.status_code in (200, 409), (method, url, response.text)
        if method == "GET":
            assert response.status_code == 200, (method, url, response.text)
    job = client.get(f"/v1/fine_tuning/jobs/{alpha.finished.job_id}", headers=auth(team_key))
    assert job.json()["status"] == "succeeded"


def test_404s_for_other_teams_match_those_for_missing_ids(
    client: TestClient, make_team: MakeTeam, alpha: Alpha
) -> None:
    _, beta_key = make_team("beta")
    for path, missing in (
        ("/v1/files/{file_id}", "/v1/files/file-missing"),
        (JOBS, "/v1/fine_tuning/jobs/ftjob-missing"),
        ("/v1/models/{model_id}", "/v1/models/ft:tiny-chat:alpha::missing"),
    ):
        other = client.get(alpha.fill(path), headers=auth(beta_key)).json()["error"]
        absent = client.get(missing, headers=auth(beta_key)).json()["error"]
        assert (other["code"], other["type"], other["param"]) == (
            absent["code"],
            absent["type"],
            absent["param"],
        )


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
