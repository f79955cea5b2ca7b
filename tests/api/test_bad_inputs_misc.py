"""Bad inputs for everything but uploads and job creation: list parameters (``limit``,
``after``, ``status``, metadata filters), job sub-resources, ``POST /v1/models`` and the admin
bodies. Each gets its exact status and code in the envelope, never a 5xx, and changes nothing.

One app per database serves the whole module: a refused request changes nothing, which each
case checks by comparing the database's row counts before and after.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.db.models import ApiKey, File, Job, ModelPair, Team
from tests.api import corpus
from tests.api.conftest import ADMIN, auth, jsonl, sentiment_rows
from tests.api.finished_jobs import create_job, finish_job

JOBS = "/v1/fine_tuning/jobs"
INVALID = "invalid_request"
COUNTED = (Team, ApiKey, ModelPair, File, Job)


@dataclass(frozen=True)
class World:
    """The app and the ids the cases' URLs and bodies are built from."""

    app: FastAPI
    client: TestClient
    key: str
    ids: dict[str, str]


@pytest.fixture(scope="module", params=corpus.DATABASES)
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    """Team alpha with a model pair, a file, a job still validating, a finished one (with a
    checkpoint at step 5, a report and an adapter) and a cancelled one."""
    apps = corpus.shared_app(request, tmp_path_factory, "misc-corpus", max_active_jobs_per_team=100)
    for app, client, _, folder in apps:
        yield World(app, client, *_populate(client, app, folder))


def _populate(client: TestClient, app: FastAPI, folder: Path) -> tuple[str, dict[str, str]]:
    team, key = corpus.create_team(client, "alpha")
    corpus.register_pair(client)
    file_id = corpus.upload_file(
        client, key["key"], jsonl(sentiment_rows(20)), "train.jsonl", "text/plain"
    )
    validating = create_job(client, key["key"], "tiny-chat", file_id)
    finished = finish_job(app, create_job(client, key["key"], "tiny-chat", file_id))
    cancelled = create_job(client, key["key"], "tiny-chat", file_id)
    response = client.post(f"{JOBS}/{cancelled}/cancel", headers=auth(key["key"]))
    assert response.json()["status"] == "cancelled"
    (folder / "a-folder").mkdir()
    return key["key"], {
        "team": team["id"],
        "key_id": key["id"],
        "file": file_id,
        "validating": validating,
        "finished": finished.job_id,
        "cancelled": cancelled,
        "tuned": finished.model_id,
        "folder": str(folder / "a-folder"),
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


MODELS = "/v1/models"
TEAMS = "/v1/admin/teams"
KEYS = "/v1/admin/teams/{team}/keys"


def admin_post(name: str, url: str, status: int, code: str, param: str | None, body: Any) -> Case:
    """A ``POST`` of a JSON ``body`` with the admin key."""
    return Case(name, "POST", url, status, code, param, json=body, who="admin")


def model(**fields: Any) -> dict[str, Any]:
    """A valid ``POST /v1/models`` body with ``fields`` added or replaced."""
    return {"id": "new-pair", "aligned_model": "org/aligned", "base_model": "org/base", **fields}


ANY = corpus.ANY
CHAT = "/v1/chat/completions"


def chat(name: str, status: int, code: str, param: Any, **fields: Any) -> Case:
    """A ``POST /v1/chat/completions`` of a valid body with ``fields`` added or replaced."""
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], **fields}
    return Case(name, "POST", CHAT, status, code, param, json=body)


CASES = [
    # -- POST /v1/chat/completions (refused before any inference server is asked) --
    chat("chat_messages_empty", 422, INVALID, "messages", messages=[]),
    chat("chat_messages_missing", 422, INVALID, "messages", messages=None),
    chat("chat_role_unknown", 422, INVALID, ANY, messages=[{"role": "robot", "content": "x"}]),
    chat("chat_content_missing", 422, INVALID, ANY, messages=[{"role": "user"}]),
    chat(
        "chat_content_an_image",
        422,
        INVALID,
        ANY,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
    ),
    chat("chat_temperature_above_2", 422, INVALID, "temperature", temperature=2.5),
    chat("chat_temperature_negative", 422, INVALID, "temperature", temperature=-0.1),
    chat("chat_top_p_zero", 422, INVALID, "top_p", top_p=0),
    chat("chat_max_tokens_zero", 422, INVALID, "max_tokens", max_tokens=0),
    chat("chat_max_completion_tokens_text", 422, INVALID, ANY, max_completion_tokens="ten"),
    chat("chat_two_choices", 422, INVALID, "n", n=2),
    chat("chat_five_stop_strings", 422, INVALID, ANY, stop=["a", "b", "c", "d", "e"]),
    chat("chat_model_missing", 422, INVALID, "model", model=None),
    chat("chat_model_empty", 422, INVALID, "model", model=""),
    chat("chat_model_unknown", 404, "model_not_found", "model", model="no-such-model"),
    chat(
        "chat_checkpoint_step_unknown",
        404,
        "model_not_found",
        "model",
        model="{tuned}:ckpt-step-99",
    ),
    chat(
        "chat_checkpoint_of_no_job",
        404,
        "model_not_found",
        "model",
        model="ft:tiny-chat:alpha::nothere:ckpt-step-1",
    ),
    chat(
        "chat_checkpoint_not_evaluated",
        403,
        "adapter_not_approved",
        "model",
        model="{tuned}:ckpt-step-5",
    ),
    Case(
        "chat_body_not_json",
        "POST",
        CHAT,
        422,
        "invalid_json",
        None,
        content=b'{"model": "tiny-chat", "messages": [',
    ),
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
    admin_post(
        "register_without_id",
        MODELS,
        422,
        INVALID,
        "id",
        {"aligned_model": "org/aligned", "base_model": "org/base"},
    ),
    admin_post("register_id_empty", MODELS, 422, INVALID, "id", model(id="")),
    admin_post("register_id_65", MODELS, 422, INVALID, "id", model(id="m" * 65)),
    admin_post("register_id_with_a_space", MODELS, 422, INVALID, "id", model(id="a b")),
    admin_post("register_id_dash_first", MODELS, 422, INVALID, "id", model(id="-a")),
    admin_post("register_id_number", MODELS, 422, INVALID, "id", model(id=7)),
    admin_post("register_existing_id", MODELS, 409, "model_exists", "id", model(id="tiny-chat")),
    admin_post(
        "register_aligned_missing",
        MODELS,
        422,
        INVALID,
        "aligned_model",
        {"id": "p", "base_model": "org/base"},
    ),
    admin_post(
        "register_aligned_empty", MODELS, 422, INVALID, "aligned_model", model(aligned_model="")
    ),
    admin_post(
        "register_aligned_too_long",
        MODELS,
        422,
        INVALID,
        "aligned_model",
        model(aligned_model="org/" + "a" * 997),
    ),
    admin_post(
        "register_aligned_with_a_nul",
        MODELS,
        422,
        INVALID,
        "aligned_model",
        model(aligned_model="org/a\x00"),
    ),
    admin_post(
        "register_aligned_three_parts",
        MODELS,
        422,
        "model_path_not_found",
        "aligned_model",
        model(aligned_model="org/a/b"),
    ),
    admin_post(
        "register_aligned_missing_folder",
        MODELS,
        422,
        "model_path_not_found",
        "aligned_model",
        model(aligned_model="/no/such/folder"),
    ),
    admin_post(
        # Found by the fuzzer: expanding "~nosuchuser" raised, a 500.
        "register_aligned_in_an_unknown_user_s_home",
        MODELS,
        422,
        "model_path_not_found",
        "aligned_model",
        model(aligned_model="~nosuchuser/model"),
    ),
    admin_post(
        "register_eval_suite_in_an_unknown_user_s_home",
        MODELS,
        422,
        "eval_suite_not_found",
        "eval_suite",
        model(eval_suite="~nosuchuser/suite.json"),
    ),
    admin_post("register_base_number", MODELS, 422, INVALID, "base_model", model(base_model=7)),
    admin_post(
        "register_base_relative_missing",
        MODELS,
        422,
        "model_path_not_found",
        "base_model",
        model(base_model="./nowhere"),
    ),
    admin_post(
        "register_eval_suite_empty", MODELS, 422, INVALID, "eval_suite", model(eval_suite="")
    ),
    admin_post(
        "register_eval_suite_missing_file",
        MODELS,
        422,
        "eval_suite_not_found",
        "eval_suite",
        model(eval_suite="/no/such/suite.json"),
    ),
    admin_post(
        "register_eval_suite_a_folder",
        MODELS,
        422,
        "eval_suite_not_found",
        "eval_suite",
        model(eval_suite="{folder}"),
    ),
    admin_post("register_unknown_field", MODELS, 422, INVALID, "revision", model(revision="main")),
    admin_post("register_body_a_list", MODELS, 422, INVALID, None, [model()]),
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
    admin_post("team_name_missing", TEAMS, 422, INVALID, "name", {}),
    admin_post("team_name_empty", TEAMS, 422, INVALID, "name", {"name": ""}),
    admin_post("team_name_65", TEAMS, 422, INVALID, "name", {"name": "t" * 65}),
    admin_post("team_name_with_a_slash", TEAMS, 422, INVALID, "name", {"name": "a/b"}),
    admin_post("team_name_number", TEAMS, 422, INVALID, "name", {"name": 7}),
    admin_post(
        "team_unknown_field",
        TEAMS,
        422,
        INVALID,
        "max_active_jobs",
        {"name": "gamma", "max_active_jobs": 3},
    ),
    admin_post("team_name_taken", TEAMS, 409, "team_exists", "name", {"name": "alpha"}),
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
    admin_post("key_name_number", KEYS, 422, INVALID, "name", {"name": 7}),
    admin_post("key_name_201", KEYS, 422, INVALID, "name", {"name": "k" * 201}),
    admin_post("key_name_with_a_nul", KEYS, 422, INVALID, "name", {"name": "a\x00b"}),
    admin_post("key_unknown_field", KEYS, 422, INVALID, "expires_at", {"expires_at": 0}),
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
    key = ADMIN if case.who == "admin" else auth(world.key)
    headers = {**key, **case.headers}
    if case.content is not None:
        headers.setdefault("Content-Type", "application/json")
    with corpus.unchanged(lambda: corpus.row_counts(world.app, *COUNTED)):
        response = world.client.request(
            case.method,
            _filled(case.url, world.ids),
            headers=headers,
            json=_filled(case.json, world.ids) if case.content is None else None,
            content=case.content,
        )
        corpus.assert_envelope(
            response, case.status, case.code, param=case.param, message_has=case.message_has
        )


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
