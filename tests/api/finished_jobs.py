"""What a worker leaves behind for a finished job, written straight into the database and the
artifact store (there is no worker yet): a checkpoint, an evaluation report, the fine-tuned
model, and their adapter folders.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from fastapi.testclient import TestClient

from api.routes.jobs import fine_tuned_name
from service.db.models import Checkpoint, EvaluationReport, FineTunedModel, Job, Team, new_id
from service.jobs.state import transition
from service.storage import job_key
from tests.api.conftest import auth


@dataclass(frozen=True)
class FinishedJob:
    """The ids and the artifact folder of a succeeded job."""

    job_id: str
    model_id: str
    checkpoint_step: int
    folder: Path


def create_job(client: TestClient, key: str, model: str, training_file: str) -> str:
    """Create a job through the API; returns its id."""
    response = client.post(
        "/v1/fine_tuning/jobs",
        json={"model": model, "training_file": training_file},
        headers=auth(key),
    )
    assert response.status_code == 200, response.text
    job_id: str = response.json()["id"]
    return job_id


def _write_adapter(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 32}')
    (folder / "adapter_model.safetensors").write_bytes(b"not really weights")


def finish_job(app: FastAPI, job_id: str, step: int = 5, approved: bool = True) -> FinishedJob:
    """Move ``job_id`` to ``succeeded`` through the state machine and add what it produced."""
    with app.state.sessions() as session, session.begin():
        job = session.get(Job, job_id)
        assert job is not None
        team = session.get(Team, job.team_id)
        assert team is not None
        model_id = fine_tuned_name(job, team.name)
        adapter_key = job_key(job_id, "adapter")
        checkpoint_key = job_key(job_id, "checkpoints", f"step-{step}")
        for current, target in (
            ("validating_files", "queued"),
            ("queued", "running"),
            ("running", "succeeded"),
        ):
            assert transition(session, job_id, current, target)
        job.fine_tuned_model = model_id
        session.add(
            Checkpoint(
                id=new_id("ftckpt"),
                job_id=job_id,
                step=step,
                metrics={"train_loss": 0.5},
                storage_key=checkpoint_key,
            )
        )
        session.add(
            EvaluationReport(job_id=job_id, approved=approved, report={"harmful_score": 0.0})
        )
        session.add(
            FineTunedModel(
                id=model_id,
                team_id=team.id,
                job_id=job_id,
                model=job.model,
                storage_key=adapter_key,
                approved=approved,
            )
        )
    store = app.state.store
    _write_adapter(store.path(adapter_key))
    _write_adapter(store.path(checkpoint_key) / "adapter")
    return FinishedJob(job_id, model_id, step, store.path(job_key(job_id)))
