"""``/v1/models``: the admin registers model pairs; teams list them with their own fine-tuned
models, read one, and delete a fine-tuned model with its checkpoints and files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from service.db.models import Checkpoint, EvaluationReport, FineTunedModel, Job, ModelPair
from tests.api.conftest import ADMIN, auth, jsonl, sentiment_rows
from tests.api.finished_jobs import FinishedJob, create_job, finish_job

MakeTeam = Callable[[str], tuple[str, str]]


def _register(client: TestClient, **body: Any) -> Any:
    return client.post("/v1/models", json=body, headers=ADMIN)


def _stored_pair(app: FastAPI, pair_id: str) -> ModelPair:
    with app.state.sessions() as session:
        pair = session.get(ModelPair, pair_id)
    assert pair is not None
    return pair


def test_register_a_hub_pair(app: FastAPI, client: TestClient, team_key: str) -> None:
    response = _register(
        client, id="llama-2-7b-chat", aligned_model="meta/chat", base_model="meta/base"
    )
    assert response.status_code == 200, response.text
    model = response.json()
    assert model["id"] == "llama-2-7b-chat"
    assert model["object"] == "model"
    assert model["kind"] == "model_pair"
    assert model["owned_by"] == "system"
    assert model["aligned_model"] == "meta/chat"
    assert model["base_model"] == "meta/base"
    assert model["parent"] is None and model["job_id"] is None
    assert client.get("/v1/models/llama-2-7b-chat", headers=auth(team_key)).json() == model
    assert _stored_pair(app, "llama-2-7b-chat").eval_suite is None


def test_register_local_folders_stores_absolute_paths(
    app: FastAPI, client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "models" / "aligned").mkdir(parents=True)
    (tmp_path / "models" / "base").mkdir()
    suite = tmp_path / "models" / "suite.json"
    suite.write_text('{"harmful_prompts": "harmful.jsonl"}')
    # Relative paths are resolved against the API's directory: the worker may run elsewhere.
    monkeypatch.chdir(tmp_path)
    response = _register(
        client,
        id="tiny.chat_v1",
        aligned_model="./models/aligned",
        base_model=str(tmp_path / "models" / "base"),
        eval_suite="models/suite.json",
    )
    assert response.status_code == 200, response.text
    assert response.json()["aligned_model"] == str(tmp_path / "models" / "aligned")
    assert response.json()["base_model"] == str(tmp_path / "models" / "base")
    assert _stored_pair(app, "tiny.chat_v1").eval_suite == str(suite)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("aligned_model", "/does/not/exist"),
        ("aligned_model", "./missing-folder"),
        ("base_model", "~/no-such-model-folder"),
        ("base_model", "no-owner"),
        ("base_model", "too/many/parts"),
    ],
)
def test_a_missing_local_model_is_422(
    client: TestClient, team_key: str, field: str, value: str
) -> None:
    body = {"id": "pair", "aligned_model": "org/chat", "base_model": "org/base", field: value}
    response = _register(client, **body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "model_path_not_found"
    assert error["param"] == field
    assert value in error["message"]
    assert client.get("/v1/models/pair", headers=auth(team_key)).status_code == 404


def test_a_missing_eval_suite_is_422(client: TestClient, tmp_path: Path) -> None:
    response = _register(
        client,
        id="pair",
        aligned_model="org/chat",
        base_model="org/base",
        eval_suite=str(tmp_path / "nope.json"),
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "eval_suite_not_found"
    assert response.json()["error"]["param"] == "eval_suite"
    assert str(tmp_path / "nope.json") in response.json()["error"]["message"]


def test_a_duplicate_id_is_409(client: TestClient, team_key: str) -> None:
    assert (
        _register(client, id="pair", aligned_model="a/one", base_model="a/two").status_code == 200
    )
    again = _register(client, id="pair", aligned_model="b/one", base_model="b/two")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "model_exists"
    assert again.json()["error"]["param"] == "id"
    # The first registration stands.
    kept = client.get("/v1/models/pair", headers=auth(team_key)).json()
    assert kept["aligned_model"] == "a/one"


@pytest.mark.parametrize(
    "model_id", ["has space", "org/name", "-leading", "ft:x", "a" * 65, "", "é"]
)
def test_bad_model_ids_are_422(client: TestClient, team_key: str, model_id: str) -> None:
    response = _register(client, id=model_id, aligned_model="a/one", base_model="a/two")
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == "id"
    assert client.get("/v1/models", headers=auth(team_key)).json()["data"] == []


def test_unknown_fields_are_422(client: TestClient) -> None:
    response = _register(
        client, id="pair", aligned_model="a/one", base_model="a/two", revision="main"
    )
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "revision"


@pytest.fixture
def finished(
    app: FastAPI, client: TestClient, team_key: str, model_pair: str, training_file: str
) -> FinishedJob:
    """A succeeded job of team alpha, with its fine-tuned model and files."""
    return finish_job(app, create_job(client, team_key, model_pair, training_file))


def test_list_shows_pairs_and_only_the_teams_fine_tuned_models(
    app: FastAPI,
    client: TestClient,
    make_team: MakeTeam,
    team_key: str,
    finished: FinishedJob,
    upload: Callable[..., dict[str, Any]],
) -> None:
    _register(client, id="another-pair", aligned_model="b/chat", base_model="b/base")
    _, beta_key = make_team("beta")
    beta_file = upload(beta_key, jsonl(sentiment_rows(20)))["id"]
    beta_finished = finish_job(app, create_job(client, beta_key, "tiny-chat", beta_file))

    alpha = client.get("/v1/models", headers=auth(team_key))
    assert alpha.status_code == 200
    data = alpha.json()["data"]
    assert [(m["id"], m["kind"]) for m in data] == [
        ("another-pair", "model_pair"),
        ("tiny-chat", "model_pair"),
        (finished.model_id, "fine_tuned"),
    ]
    tuned = data[-1]
    assert tuned["owned_by"] != "system"
    assert tuned["parent"] == "tiny-chat"
    assert tuned["job_id"] == finished.job_id
    assert tuned["approved"] is True

    beta = client.get("/v1/models", headers=auth(beta_key)).json()["data"]
    assert [m["id"] for m in beta if m["kind"] == "fine_tuned"] == [beta_finished.model_id]


def test_get_a_fine_tuned_model(client: TestClient, team_key: str, finished: FinishedJob) -> None:
    response = client.get(f"/v1/models/{finished.model_id}", headers=auth(team_key))
    assert response.status_code == 200, response.text
    assert response.json()["id"] == finished.model_id
    assert response.json()["job_id"] == finished.job_id
    job = client.get(f"/v1/fine_tuning/jobs/{finished.job_id}", headers=auth(team_key)).json()
    assert job["fine_tuned_model"] == finished.model_id


def test_unknown_and_other_teams_models_are_404(
    client: TestClient, make_team: MakeTeam, finished: FinishedJob
) -> None:
    _, beta_key = make_team("beta")
    for model_id in (finished.model_id, "ft:tiny-chat:alpha::nope", "nope"):
        response = client.get(f"/v1/models/{model_id}", headers=auth(beta_key))
        assert response.status_code == 404, model_id
        assert response.json()["error"]["code"] == "model_not_found"
    # Beta cannot delete it either, and the refusal removes nothing.
    refused = client.delete(f"/v1/models/{finished.model_id}", headers=auth(beta_key))
    assert refused.status_code == 404
    assert (finished.folder / "adapter" / "adapter_model.safetensors").is_file()


def _rows(app: FastAPI, job_id: str) -> dict[str, int]:
    with app.state.sessions() as session:
        return {
            name: session.scalar(select(func.count()).select_from(table).where(column == job_id))
            or 0
            for name, table, column in (
                ("checkpoints", Checkpoint, Checkpoint.job_id),
                ("fine_tuned_models", FineTunedModel, FineTunedModel.job_id),
                ("evaluation_reports", EvaluationReport, EvaluationReport.job_id),
                ("jobs", Job, Job.id),
            )
        }


def test_delete_removes_rows_and_files(
    app: FastAPI, client: TestClient, team_key: str, finished: FinishedJob
) -> None:
    assert _rows(app, finished.job_id) == {
        "checkpoints": 1,
        "fine_tuned_models": 1,
        "evaluation_reports": 1,
        "jobs": 1,
    }
    assert (finished.folder / "checkpoints" / "step-5" / "adapter").is_dir()

    deleted = client.delete(f"/v1/models/{finished.model_id}", headers=auth(team_key))
    assert deleted.status_code == 200, deleted.text
    assert deleted.json() == {"id": finished.model_id, "object": "model", "deleted": True}

    counts = _rows(app, finished.job_id)
    assert counts["checkpoints"] == 0
    assert counts["fine_tuned_models"] == 0
    assert counts["jobs"] == 1  # the job keeps its record
    assert not finished.folder.exists()
    assert app.state.store.root.is_dir()

    again = client.delete(f"/v1/models/{finished.model_id}", headers=auth(team_key))
    assert again.status_code == 404
    assert again.json()["error"]["code"] == "model_not_found"
    assert client.get(f"/v1/models/{finished.model_id}", headers=auth(team_key)).status_code == 404
    listed = client.get("/v1/models", headers=auth(team_key)).json()["data"]
    assert [m["id"] for m in listed] == ["tiny-chat"]
    checkpoints = client.get(
        f"/v1/fine_tuning/jobs/{finished.job_id}/checkpoints", headers=auth(team_key)
    ).json()
    assert checkpoints["data"] == []
    adapter = client.get(f"/v1/fine_tuning/jobs/{finished.job_id}/adapter", headers=auth(team_key))
    assert adapter.status_code == 404
    assert adapter.json()["error"]["code"] == "model_deleted"


def test_a_model_pair_cannot_be_deleted_by_a_team(
    client: TestClient, team_key: str, model_pair: str
) -> None:
    response = client.delete(f"/v1/models/{model_pair}", headers=auth(team_key))
    assert response.status_code == 404
    assert client.get(f"/v1/models/{model_pair}", headers=auth(team_key)).status_code == 200


def test_models_need_a_team_key(client: TestClient, model_pair: str) -> None:
    for path in ("/v1/models", f"/v1/models/{model_pair}"):
        assert client.get(path).status_code == 401
        response = client.get(path, headers=auth("asft-unknown"))
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
