"""A finished job, recorded by the worker's own functions (``worker.persistence``) on a job
created through the API: the worker's claim, a checkpoint and its ``finish`` with a typed
report. Only training is skipped: the adapter folders hold placeholder files.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from fastapi.testclient import TestClient

from asft_core.checkpoints import CheckpointInfo
from asft_core.recipe import RecipeResult
from asft_core.spec import GateVerdict, Report
from asft_core.training import TrainResult
from service.db.models import Job, Team
from service.storage import job_key
from tests.api.conftest import auth
from worker.persistence import JobContext, claim, end_validation, finish, record_checkpoint


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


def _passing_report() -> Report:
    cell = {"value": 0.0, "low": 0.0, "high": 0.1, "total": 10}
    safety = {"overall": cell, "per_category": {}}
    return Report(
        evaluation={"reference": {"safety": safety}, "fine_tuned": {"safety": safety}},
        gate=GateVerdict(True, (), 0.2, 0.1),
    )


def finish_job(app: FastAPI, job_id: str, step: int = 5) -> FinishedJob:
    """Take ``job_id`` from ``validating_files`` to ``succeeded`` as a worker would."""
    context = JobContext(app.state.settings, app.state.engine, app.state.store)
    checkpoint = app.state.store.path(job_key(job_id, "checkpoints", f"step-{step}"))
    _write_adapter(checkpoint / "adapter")
    _write_adapter(app.state.store.path(job_key(job_id, "adapter")))
    assert end_validation(context, job_id, "queued", {})
    assert claim(context, job_id) == (True, "running")
    info = CheckpointInfo(step=step, epoch=0, path=checkpoint, adapter_path=checkpoint / "adapter")
    record_checkpoint(context, job_id, info, {"step": step, "train_loss": 0.5, "penalty": 0.0})
    trained = TrainResult(
        "completed", checkpoint.parent.parent / "adapter", step, step, 100, 0.5, [info]
    )
    with app.state.sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        team = session.get(Team, job.team_id)
        assert team is not None
    status = finish(context, job_id, team, RecipeResult("completed", trained, _passing_report()))
    assert status == "succeeded"
    with app.state.sessions() as session:
        model_id = session.get(Job, job_id).fine_tuned_model  # type: ignore[union-attr]
    assert model_id is not None
    return FinishedJob(job_id, model_id, step, app.state.store.path(job_key(job_id)))


def install_adapter(source: Path, folder: Path) -> None:
    """Put the real PEFT adapter ``source`` where a placeholder one is (``folder``)."""
    shutil.rmtree(folder)
    shutil.copytree(source, folder)


def install_real_adapters(job: FinishedJob, final: Path, checkpoint: Path) -> None:
    """Replace ``job``'s placeholder adapter and checkpoint adapter with real ones."""
    install_adapter(final, job.folder / "adapter")
    step = job.folder / "checkpoints" / f"step-{job.checkpoint_step}" / "adapter"
    install_adapter(checkpoint, step)
