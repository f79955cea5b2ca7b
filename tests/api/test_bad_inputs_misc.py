"""Bad inputs for everything but uploads and job creation: list parameters (``limit``,
``after``, ``status``, metadata filters), job sub-resources, ``POST /v1/models`` and the admin
bodies. Each gets its exact status and code in the envelope, never a 5xx, and changes nothing.

One app per database serves the whole module: a refused request changes nothing, which each
case checks by comparing the database's row counts before and after.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api.db.models import ApiKey, File, Job, ModelPair, Team
from api.main import create_app
from api.settings import Settings
from tests.api.conftest import ADMIN, ADMIN_KEY, auth, jsonl, sentiment_rows
from tests.api.finished_jobs import create_job, finish_job
from tests.api.test_bad_inputs_jobs import fresh_database

JOBS = "/v1/fine_tuning/jobs"
INVALID = "invalid_request"
TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    409: "conflict_error",
    422: "invalid_request_error",
}
COUNTED = (Team, ApiKey, ModelPair, File, Job)


@dataclass(frozen=True)
class World:
    """The app and the ids the cases' URLs and bodies are built from."""

    app: FastAPI
    client: TestClient
    key: str
    ids: dict[str, str]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    """Team alpha with a model pair, a file, a job still validating, a finished one (with a
    checkpoint at step 5, a report and an adapter) and a cancelled one."""
    folder = tmp_path_factory.mktemp("misc-corpus")
    for url in fresh_database(request.param, folder):
        settings = Settings(
            _env_file=None,
            data_dir=folder / "data",
            database_url=url,
            admin_key=ADMIN_KEY,
            max_upload_bytes=1 << 20,
            max_active_jobs_per_team=100,
            rate_limit_per_minute=1_000_000,
        )
        app = create_app(settings)
        with TestClient(app) as client:
            yield World(app, client, *_populate(client, app, folder))


def _populate(client: TestClient, app: FastAPI, folder: Path) -> tuple[str, dict[str, str]]:
    team = client.post("/v1/admin/teams", json={"name": "alpha"}, headers=ADMIN).json()
    key = client.post(f"/v1/admin/teams/{team['id']}/keys", json={}, headers=ADMIN).json()
    pair = {"id": "tiny-chat", "aligned_model": "org/tiny-chat", "base_model": "org/tiny-base"}
    assert client.post("/v1/models", json=pair, headers=ADMIN).status_code == 200
    uploaded = client.post(
        "/v1/files",
        headers=auth(key["key"]),
        files={"file": ("train.jsonl", io.BytesIO(jsonl(sentiment_rows(20))), "text/plain")},
        data={"purpose": "fine-tune"},
    ).json()
    validating = create_job(client, key["key"], "tiny-chat", uploaded["id"])
    finished = finish_job(app, create_job(client, key["key"], "tiny-chat", uploaded["id"]))
    cancelled = create_job(client, key["key"], "tiny-chat", uploaded["id"])
    response = client.post(f"{JOBS}/{cancelled}/cancel", headers=auth(key["key"]))
    assert response.json()["status"] == "cancelled"
    (folder / "a-folder").mkdir()
    return key["key"], {
        "team": team["id"],
        "key_id": key["id"],
        "file": uploaded["id"],
        "validating": validating,
        "finished": finished.job_id,
        "cancelled": cancelled,
        "tuned": finished.model_id,
        "folder": str(folder / "a-folder"),
    }


def counts(app: FastAPI) -> dict[str, int]:
    """Rows per table the API writes to."""
    with app.state.sessions() as session:
        return {
            model.__tablename__: int(session.scalar(select(func.count()).select_from(model)) or 0)
            for model in COUNTED
        }


@dataclass(frozen=True)
class Case:
    """A request (``{name}`` in the URL or body is an id of the world) and its answer.

    ``who`` is whose key is sent: ``team`` or ``admin``.
    """

    name: str
    method: str
    url: str
    status: int
    code: str
    param: str | None = None
    json: Any = None
    content: bytes | None = None
    who: str = "team"
    message_has: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


def model(**fields: Any) -> dict[str, Any]:
    """A valid ``POST /v1/models`` body with ``fields`` added or replaced."""
    return {"id": "new-pair", "aligned_model": "org/aligned", "base_model": "org/base", **fields}


CASES = [
    # -- GET /v1/fine_tuning/jobs --
    Case("jobs_limit_zero", "GET", f"{JOBS}?limit=0", 422, INVALID, "limit"),
    Case("jobs_limit_101", "GET", f"{JOBS}?limit=101", 422, INVALID, "limit"),
    Case("jobs_limit_text", "GET", f"{JOBS}?limit=ten", 422, INVALID, "limit"),
    Case("jobs_limit_empty", "GET", f"{JOBS}?limit=", 422, INVALID, "limit"),
    Case(
        "jobs_after_unknown", "GET", f"{JOBS}?after=ftjob-nothere", 404, "invalid_cursor", "after"
    ),
    Case("jobs_after_empty", "GET", f"{JOBS}?after=", 422, INVALID, "after"),
    Case("jobs_after_with_a_nul", "GET", f"{JOBS}?after=ftjob-%00", 422, INVALID, "after"),
    Case("jobs_after_too_long", "GET", f"{JOBS}?after={'a' * 65}", 422, INVALID, "after"),
    Case("jobs_status_unknown", "GET", f"{JOBS}?status=done", 422, INVALID, "status"),
    Case("jobs_status_in_capitals", "GET", f"{JOBS}?status=RUNNING", 422, INVALID, "status"),
    Case("jobs_status_empty", "GET", f"{JOBS}?status=", 422, INVALID, "status"),
    Case(
        "metadata_filter_empty_key",
        "GET",
        f"{JOBS}?metadata[]=v",
        422,
        "invalid_metadata_filter",
        "metadata[]",
    ),
    Case(
        "metadata_filter_key_too_long",
        "GET",
        f"{JOBS}?metadata[{'k' * 65}]=v",
        422,
        "invalid_metadata_filter",
        f"metadata[{'k' * 65}]",
    ),
    Case(
        "metadata_filter_value_too_long",
        "GET",
        f"{JOBS}?metadata[k]={'v' * 513}",
        422,
        "invalid_metadata_filter",
        "metadata[k]",
        message_has="values at most 512",
    ),
    Case(
        "metadata_filter_value_with_a_nul",
        "GET",
        f"{JOBS}?metadata[k]=a%00b",
        422,
        "invalid_metadata_filter",
        "metadata[k]",
        message_has="NUL",
    ),
    Case(
        "metadata_filter_key_with_a_nul",
        "GET",
        f"{JOBS}?metadata[a%00b]=v",
        422,
        "invalid_metadata_filter",
        "metadata[a\x00b]",
    ),
    Case(
        "seventeen_metadata_filters",
        "GET",
        JOBS + "?" + "&".join(f"metadata[k{i}]=v" for i in range(17)),
        422,
        "invalid_metadata_filter",
        "metadata",
    ),
    # -- one job and its sub-resources --
    Case("job_unknown", "GET", f"{JOBS}/ftjob-nothere", 404, "job_not_found", "fine_tuning_job_id"),
    Case(
        "job_id_with_a_nul", "GET", f"{JOBS}/ftjob-%00", 404, "job_not_found", "fine_tuning_job_id"
    ),
    Case(
        "job_id_too_long",
        "GET",
        f"{JOBS}/{'f' * 1000}",
        404,
        "job_not_found",
        "fine_tuning_job_id",
    ),
    Case(
        "cancel_unknown",
        "POST",
        f"{JOBS}/ftjob-nothere/cancel",
        404,
        "job_not_found",
        "fine_tuning_job_id",
    ),
    Case(
        "cancel_finished",
        "POST",
        f"{JOBS}/{{finished}}/cancel",
        409,
        "job_not_cancellable",
        "status",
    ),
    Case(
        "cancel_twice", "POST", f"{JOBS}/{{cancelled}}/cancel", 409, "job_not_cancellable", "status"
    ),
    Case(
        "start_unknown",
        "POST",
        f"{JOBS}/ftjob-nothere/start",
        404,
        "job_not_found",
        "fine_tuning_job_id",
    ),
    Case("start_not_validated", "POST", f"{JOBS}/{{validating}}/start", 409, "job_not_startable"),
    Case("start_finished", "POST", f"{JOBS}/{{finished}}/start", 409, "job_not_startable"),
    Case("report_not_ready", "GET", f"{JOBS}/{{validating}}/report", 409, "report_not_ready"),
    Case("adapter_not_ready", "GET", f"{JOBS}/{{validating}}/adapter", 409, "adapter_not_ready"),
    Case("events_limit_zero", "GET", f"{JOBS}/{{finished}}/events?limit=0", 422, INVALID, "limit"),
    Case(
        "events_limit_1001", "GET", f"{JOBS}/{{finished}}/events?limit=1001", 422, INVALID, "limit"
    ),
    Case(
        "events_after_unknown",
        "GET",
        f"{JOBS}/{{finished}}/events?after=ftevent-nothere",
        404,
        "invalid_cursor",
        "after",
    ),
    Case(
        "events_after_with_a_nul",
        "GET",
        f"{JOBS}/{{finished}}/events?after=%00",
        422,
        INVALID,
        "after",
    ),
    Case(
        "events_of_unknown_job",
        "GET",
        f"{JOBS}/ftjob-nothere/events",
        404,
        "job_not_found",
        "fine_tuning_job_id",
    ),
    Case(
        "checkpoints_limit_101",
        "GET",
        f"{JOBS}/{{finished}}/checkpoints?limit=101",
        422,
        INVALID,
        "limit",
    ),
    Case(
        "checkpoints_after_unknown",
        "GET",
        f"{JOBS}/{{finished}}/checkpoints?after=ftckpt-nothere",
        404,
        "invalid_cursor",
        "after",
    ),
    Case(
        "checkpoints_after_with_a_slash",
        "GET",
        f"{JOBS}/{{finished}}/checkpoints?after=a/b",
        422,
        INVALID,
        "after",
    ),
    Case(
        "checkpoint_step_unknown",
        "GET",
        f"{JOBS}/{{finished}}/checkpoints/6/adapter",
        404,
        "checkpoint_not_found",
        "step",
    ),
    Case(
        "checkpoint_step_negative",
        "GET",
        f"{JOBS}/{{finished}}/checkpoints/-1/adapter",
        422,
        INVALID,
        "step",
    ),
    Case(
        "checkpoint_step_over_the_column",
        "GET",
        f"{JOBS}/{{finished}}/checkpoints/{2**31}/adapter",
        422,
        INVALID,
        "step",
    ),
    Case(
        "checkpoint_step_with_20_digits",
        "GET",
        f"{JOBS}/{{finished}}/checkpoints/{'9' * 20}/adapter",
        422,
        INVALID,
        "step",
    ),
    Case(
        "checkpoint_step_fractional",
        "GET",
        f"{JOBS}/{{finished}}/checkpoints/1.5/adapter",
        422,
        INVALID,
        "step",
    ),
    Case(
        "checkpoint_step_text",
        "GET",
        f"{JOBS}/{{finished}}/checkpoints/last/adapter",
        422,
        INVALID,
        "step",
    ),
    # -- models --
    Case("model_unknown", "GET", "/v1/models/gpt-17", 404, "model_not_found", "model"),
    Case("model_id_with_a_nul", "GET", "/v1/models/tiny%00chat", 404, "model_not_found", "model"),
    Case("delete_a_model_pair", "DELETE", "/v1/models/tiny-chat", 404, "model_not_found", "model"),
    Case("delete_unknown_model", "DELETE", "/v1/models/ft:x", 404, "model_not_found", "model"),
    Case("delete_model_id_with_a_nul", "DELETE", "/v1/models/%00", 404, "model_not_found", "model"),
    Case(
        "register_with_a_team_key",
        "POST",
        "/v1/models",
        401,
        "invalid_admin_key",
        json=model(),
    ),
    Case(
        "register_without_id",
        "POST",
        "/v1/models",
        422,
        INVALID,
        "id",
        json={"aligned_model": "org/aligned", "base_model": "org/base"},
        who="admin",
    ),
    Case(
        "register_id_empty",
        "POST",
        "/v1/models",
        422,
        INVALID,
        "id",
        json=model(id=""),
        who="admin",
    ),
    Case(
        "register_id_65",
        "POST",
        "/v1/models",
        422,
        INVALID,
        "id",
        json=model(id="m" * 65),
        who="admin",
    ),
    Case(
        "register_id_with_a_space",
        "POST",
        "/v1/models",
        422,
        INVALID,
        "id",
        json=model(id="a b"),
        who="admin",
    ),
    Case(
        "register_id_dash_first",
        "POST",
        "/v1/models",
        422,
        INVALID,
        "id",
        json=model(id="-a"),
        who="admin",
    ),
    Case(
        "register_id_number",
        "POST",
        "/v1/models",
        422,
        INVALID,
        "id",
        json=model(id=7),
        who="admin",
    ),
    Case(
        "register_existing_id",
        "POST",
        "/v1/models",
        409,
        "model_exists",
        "id",
        json=model(id="tiny-chat"),
        who="admin",
    ),
    Case(
        "register_aligned_missing",
        "POST",
        "/v1/models",
        422,
        INVALID,
        "aligned_model",
        json={"id": "p", "base_model": "org/base"},
        who="admin",
    ),
    Case(
        "register_aligned_empty",
        "POST",
        "/v1/models",
        422,
        INVALID,
        "aligned_model",
        json=model(aligned_model=""),
        who="admin",
    ),
    Case(
        "register_aligned_too_long",
        "POST",
        "/v1/models",
        422,
        INVALID,
        "aligned_model",
        json=model(aligned_model="org/" + "a" * 997),
        who="admin",
    ),
    Case(
        "register_aligned_with_a_nul",
        "POST",
        "/v1/models",
        422,
        INVALID,
        "aligned_model",
        json=model(aligned_model="org/a\x00"),
        who="admin",
    ),
    Case(
        "register_aligned_three_parts",
        "POST",
        "/v1/models",
        422,
        "model_path_not_found",
        "aligned_model",
        json=model(aligned_model="org/a/b"),
        who="admin",
    ),
    Case(
        "register_aligned_missing_folder",
        "POST",
        "/v1/models",
        422,
        "model_path_not_found",
        "aligned_model",
        json=model(aligned_model="/no/such/folder"),
        who="admin",
    ),
    Case(
        "register_base_number",
        "POST",
        "/v1/models",
        422,
        INVALID,
        "base_model",
        json=model(base_model=7),
        who="admin",
    ),
    Case(
        "register_base_relative_missing",
        "POST",
        "/v1/models",
        422,
        "model_path_not_found",
        "base_model",
        json=model(base_model="./nowhere"),
        who="admin",
    ),
    Case(
        "register_eval_suite_empty",
        "POST",
        "/v1/models",
        422,
        INVALID,
        "eval_suite",
        json=model(eval_suite=""),
        who="admin",
    ),
    Case(
        "register_eval_suite_missing_file",
        "POST",
        "/v1/models",
        422,
        "eval_suite_not_found",
        "eval_suite",
        json=model(eval_suite="/no/such/suite.json"),
        who="admin",
    ),
    Case(
        "register_eval_suite_a_folder",
        "POST",
        "/v1/models",
        422,
        "eval_suite_not_found",
        "eval_suite",
        json=model(eval_suite="{folder}"),
        who="admin",
    ),
    Case(
        "register_unknown_field",
        "POST",
        "/v1/models",
        422,
        INVALID,
        "revision",
        json=model(revision="main"),
        who="admin",
    ),
    Case("register_body_a_list", "POST", "/v1/models", 422, INVALID, json=[model()], who="admin"),
    Case(
        "register_body_not_json",
        "POST",
        "/v1/models",
        422,
        "invalid_json",
        content=b'{"id": ',
        who="admin",
    ),
    # -- admin: teams and keys --
    Case("team_with_a_team_key", "GET", "/v1/admin/teams", 401, "invalid_admin_key"),
    Case(
        "team_name_missing", "POST", "/v1/admin/teams", 422, INVALID, "name", json={}, who="admin"
    ),
    Case(
        "team_name_empty",
        "POST",
        "/v1/admin/teams",
        422,
        INVALID,
        "name",
        json={"name": ""},
        who="admin",
    ),
    Case(
        "team_name_65",
        "POST",
        "/v1/admin/teams",
        422,
        INVALID,
        "name",
        json={"name": "t" * 65},
        who="admin",
    ),
    Case(
        "team_name_with_a_slash",
        "POST",
        "/v1/admin/teams",
        422,
        INVALID,
        "name",
        json={"name": "a/b"},
        who="admin",
    ),
    Case(
        "team_name_number",
        "POST",
        "/v1/admin/teams",
        422,
        INVALID,
        "name",
        json={"name": 7},
        who="admin",
    ),
    Case(
        "team_unknown_field",
        "POST",
        "/v1/admin/teams",
        422,
        INVALID,
        "max_active_jobs",
        json={"name": "gamma", "max_active_jobs": 3},
        who="admin",
    ),
    Case(
        "team_name_taken",
        "POST",
        "/v1/admin/teams",
        409,
        "team_exists",
        "name",
        json={"name": "alpha"},
        who="admin",
    ),
    Case(
        "patch_unknown_team",
        "PATCH",
        "/v1/admin/teams/team-nothere",
        404,
        "team_not_found",
        "team_id",
        json={},
        who="admin",
    ),
    Case(
        "patch_team_id_with_a_nul",
        "PATCH",
        "/v1/admin/teams/team-%00",
        404,
        "team_not_found",
        "team_id",
        json={},
        who="admin",
    ),
    *(
        Case(
            f"patch_{name}",
            "PATCH",
            "/v1/admin/teams/{team}",
            422,
            INVALID,
            body_field,
            json={body_field: value},
            who="admin",
        )
        for name, body_field, value in (
            ("limit_zero", "max_active_jobs", 0),
            ("limit_10001", "max_active_jobs", 10_001),
            ("limit_text", "max_active_jobs", "5"),
            ("limit_boolean", "max_active_jobs", True),
            ("limit_fractional", "max_active_jobs", 2.5),
            ("score_negative", "gate_max_harmful_score", -0.1),
            ("score_above_one", "gate_max_harmful_score", 1.1),
            ("score_boolean", "gate_max_harmful_score", False),
            ("score_text", "gate_max_harmful_score", "0.5"),
            ("increase_above_one", "gate_max_harmful_increase", 2),
            ("increase_a_list", "gate_max_harmful_increase", [0.1]),
            ("webhook_not_a_url", "webhook_url", "not a url"),
            ("webhook_ftp", "webhook_url", "ftp://example.com/hook"),
            ("webhook_number", "webhook_url", 7),
            ("unknown_field", "name", "renamed"),
        )
    ),
    Case(
        "patch_webhook_to_loopback",
        "PATCH",
        "/v1/admin/teams/{team}",
        422,
        "webhook_url_not_allowed",
        "webhook_url",
        json={"webhook_url": "http://127.0.0.1:9/hook"},
        who="admin",
    ),
    Case(
        "key_for_unknown_team",
        "POST",
        "/v1/admin/teams/team-nothere/keys",
        404,
        "team_not_found",
        "team_id",
        json={},
        who="admin",
    ),
    Case(
        "key_name_number",
        "POST",
        "/v1/admin/teams/{team}/keys",
        422,
        INVALID,
        "name",
        json={"name": 7},
        who="admin",
    ),
    Case(
        "key_name_201",
        "POST",
        "/v1/admin/teams/{team}/keys",
        422,
        INVALID,
        "name",
        json={"name": "k" * 201},
        who="admin",
    ),
    Case(
        "key_name_with_a_nul",
        "POST",
        "/v1/admin/teams/{team}/keys",
        422,
        INVALID,
        "name",
        json={"name": "a\x00b"},
        who="admin",
    ),
    Case(
        "key_unknown_field",
        "POST",
        "/v1/admin/teams/{team}/keys",
        422,
        INVALID,
        "expires_at",
        json={"expires_at": 0},
        who="admin",
    ),
    Case(
        "keys_of_unknown_team",
        "GET",
        "/v1/admin/teams/team-nothere/keys",
        404,
        "team_not_found",
        "team_id",
        who="admin",
    ),
    Case(
        "revoke_unknown_key",
        "DELETE",
        "/v1/admin/teams/{team}/keys/key-nothere",
        404,
        "key_not_found",
        "key_id",
        who="admin",
    ),
    Case(
        "revoke_key_id_with_a_nul",
        "DELETE",
        "/v1/admin/teams/{team}/keys/%00",
        404,
        "key_not_found",
        "key_id",
        who="admin",
    ),
    Case(
        "revoke_key_of_another_team",
        "DELETE",
        "/v1/admin/teams/team-nothere/keys/{key_id}",
        404,
        "key_not_found",
        "key_id",
        who="admin",
    ),
]


def test_the_corpus_is_named_uniquely() -> None:
    names = [case.name for case in CASES]
    assert len(set(names)) == len(names)


def _filled(value: Any, ids: dict[str, str]) -> Any:
    """``value`` with ``{name}`` placeholders replaced by the world's ids."""
    if isinstance(value, str):
        for name, identifier in ids.items():
            value = value.replace(f"{{{name}}}", identifier)
        return value
    if isinstance(value, dict):
        return {key: _filled(item, ids) for key, item in value.items()}
    if isinstance(value, list):
        return [_filled(item, ids) for item in value]
    return value


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_request(world: World, case: Case) -> None:
    before = counts(world.app)
    key = ADMIN if case.who == "admin" else auth(world.key)
    headers = {**key, **case.headers}
    if case.content is not None:
        headers.setdefault("Content-Type", "application/json")
    response = world.client.request(
        case.method,
        _filled(case.url, world.ids),
        headers=headers,
        json=_filled(case.json, world.ids) if case.content is None else None,
        content=case.content,
    )
    assert response.status_code == case.status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == case.code, error
    assert error["type"] == TYPES[case.status]
    assert error["param"] == case.param, error
    if case.message_has is not None:
        assert case.message_has in error["message"], error
    assert counts(world.app) == before


def test_metadata_filters_find_keys_that_need_escaping(world: World) -> None:
    # SQLite's JSON paths miss keys with quotes, backslashes or non-ASCII letters (they are
    # stored escaped); such a filter found nothing there and the job on PostgreSQL.
    keys = ["caf\u00e9", 'a"b', "a\\b", "a.b", "tab\there", "a]b"]
    created = {}
    for number, key in enumerate(keys):
        response = world.client.post(
            JOBS,
            json={
                "model": "tiny-chat",
                "training_file": world.ids["file"],
                "metadata": {key: f"value-{number}", "batch": "escaping"},
            },
            headers=auth(world.key),
        )
        assert response.status_code == 200, response.text
        created[key] = response.json()["id"]
    for number, key in enumerate(keys):
        found = world.client.get(
            JOBS, params={f"metadata[{key}]": f"value-{number}"}, headers=auth(world.key)
        )
        assert found.status_code == 200, found.text
        assert [job["id"] for job in found.json()["data"]] == [created[key]], key
        # The value must match too, and with several filters all of them.
        other = world.client.get(
            JOBS,
            params={f"metadata[{key}]": "value-x", "metadata[batch]": "escaping"},
            headers=auth(world.key),
        )
        assert other.json()["data"] == []
    both = world.client.get(
        JOBS,
        params={"metadata[batch]": "escaping", "metadata[a.b]": "value-3"},
        headers=auth(world.key),
    )
    assert [job["id"] for job in both.json()["data"]] == [created["a.b"]]
    for job_id in created.values():
        world.client.post(f"{JOBS}/{job_id}/cancel", headers=auth(world.key))


def test_unknown_query_parameters_are_ignored(world: World) -> None:
    # As in OpenAI's API: a list takes the parameters it knows; others change nothing.
    plain = world.client.get(JOBS, headers=auth(world.key))
    extra = world.client.get(f"{JOBS}?order=asc&include=all", headers=auth(world.key))
    assert extra.status_code == 200
    assert extra.json() == plain.json()


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/v1/files", "GET, POST"),
        ("/v1/files/{file}", "DELETE, GET"),
        ("/v1/models", "GET, POST"),
        ("/v1/models/{tuned}", "DELETE, GET"),
        (f"{JOBS}/{{finished}}/cancel", "POST"),
        ("/v1/admin/teams/{team}/keys", "GET, POST"),
    ],
)
def test_a_405_lists_every_method_of_the_path(world: World, path: str, allowed: str) -> None:
    # Each method is its own route; the framework named only the first one's in Allow.
    response = world.client.request("PUT", _filled(path, world.ids), headers=auth(world.key))
    assert response.status_code == 405
    assert response.headers["allow"] == allowed
    assert response.json()["error"]["code"] == "method_not_allowed"
