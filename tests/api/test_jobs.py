"""``/v1/fine_tuning/jobs`` over HTTP: creation and its defaults, our method parameters,
idempotency, listing, cancel and start, the per-team limit, events, dataset warnings,
evaluation settings, checkpoints, reports and adapter downloads.

There is no worker here: a job stays ``validating_files`` unless a test moves it through
``service.jobs.state.transition``, and checkpoints, reports and adapters are written directly.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from httpx import Response
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save_file
from sqlalchemy import select

from asft_core.spec import DEFAULT_LAMBDA, DEFAULT_METHOD, DEFAULT_SUBSPACE_ENERGY
from service.db.models import (
    Checkpoint,
    EvaluationReport,
    FineTunedModel,
    Job,
    JobEvent,
    new_id,
)
from service.jobs.state import fine_tuned_name, transition
from service.storage import job_key
from tests.api.conftest import ADMIN, auth, jsonl, sentiment_rows

JOBS = "/v1/fine_tuning/jobs"
Create = Callable[..., Response]


# --- helpers -------------------------------------------------------------------------------


@pytest.fixture
def create(client: TestClient, team_key: str, model_pair: str, training_file: str) -> Create:
    """POST a job of team alpha; keyword arguments are added to the body."""

    def send(headers: dict[str, str] | None = None, **fields: Any) -> Response:
        body = {"model": model_pair, "training_file": training_file, **fields}
        return client.post(JOBS, json=body, headers={**auth(team_key), **(headers or {})})

    return send


def created(response: Response) -> dict[str, Any]:
    """The job of a successful creation."""
    assert response.status_code == 200, response.text
    job: dict[str, Any] = response.json()
    return job


def move(app: FastAPI, job_id: str, *targets: str) -> None:
    """Walk the job through ``targets`` with the state machine, as the worker would."""
    with app.state.sessions() as session:
        for target in targets:
            current = session.scalar(select(Job.status).where(Job.id == job_id))
            assert current is not None
            assert transition(session, job_id, current, target), (current, target)
        session.commit()


def add_rows(app: FastAPI, *rows: Any) -> None:
    """Insert rows the worker would write (checkpoints, reports, events, models)."""
    with app.state.sessions() as session:
        session.add_all(rows)
        session.commit()


def set_team_limit(client: TestClient, name: str, limit: int) -> None:
    """Raise or lower a team's active-job limit through the admin API."""
    teams = client.get("/v1/admin/teams", headers=ADMIN).json()["data"]
    team_id = next(team["id"] for team in teams if team["name"] == name)
    response = client.patch(
        f"/v1/admin/teams/{team_id}", json={"max_active_jobs": limit}, headers=ADMIN
    )
    assert response.status_code == 200, response.text


def error_of(response: Response, status: int) -> dict[str, Any]:
    """The envelope's error member, after checking the status."""
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    return error


def hyper(job: dict[str, Any]) -> dict[str, Any]:
    """The resolved hyperparameters of the job's method."""
    method: dict[str, Any] = job["method"]
    resolved: dict[str, Any] = method[method["type"]]["hyperparameters"]
    return resolved


ADAPTER_CONFIG = {
    "peft_type": "LORA",
    "r": 8,
    "lora_alpha": 32,
    "target_modules": ["q_proj", "v_proj"],
    "base_model_name_or_path": "org/tiny-chat",
}


def write_adapter(folder: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A real PEFT-shaped adapter folder; returns the tensors written."""
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(ADAPTER_CONFIG))
    rng = np.random.default_rng(seed)
    prefix = "base_model.model.model.layers.0.self_attn"
    tensors = {
        f"{prefix}.q_proj.lora_A.weight": rng.standard_normal((8, 16)).astype(np.float32),
        f"{prefix}.q_proj.lora_B.weight": rng.standard_normal((16, 8)).astype(np.float32),
    }
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return tensors


def register_model(app: FastAPI, job_id: str, storage_key: str, approved: bool) -> None:
    """The fine-tuned model row the worker writes when a job's adapter is final."""
    with app.state.sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.add(
            FineTunedModel(
                id=fine_tuned_name(job, "alpha"),
                team_id=job.team_id,
                job_id=job.id,
                model=job.model,
                storage_key=storage_key,
                approved=approved,
            )
        )
        session.commit()


def archive_members(body: bytes) -> dict[str, bytes]:
    """The files of a tar.gz body, by name."""
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
        members: dict[str, bytes] = {}
        for member in tar.getmembers():
            extracted = tar.extractfile(member)
            assert extracted is not None
            members[member.name] = extracted.read()
    return members


# --- creation and the method parameters ----------------------------------------------------


def test_create_resolves_every_default(create: Create, training_file: str) -> None:
    job = created(create())
    assert job["object"] == "fine_tuning.job"
    assert job["id"].startswith("ftjob-")
    assert job["status"] == "validating_files"
    assert job["training_file"] == training_file
    assert job["validation_file"] is None
    assert isinstance(job["created_at"], int)
    assert job["finished_at"] is None
    assert isinstance(job["seed"], int) and 0 <= job["seed"] < 2**31
    assert job["hyperparameters"] == {
        "n_epochs": 3,
        "batch_size": 8,
        "learning_rate_multiplier": 1.0,
    }
    # The default method and its lambda: the frontier study's decision (asft_core.spec).
    assert job["method"]["type"] == DEFAULT_METHOD
    assert set(job["method"]) == {"type", DEFAULT_METHOD}
    resolved = hyper(job)
    assert resolved["lambda"] == DEFAULT_LAMBDA[DEFAULT_METHOD]
    assert resolved["rank"] == 8
    assert resolved["alpha"] == 32.0
    assert resolved["dropout"] == 0.05
    assert resolved["target_modules"] == ["q_proj", "v_proj"]
    assert resolved["learning_rate"] == pytest.approx(5e-5)
    assert resolved.get("penalty_rank") is None
    assert "safelora_threshold" not in resolved
    assert job["validation"] == {
        "training_examples": 20,
        "validation_examples": None,
        "warnings": [],
    }
    assert job["evaluation"] is None
    assert job["integrations"] == []


def test_hyperparameters_accept_auto_and_numbers(create: Create) -> None:
    auto = created(
        create(
            hyperparameters={
                "n_epochs": "auto",
                "batch_size": 4,
                "learning_rate_multiplier": "auto",
            }
        )
    )
    assert auto["hyperparameters"] == {
        "n_epochs": 3,
        "batch_size": 4,
        "learning_rate_multiplier": 1.0,
    }
    numbers = created(
        create(hyperparameters={"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": 2})
    )
    assert numbers["hyperparameters"] == {
        "n_epochs": 2,
        "batch_size": 8,
        "learning_rate_multiplier": 2.0,
    }
    # The multiplier scales the paper's base rate 5e-5.
    assert hyper(numbers)["learning_rate"] == pytest.approx(1e-4)


def test_asft_parameters_under_the_method_block(create: Create) -> None:
    job = created(
        create(
            hyperparameters={"n_epochs": 5},
            method={
                "type": "asft",
                "asft": {
                    "hyperparameters": {
                        "lambda": 0.25,
                        "rank": 16,
                        "alpha": 64,
                        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                        "penalty_rank": 4,
                        "n_epochs": 2,
                    }
                },
            },
        )
    )
    resolved = hyper(job)
    assert resolved["lambda"] == 0.25
    assert resolved["rank"] == 16
    assert resolved["alpha"] == 64.0
    assert resolved["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert resolved["penalty_rank"] == 4
    # The method block wins over OpenAI's older top-level hyperparameters.
    assert resolved["n_epochs"] == 2
    assert job["hyperparameters"]["n_epochs"] == 2


def test_lambda_zero_is_kept_not_replaced_by_the_default(create: Create) -> None:
    job = created(create(method={"type": "asft", "asft": {"hyperparameters": {"lambda": 0}}}))
    assert hyper(job)["lambda"] == 0.0


def test_projector_and_l2_methods_resolve_their_own_parameters(create: Create) -> None:
    projector = created(create(method={"type": "asft_projector"}))
    assert set(projector["method"]) == {"type", "asft_projector"}
    assert hyper(projector)["lambda"] == DEFAULT_LAMBDA["asft_projector"]
    assert hyper(projector)["subspace_energy"] == DEFAULT_SUBSPACE_ENERGY
    assert "penalty_rank" not in hyper(projector)
    l2 = created(create(method={"type": "l2", "l2": {"hyperparameters": {"lambda": 0.5}}}))
    assert hyper(l2)["lambda"] == 0.5
    assert "subspace_energy" not in hyper(l2)
    # A parameter the method does not read is refused, not silently ignored.
    for method in (
        {"type": "l2", "l2": {"hyperparameters": {"subspace_energy": 0.5}}},
        {"type": "asft", "asft": {"hyperparameters": {"subspace_energy": 0.5}}},
        {"type": "asft_projector", "asft_projector": {"hyperparameters": {"penalty_rank": 2}}},
    ):
        refused = create(method=method)
        assert refused.status_code == 422, method
        assert "not used by method" in refused.json()["error"]["message"]


def test_safelora_threshold_default_and_choices(create: Create) -> None:
    default = created(create(method={"type": "safelora"}))
    assert default["method"]["type"] == "safelora"
    assert hyper(default)["safelora_threshold"] == 0.5
    assert hyper(default)["safelora_num_modules"] is None
    assert "lambda" not in hyper(default)

    threshold = created(
        create(
            method={
                "type": "safelora",
                "safelora": {"hyperparameters": {"safelora_threshold": 0.3}},
            }
        )
    )
    assert hyper(threshold)["safelora_threshold"] == 0.3

    modules = created(
        create(
            method={
                "type": "safelora",
                "safelora": {"hyperparameters": {"safelora_num_modules": 4}},
            }
        )
    )
    assert hyper(modules)["safelora_num_modules"] == 4
    # A module count replaces the threshold; the default must not sneak back in.
    assert hyper(modules)["safelora_threshold"] is None


def test_asft_plus_safelora_carries_both(create: Create, client: TestClient) -> None:
    job = created(
        create(
            method={
                "type": "asft+safelora",
                "asft+safelora": {"hyperparameters": {"lambda": 2, "safelora_num_modules": 3}},
            }
        )
    )
    assert job["method"]["type"] == "asft+safelora"
    assert hyper(job)["lambda"] == 2.0
    assert hyper(job)["safelora_num_modules"] == 3
    assert hyper(job)["safelora_threshold"] is None


def test_supervised_has_no_penalty_or_projection(create: Create) -> None:
    job = created(
        create(method={"type": "supervised", "supervised": {"hyperparameters": {"rank": 4}}})
    )
    assert job["method"]["type"] == "supervised"
    resolved = hyper(job)
    assert resolved["rank"] == 4
    assert "lambda" not in resolved
    assert "safelora_threshold" not in resolved


def test_suffix_seed_and_metadata_are_echoed(create: Create) -> None:
    job = created(create(suffix="support-bot", seed=1234, metadata={"env": "prod", "owner": "ml"}))
    assert job["user_provided_suffix"] == "support-bot"
    assert job["seed"] == 1234
    assert job["metadata"] == {"env": "prod", "owner": "ml"}


# --- idempotency ---------------------------------------------------------------------------


def test_idempotency_key_returns_the_same_job(
    create: Create, client: TestClient, team_key: str
) -> None:
    first = created(create(headers={"Idempotency-Key": "retry-1"}, suffix="one"))
    # A retry, even with a different body, answers with the job the key already made.
    again = created(create(headers={"Idempotency-Key": "retry-1"}, suffix="two"))
    assert again["id"] == first["id"]
    assert again["user_provided_suffix"] == "one"
    other = created(create(headers={"Idempotency-Key": "retry-2"}))
    assert other["id"] != first["id"]
    listed = client.get(JOBS, headers=auth(team_key)).json()["data"]
    assert sorted(job["id"] for job in listed) == sorted([first["id"], other["id"]])


def test_an_empty_idempotency_key_is_no_key(create: Create) -> None:
    # Found by the fuzzer: a stored "" made the second keyless job a unique-key 500.
    first = created(create(headers={"Idempotency-Key": ""}))
    second = created(create(headers={"Idempotency-Key": ""}))
    assert first["id"] != second["id"]


def test_idempotency_keys_are_per_team(
    create: Create,
    client: TestClient,
    make_team: Callable[[str], tuple[str, str]],
    upload: Callable[..., dict[str, Any]],
    model_pair: str,
) -> None:
    mine = created(create(headers={"Idempotency-Key": "shared"}))
    _, beta_key = make_team("beta")
    beta_file = upload(beta_key, jsonl(sentiment_rows(12)))["id"]
    theirs = client.post(
        JOBS,
        json={"model": model_pair, "training_file": beta_file},
        headers={**auth(beta_key), "Idempotency-Key": "shared"},
    )
    assert theirs.status_code == 200, theirs.text
    assert theirs.json()["id"] != mine["id"]
    assert theirs.json()["training_file"] == beta_file


# --- listing -------------------------------------------------------------------------------


def test_list_filters_by_status_and_metadata(
    create: Create, client: TestClient, team_key: str, app: FastAPI
) -> None:
    prod = created(create(metadata={"env": "prod", "team": "search"}))
    dev = created(create(metadata={"env": "dev"}))
    plain = created(create())
    move(app, dev["id"], "cancelled")

    def ids(**params: str) -> set[str]:
        response = client.get(JOBS, params=params, headers=auth(team_key))
        assert response.status_code == 200, response.text
        return {job["id"] for job in response.json()["data"]}

    assert ids() == {prod["id"], dev["id"], plain["id"]}
    assert ids(status="cancelled") == {dev["id"]}
    assert ids(status="validating_files") == {prod["id"], plain["id"]}
    assert ids(status="running") == set()
    assert ids(**{"metadata[env]": "prod"}) == {prod["id"]}
    assert ids(**{"metadata[env]": "dev"}) == {dev["id"]}
    assert ids(**{"metadata[env]": "staging"}) == set()
    assert ids(**{"metadata[env]": "prod", "metadata[team]": "search"}) == {prod["id"]}
    assert ids(**{"metadata[env]": "prod", "metadata[team]": "ads"}) == set()
    assert ids(**{"metadata[env]": "dev", "status": "validating_files"}) == set()
    plain_lora = created(create(method={"type": "supervised"}))
    assert ids(method="supervised") == {plain_lora["id"]}
    assert ids(method=DEFAULT_METHOD) == {prod["id"], dev["id"], plain["id"]}
    assert ids(method="asft_projector") == set()
    assert ids(model=prod["model"]) == {prod["id"], dev["id"], plain["id"], plain_lora["id"]}
    assert ids(model="no-such-pair") == set()

    bad = client.get(JOBS, params={"status": "exploded"}, headers=auth(team_key))
    assert error_of(bad, 422)["code"] == "invalid_request"
    bad = client.get(JOBS, params={"method": "dpo"}, headers=auth(team_key))
    assert error_of(bad, 422)["param"] == "method"
    # Polling a page that did not change costs no body.
    page = client.get(JOBS, headers=auth(team_key))
    again = client.get(JOBS, headers={**auth(team_key), "If-None-Match": page.headers["etag"]})
    assert again.status_code == 304


def test_list_pages_with_after_limit_and_has_more(
    create: Create, client: TestClient, team_key: str
) -> None:
    set_team_limit(client, "alpha", 50)
    made = {created(create())["id"] for _ in range(5)}
    seen: list[dict[str, Any]] = []
    after: str | None = None
    pages = []
    while True:
        params: dict[str, Any] = {"limit": 2, **({"after": after} if after else {})}
        page = client.get(JOBS, params=params, headers=auth(team_key)).json()
        pages.append([job["id"] for job in page["data"]])
        seen.extend(page["data"])
        assert page["first_id"] == page["data"][0]["id"]
        assert page["last_id"] == page["data"][-1]["id"]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert [len(page) for page in pages] == [2, 2, 1]
    assert [job["id"] for job in seen] == list(dict.fromkeys(job["id"] for job in seen))
    assert {job["id"] for job in seen} == made
    # Newest first, ties broken by id, consistently across pages.
    order = [(job["created_at"], job["id"]) for job in seen]
    assert order == sorted(order, reverse=True)

    whole = client.get(JOBS, params={"limit": 100}, headers=auth(team_key)).json()
    assert [job["id"] for job in whole["data"]] == [job["id"] for job in seen]
    assert whole["has_more"] is False

    unknown = client.get(JOBS, params={"after": "ftjob-nope"}, headers=auth(team_key))
    assert error_of(unknown, 404)["code"] == "invalid_cursor"
    for limit in (0, 101):
        response = client.get(JOBS, params={"limit": limit}, headers=auth(team_key))
        assert error_of(response, 422)["param"] == "limit"


def test_a_cursor_job_that_changed_status_still_pages(
    create: Create, client: TestClient, team_key: str, app: FastAPI
) -> None:
    jobs = {created(create())["id"] for _ in range(3)}
    params = {"status": "validating_files", "limit": 1}
    first = client.get(JOBS, params=params, headers=auth(team_key)).json()
    cursor = first["last_id"]
    assert first["has_more"] is True
    # The job finishes between two page requests; the next page must still come.
    move(app, cursor, "cancelled")
    rest = client.get(JOBS, params={**params, "after": cursor}, headers=auth(team_key))
    assert rest.status_code == 200, rest.text
    rest_ids = {job["id"] for job in rest.json()["data"]}
    assert rest_ids and cursor not in rest_ids and rest_ids <= jobs


def test_get_one_job_and_other_teams_get_404(
    create: Create, client: TestClient, team_key: str, make_team: Callable[..., Any]
) -> None:
    job = created(create(suffix="mine"))
    fetched = client.get(f"{JOBS}/{job['id']}", headers=auth(team_key))
    assert fetched.status_code == 200
    assert fetched.json() == job
    missing = client.get(f"{JOBS}/ftjob-doesnotexist", headers=auth(team_key))
    error = error_of(missing, 404)
    assert error["code"] == "job_not_found"
    assert error["type"] == "not_found_error"
    _, beta_key = make_team("beta")
    for path in ("", "/events", "/checkpoints", "/report", "/adapter"):
        response = client.get(f"{JOBS}/{job['id']}{path}", headers=auth(beta_key))
        assert error_of(response, 404)["code"] == "job_not_found", path
    for action in ("cancel", "start"):
        response = client.post(f"{JOBS}/{job['id']}/{action}", headers=auth(beta_key))
        assert error_of(response, 404)["code"] == "job_not_found", action
    assert client.get(JOBS, headers=auth(beta_key)).json()["data"] == []
    assert client.get(JOBS).status_code == 401


def test_a_waiting_job_shows_its_place_in_the_queue(
    create: Create, client: TestClient, team_key: str, app: FastAPI
) -> None:
    # No worker runs in these tests: every job waits, in the order it joined the queue.
    first, second, third = (created(create()) for _ in range(3))  # most often in one second
    move(app, second["id"], "queued")
    positions = [
        client.get(f"{JOBS}/{job['id']}", headers=auth(team_key)).json()["queue_position"]
        for job in (first, second, third)
    ]
    # Each waits in the order it joined the queue; the second was sent again (started after
    # a dry run, or requeued), so it waits behind the third.
    assert positions == [1, 3, 2]
    # A job a worker took, or one that ended, is in no queue; the list leaves it out.
    move(app, first["id"], "queued", "running")
    client.post(f"{JOBS}/{third['id']}/cancel", headers=auth(team_key))
    positions = [
        client.get(f"{JOBS}/{job['id']}", headers=auth(team_key)).json()["queue_position"]
        for job in (first, second, third)
    ]
    assert positions == [None, 1, None]
    listed = {job["id"]: job for job in client.get(JOBS, headers=auth(team_key)).json()["data"]}
    assert [listed[job["id"]]["queue_position"] for job in (first, second, third)] == positions


# --- cancel and start ----------------------------------------------------------------------


def test_cancel_a_validating_job(
    create: Create, client: TestClient, team_key: str, app: FastAPI
) -> None:
    job = created(create())
    cancelled = client.post(f"{JOBS}/{job['id']}/cancel", headers=auth(team_key))
    assert cancelled.status_code == 200, cancelled.text
    body = cancelled.json()
    assert body["status"] == "cancelled"
    assert isinstance(body["finished_at"], int)
    assert body["finished_at"] >= job["created_at"]
    assert client.get(f"{JOBS}/{job['id']}", headers=auth(team_key)).json() == body
    events = client.get(f"{JOBS}/{job['id']}/events", headers=auth(team_key)).json()["data"]
    assert events[0]["message"] == "Job cancelled"

    again = client.post(f"{JOBS}/{job['id']}/cancel", headers=auth(team_key))
    error = error_of(again, 409)
    assert error["code"] == "job_not_cancellable"
    assert error["type"] == "conflict_error"


@pytest.mark.parametrize("path", [("queued",), ("validated",)])
def test_cancel_a_waiting_job(
    create: Create, client: TestClient, team_key: str, app: FastAPI, path: tuple[str, ...]
) -> None:
    job = created(create())
    move(app, job["id"], *path)
    cancelled = client.post(f"{JOBS}/{job['id']}/cancel", headers=auth(team_key))
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"


@pytest.mark.parametrize("final", ["succeeded", "failed"])
def test_a_finished_job_is_not_cancellable(
    create: Create, client: TestClient, team_key: str, app: FastAPI, final: str
) -> None:
    job = created(create())
    move(app, job["id"], "queued", "running", final)
    response = client.post(f"{JOBS}/{job['id']}/cancel", headers=auth(team_key))
    assert error_of(response, 409)["code"] == "job_not_cancellable"
    assert client.get(f"{JOBS}/{job['id']}", headers=auth(team_key)).json()["status"] == final


def test_cancel_a_running_job_requests_a_stop(
    create: Create, client: TestClient, team_key: str, app: FastAPI
) -> None:
    job = created(create())
    move(app, job["id"], "queued", "running")
    response = client.post(f"{JOBS}/{job['id']}/cancel", headers=auth(team_key))
    assert response.status_code == 200, response.text
    # The worker stops it after the current step; until then it is still running.
    assert response.json()["status"] == "running"
    assert response.json()["finished_at"] is None
    with app.state.sessions() as session:
        row = session.get(Job, job["id"])
        assert row is not None
        assert row.cancel_requested is True
        assert row.status == "running"
    events = client.get(f"{JOBS}/{job['id']}/events", headers=auth(team_key)).json()["data"]
    assert events[0]["message"].startswith("Cancellation requested")
    assert events[0]["level"] == "info"


def test_start_needs_a_validated_job(
    create: Create, client: TestClient, team_key: str, app: FastAPI
) -> None:
    waiting = created(create(auto_start=False))
    response = client.post(f"{JOBS}/{waiting['id']}/start", headers=auth(team_key))
    assert error_of(response, 409)["code"] == "job_not_startable"

    move(app, waiting["id"], "validated")
    started = client.post(f"{JOBS}/{waiting['id']}/start", headers=auth(team_key))
    assert started.status_code == 200, started.text
    assert started.json()["status"] == "queued"
    events = client.get(f"{JOBS}/{waiting['id']}/events", headers=auth(team_key)).json()
    assert events["data"][0]["message"] == "Job queued"

    twice = client.post(f"{JOBS}/{waiting['id']}/start", headers=auth(team_key))
    assert error_of(twice, 409)["code"] == "job_not_startable"


# --- the per-team limit --------------------------------------------------------------------


def test_a_fourth_active_job_is_refused_until_one_is_cancelled(
    create: Create, client: TestClient, team_key: str, app: FastAPI
) -> None:
    jobs = [created(create()) for _ in range(3)]
    # Running and queued jobs count as well as validating ones.
    move(app, jobs[0]["id"], "queued", "running")
    move(app, jobs[1]["id"], "queued")
    refused = create()
    error = error_of(refused, 429)
    assert error["code"] == "too_many_active_jobs"
    assert error["type"] == "rate_limit_error"
    assert "limit is 3" in error["message"]

    cancel = client.post(f"{JOBS}/{jobs[2]['id']}/cancel", headers=auth(team_key))
    assert cancel.status_code == 200
    fourth = created(create())
    assert fourth["status"] == "validating_files"
    assert create().status_code == 429


def test_finished_and_validated_jobs_do_not_count(create: Create, app: FastAPI) -> None:
    jobs = [created(create(auto_start=False)) for _ in range(3)]
    move(app, jobs[0]["id"], "validated")
    move(app, jobs[1]["id"], "queued", "running", "succeeded")
    move(app, jobs[2]["id"], "failed")
    for _ in range(3):
        created(create())
    assert create().status_code == 429


def test_a_team_limit_overrides_the_service_default(client: TestClient, create: Create) -> None:
    set_team_limit(client, "alpha", 1)
    created(create())
    assert error_of(create(), 429)["code"] == "too_many_active_jobs"


def test_starting_a_validated_job_respects_the_limit(
    create: Create, client: TestClient, team_key: str, app: FastAPI
) -> None:
    validated = [created(create(auto_start=False)) for _ in range(3)]
    for job in validated:
        move(app, job["id"], "validated")
    active = [created(create()) for _ in range(3)]
    refused = client.post(f"{JOBS}/{validated[0]['id']}/start", headers=auth(team_key))
    assert error_of(refused, 429)["code"] == "too_many_active_jobs"
    assert client.get(f"{JOBS}/{validated[0]['id']}", headers=auth(team_key)).json()["status"] == (
        "validated"
    )

    client.post(f"{JOBS}/{active[0]['id']}/cancel", headers=auth(team_key))
    started = client.post(f"{JOBS}/{validated[0]['id']}/start", headers=auth(team_key))
    assert started.status_code == 200, started.text
    assert started.json()["status"] == "queued"


# --- events --------------------------------------------------------------------------------


def test_events_newest_first_with_pages(
    create: Create, client: TestClient, team_key: str, app: FastAPI
) -> None:
    job = created(create())
    add_rows(
        app,
        *[
            JobEvent(id=new_id("ftevent"), job_id=job["id"], level="info", message=f"step {i}")
            for i in range(4)
        ],
        JobEvent(
            id=new_id("ftevent"),
            job_id=job["id"],
            level="info",
            type="metrics",
            message="step 5: loss 1.25",
            data={"step": 5, "train_loss": 1.25, "penalty": 0.01},
            step=5,
        ),
    )
    url = f"{JOBS}/{job['id']}/events"
    messages: list[str] = []
    after: str | None = None
    for expected_more in (True, True, False):
        params: dict[str, Any] = {"limit": 2, **({"after": after} if after else {})}
        page = client.get(url, params=params, headers=auth(team_key)).json()
        assert page["has_more"] is expected_more
        messages += [event["message"] for event in page["data"]]
        for event in page["data"]:
            assert event["object"] == "fine_tuning.job.event"
            assert event["id"].startswith("ftevent-")
            assert isinstance(event["created_at"], int)
        after = page["last_id"]
    assert messages == [
        "step 5: loss 1.25",
        "step 3",
        "step 2",
        "step 1",
        "step 0",
        f"Created fine-tuning job: {job['id']}",
    ]
    newest = client.get(url, params={"limit": 1}, headers=auth(team_key)).json()["data"][0]
    assert newest["type"] == "metrics"
    assert newest["data"] == {"step": 5, "train_loss": 1.25, "penalty": 0.01}

    other = created(create())
    foreign_cursor = client.get(f"{JOBS}/{other['id']}/events", headers=auth(team_key)).json()
    response = client.get(url, params={"after": foreign_cursor["last_id"]}, headers=auth(team_key))
    assert error_of(response, 404)["code"] == "invalid_cursor"


def test_metrics_are_averaged_into_buckets_by_the_database(
    create: Create, client: TestClient, team_key: str, app: FastAPI, make_team: Callable[..., Any]
) -> None:
    job = created(create())
    steps = 2503

    def loss(step: int) -> float:
        return 3.0 / step + (1.0 if step == 1700 else 0.0)  # a spike the min/max must keep

    with app.state.sessions() as session:
        session.execute(
            JobEvent.__table__.insert(),
            [
                {
                    "id": new_id("ftevent"),
                    "job_id": job["id"],
                    "created_at": 0,
                    "level": "info",
                    "type": "metrics",
                    "message": f"Step {step}",
                    "step": step,
                    # The figure columns, as the worker writes them beside the JSON.
                    "train_loss": loss(step),
                    "penalty": 0.5,
                    "learning_rate": 1e-4,
                    "data": {
                        "step": step,
                        "total_steps": 3000,
                        "train_loss": loss(step),
                        "penalty": 0.5,
                        "loss": loss(step) + 0.5,
                        "learning_rate": 1e-4,
                        "tokens_per_s": float(step),
                        "trained_tokens": step,
                    },
                }
                for step in range(1, steps + 1)
            ],
        )
        session.add(
            Checkpoint(
                id=new_id("ftckpt"),
                job_id=job["id"],
                step=2000,
                metrics={"step": 2000, "train_loss": 0.1, "full_valid_loss": 0.75},
                storage_key="unused",
            )
        )
        session.commit()
    url = f"{JOBS}/{job['id']}/metrics"
    response = client.get(url, params={"resolution": 100}, headers=auth(team_key))
    assert response.status_code == 200, response.text
    curves = response.json()
    assert curves["object"] == "fine_tuning.job.metrics"
    assert (curves["steps_recorded"], curves["last_step"], curves["total_steps"]) == (
        2503,
        2503,
        3000,
    )
    bucket = curves["bucket_steps"]
    assert bucket == 26 and len(curves["data"]) == 97 <= 100  # ceil(2503 / 100), ceil(2503 / 26)
    for index, point in enumerate(curves["data"]):
        members = range(index * bucket + 1, min((index + 1) * bucket, steps) + 1)
        assert point["step"] == members[-1] and point["steps"] == len(members)
        assert point["train_loss"] == pytest.approx(sum(map(loss, members)) / len(members))
        assert point["train_loss_min"] == pytest.approx(min(map(loss, members)))
        assert point["train_loss_max"] == pytest.approx(max(map(loss, members)))
        assert point["penalty"] == pytest.approx(0.5)
        assert point["learning_rate"] == pytest.approx(1e-4)
    assert max(point["train_loss_max"] for point in curves["data"][60:]) > 1.0  # the spike
    assert curves["validation"] == [{"step": 2000, "full_valid_loss": 0.75}]
    # Every step when the resolution allows; a 304 while nothing changed.
    full = client.get(url, params={"resolution": 5000}, headers=auth(team_key))
    assert full.json()["bucket_steps"] == 1 and len(full.json()["data"]) == steps
    again = client.get(
        url,
        params={"resolution": 5000},
        headers={**auth(team_key), "If-None-Match": full.headers["etag"]},
    )
    assert again.status_code == 304
    # A job without steps has empty curves; bad resolutions and other teams are refused.
    empty = client.get(f"{JOBS}/{created(create())['id']}/metrics", headers=auth(team_key))
    assert empty.json()["data"] == [] and empty.json()["steps_recorded"] == 0
    for bad in ("1", "10001", "many"):
        refused = client.get(url, params={"resolution": bad}, headers=auth(team_key))
        assert error_of(refused, 422)["param"] == "resolution"
    _, beta_key = make_team("beta")
    assert error_of(client.get(url, headers=auth(beta_key)), 404)["code"] == "job_not_found"


# --- dataset checks ------------------------------------------------------------------------


def test_validation_overlap_is_a_warning_naming_lines(
    create: Create,
    client: TestClient,
    team_key: str,
    upload: Callable[..., dict[str, Any]],
) -> None:
    shared = sentiment_rows(2, start=18)  # the training file holds rows 0..19
    shared[1]["completion"] += "  "  # surrounding whitespace does not hide a duplicate
    rows = [*sentiment_rows(2, start=100), *shared, *sentiment_rows(1, start=200)]
    validation = upload(team_key, jsonl(rows), "valid.jsonl")["id"]
    job = created(create(validation_file=validation))
    assert job["validation_file"] == validation
    assert job["validation"]["validation_examples"] == 5
    warnings = job["validation"]["warnings"]
    assert len(warnings) == 1
    assert "2 validation examples also appear in the training file" in warnings[0]
    assert "(validation lines 3, 4)" in warnings[0]
    events = client.get(f"{JOBS}/{job['id']}/events", headers=auth(team_key)).json()["data"]
    assert any(event["level"] == "warn" and event["message"] == warnings[0] for event in events)

    disjoint = upload(team_key, jsonl(sentiment_rows(4, start=500)), "clean.jsonl")["id"]
    clean = created(create(validation_file=disjoint))
    assert clean["validation"]["warnings"] == []


# --- evaluation ----------------------------------------------------------------------------


def test_evaluation_defaults_to_exact_label_on_the_validation_file(
    create: Create, team_key: str, upload: Callable[..., dict[str, Any]]
) -> None:
    held_out = upload(team_key, jsonl(sentiment_rows(6, start=300)), "held.jsonl")["id"]
    job = created(create(validation_file=held_out, evaluation={}))
    assert job["evaluation"] == {
        "matcher": "exact_label",
        "pattern": None,
        "file": held_out,
        "max_examples": None,
    }


def test_evaluation_regex_and_its_own_file(
    create: Create, team_key: str, upload: Callable[..., dict[str, Any]]
) -> None:
    held_out = upload(team_key, jsonl(sentiment_rows(6, start=300)), "held.jsonl")["id"]
    job = created(
        create(
            evaluation={
                "matcher": "regex",
                "pattern": r"^(positive|negative)\b",
                "file": held_out,
                "max_examples": 5,
            }
        )
    )
    assert job["validation_file"] is None
    assert job["evaluation"] == {
        "matcher": "regex",
        "pattern": r"^(positive|negative)\b",
        "file": held_out,
        "max_examples": 5,
    }
    # An explicit file wins over the validation file.
    other = upload(team_key, jsonl(sentiment_rows(6, start=400)), "val.jsonl")["id"]
    both = created(create(validation_file=other, evaluation={"file": held_out}))
    assert both["evaluation"]["file"] == held_out

    invalid = create(evaluation={"matcher": "regex", "pattern": "(unclosed"})
    error = error_of(invalid, 422)
    assert error["code"] == "invalid_request"
    assert error["param"] == "evaluation"
    assert "invalid regex" in error["message"]


def test_evaluation_file_errors(
    create: Create, team_key: str, upload: Callable[..., dict[str, Any]]
) -> None:
    missing = error_of(create(evaluation={"matcher": "final_number"}), 422)
    assert missing["code"] == "missing_evaluation_file"
    assert missing["param"] == "evaluation.file"

    chat_rows = [
        {
            "messages": [
                {"role": "user", "content": f"Question {i}?"},
                {"role": "assistant", "content": f"Answer {i}."},
            ]
        }
        for i in range(5)
    ]
    chat = upload(team_key, jsonl(chat_rows), "chat.jsonl")["id"]
    wrong = error_of(create(evaluation={"file": chat}), 422)
    assert wrong["code"] == "invalid_evaluation_file"
    assert wrong["param"] == "evaluation.file"
    # The chat file is a fine validation file; only the evaluation needs reference answers.
    via_validation = error_of(create(validation_file=chat, evaluation={}), 422)
    assert via_validation["code"] == "invalid_evaluation_file"
    assert created(create(validation_file=chat))["validation"]["validation_examples"] == 5

    unknown = error_of(create(evaluation={"file": "file-nothere"}), 404)
    assert unknown["code"] == "file_not_found"
    assert unknown["param"] == "evaluation.file"


# --- checkpoints, reports, adapters --------------------------------------------------------


def test_checkpoints_newest_step_first(
    create: Create, client: TestClient, team_key: str, app: FastAPI
) -> None:
    job = created(create(suffix="bot"))
    move(app, job["id"], "queued", "running")
    # The same second for all three: the order must come from the step, not the clock.
    add_rows(
        app,
        *[
            Checkpoint(
                id=new_id("ftckpt"),
                job_id=job["id"],
                step=step,
                created_at=1_800_000_000,
                metrics={"step": step, "train_loss": 2.0 / step},
                storage_key=job_key(job["id"], "checkpoints", f"step-{step:06d}"),
            )
            for step in (4, 2, 6)
        ],
    )
    url = f"{JOBS}/{job['id']}/checkpoints"
    page = client.get(url, headers=auth(team_key)).json()
    assert page["object"] == "list"
    assert [item["step_number"] for item in page["data"]] == [6, 4, 2]
    assert page["has_more"] is False
    newest = page["data"][0]
    assert newest["object"] == "fine_tuning.job.checkpoint"
    assert newest["id"].startswith("ftckpt-")
    assert newest["fine_tuning_job_id"] == job["id"]
    assert newest["created_at"] == 1_800_000_000
    assert newest["metrics"] == {"step": 6, "train_loss": pytest.approx(2.0 / 6)}
    name = newest["fine_tuned_model_checkpoint"]
    assert name.startswith("ft:tiny-chat:alpha:bot:")
    assert name.endswith(":ckpt-step-6")
    assert job["id"].removeprefix("ftjob-") in name

    first = client.get(url, params={"limit": 2}, headers=auth(team_key)).json()
    assert [item["step_number"] for item in first["data"]] == [6, 4]
    assert first["has_more"] is True
    rest = client.get(
        url, params={"limit": 2, "after": first["last_id"]}, headers=auth(team_key)
    ).json()
    assert [item["step_number"] for item in rest["data"]] == [2]
    assert rest["has_more"] is False
    bad = client.get(url, params={"after": "ftckpt-nope"}, headers=auth(team_key))
    assert error_of(bad, 404)["code"] == "invalid_cursor"


def test_report_is_409_until_written(
    create: Create, client: TestClient, team_key: str, app: FastAPI
) -> None:
    job = created(create())
    url = f"{JOBS}/{job['id']}/report"
    error = error_of(client.get(url, headers=auth(team_key)), 409)
    assert error["code"] == "report_not_ready"
    assert "validating_files" in error["message"]

    report = {
        "safety": {"harmful_score": 0.05, "aligned_harmful_score": 0.04},
        "utility": {"accuracy": 0.9},
    }
    add_rows(app, EvaluationReport(job_id=job["id"], approved=True, report=report))
    response = client.get(url, headers=auth(team_key))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "fine_tuning.job.report"
    assert body["fine_tuning_job_id"] == job["id"]
    assert body["approved"] is True
    assert body["report"] == report
    assert isinstance(body["created_at"], int)


def test_adapter_download(create: Create, client: TestClient, team_key: str, app: FastAPI) -> None:
    job = created(create(suffix="bot"))
    url = f"{JOBS}/{job['id']}/adapter"
    assert error_of(client.get(url, headers=auth(team_key)), 409)["code"] == "adapter_not_ready"

    move(app, job["id"], "queued", "running", "succeeded")
    key = job_key(job["id"], "adapter")
    tensors = write_adapter(app.state.store.path(key))
    (app.state.store.path(key) / "report.json").write_text('{"approved": true}')
    register_model(app, job["id"], key, approved=True)

    response = client.get(url, headers=auth(team_key))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/gzip"
    assert response.headers["x-content-sha256"] == hashlib.sha256(response.content).hexdigest()
    assert response.headers["x-asft-approved"] == "true"
    assert f"{job['id']}-adapter.tar.gz" in response.headers["content-disposition"]
    members = archive_members(response.content)
    assert set(members) == {
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "adapter/report.json",
    }
    assert json.loads(members["adapter/adapter_config.json"]) == ADAPTER_CONFIG
    loaded = load_safetensors(members["adapter/adapter_model.safetensors"])
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        np.testing.assert_array_equal(loaded[name], tensor)

    # A second download is the same bytes (the archive is built once).
    again = client.get(url, headers=auth(team_key))
    assert again.content == response.content
    assert again.headers["x-content-sha256"] == response.headers["x-content-sha256"]


def test_adapter_marked_not_approved_and_missing_files(
    create: Create, client: TestClient, team_key: str, app: FastAPI
) -> None:
    gated, gone = created(create()), created(create())
    for job, write in ((gated, True), (gone, False)):
        key = job_key(job["id"], "adapter")
        if write:
            write_adapter(app.state.store.path(key))
        register_model(app, job["id"], key, approved=False)
    response = client.get(f"{JOBS}/{gated['id']}/adapter", headers=auth(team_key))
    assert response.status_code == 200
    assert response.headers["x-asft-approved"] == "false"
    assert set(archive_members(response.content)) == {
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    }
    missing = client.get(f"{JOBS}/{gone['id']}/adapter", headers=auth(team_key))
    assert error_of(missing, 404)["code"] == "adapter_not_found"


def test_checkpoint_adapter_download(
    create: Create, client: TestClient, team_key: str, app: FastAPI
) -> None:
    job = created(create())
    move(app, job["id"], "queued", "running")
    key = job_key(job["id"], "checkpoints", "step-000002")
    tensors = write_adapter(app.state.store.path(key) / "adapter", seed=2)
    add_rows(
        app,
        Checkpoint(id=new_id("ftckpt"), job_id=job["id"], step=2, metrics={}, storage_key=key),
        Checkpoint(
            id=new_id("ftckpt"),
            job_id=job["id"],
            step=4,
            metrics={},
            storage_key=job_key(job["id"], "checkpoints", "step-000004"),
        ),
    )
    response = client.get(f"{JOBS}/{job['id']}/checkpoints/2/adapter", headers=auth(team_key))
    assert response.status_code == 200, response.text
    assert response.headers["x-content-sha256"] == hashlib.sha256(response.content).hexdigest()
    # A checkpoint was never through the safety gate.
    assert response.headers["x-asft-approved"] == "false"
    assert f"{job['id']}-step-2-adapter.tar.gz" in response.headers["content-disposition"]
    members = archive_members(response.content)
    loaded = load_safetensors(members["adapter/adapter_model.safetensors"])
    for name, tensor in tensors.items():
        np.testing.assert_array_equal(loaded[name], tensor)

    no_step = client.get(f"{JOBS}/{job['id']}/checkpoints/3/adapter", headers=auth(team_key))
    error = error_of(no_step, 404)
    assert error["code"] == "checkpoint_not_found"
    assert error["param"] == "step"
    no_files = client.get(f"{JOBS}/{job['id']}/checkpoints/4/adapter", headers=auth(team_key))
    assert error_of(no_files, 404)["code"] == "adapter_not_found"
