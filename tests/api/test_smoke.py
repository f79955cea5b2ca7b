"""A first walk through the API: a team uploads a file, creates a job and reads it back."""

from __future__ import annotations

from fastapi.testclient import TestClient

from asft_core.spec import DEFAULT_METHOD
from tests.api.conftest import auth


def test_upload_create_and_read_a_job(
    client: TestClient, team_key: str, training_file: str, model_pair: str
) -> None:
    created = client.post(
        "/v1/fine_tuning/jobs",
        json={"model": model_pair, "training_file": training_file},
        headers=auth(team_key),
    )
    assert created.status_code == 200, created.text
    job = created.json()
    assert job["object"] == "fine_tuning.job"
    assert job["id"].startswith("ftjob-")
    assert job["status"] == "validating_files"
    assert job["method"]["type"] == DEFAULT_METHOD
    assert job["hyperparameters"] == {
        "n_epochs": 3,
        "batch_size": 8,
        "learning_rate_multiplier": 1.0,
    }
    fetched = client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=auth(team_key))
    assert fetched.json() == job
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=auth(team_key)).json()
    assert events["object"] == "list"
    assert events["data"][0]["message"].startswith("Created fine-tuning job")
