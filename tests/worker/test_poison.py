"""A job that kills every worker it lands on (the OOM killer's work) fails with worker_lost
after ASFT_MAX_WORKER_LOSSES losses, while the other jobs go on."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import select

from asft_core.zoo import ZooPaths
from service.db.models import Job
from service.db.session import make_engine
from tests.worker.conftest import StartWorker, create_job, upload_rows, wait_for_job

TERMINAL = {"succeeded", "failed", "cancelled"}


def _events(client: TestClient, key: str, job_id: str) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {key}"}
    page = client.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=1000", headers=headers)
    data: list[dict[str, Any]] = page.json()["data"]
    return data


def _wait_for_run(database_url: str, job_id: str, attempt: int, timeout_s: float = 120) -> None:
    """Until a worker has taken the job for the ``attempt``-th time and trained a while."""
    engine = make_engine(database_url)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            with engine.connect() as connection:
                row = connection.execute(
                    select(Job.status, Job.attempt).where(Job.id == job_id)
                ).one()
            if row.status == "running" and row.attempt >= attempt:
                time.sleep(3)  # some steps into training
                return
            time.sleep(0.2)
    finally:
        engine.dispose()
    raise AssertionError(f"{job_id} was not taken a {attempt}th time within {timeout_s}s")


def test_a_poison_job_fails_with_worker_lost_and_the_others_finish(
    client: TestClient,
    team_key: str,
    zoo: ZooPaths,
    service_env: dict[str, str],
    start_worker: StartWorker,
) -> None:
    service_env["ASFT_MAX_WORKER_LOSSES"] = "2"
    training = upload_rows(client, team_key, zoo.task_file("sentiment", "train"), 1000)
    # Long enough (2,500 steps) that each worker dies while it trains, not after.
    long_job = {"n_epochs": 10, "batch_size": 4}
    poison = create_job(client, team_key, training, "supervised", long_job)
    # Two workers die under it, as if it outgrew memory each time it ran.
    for attempt in (1, 2):
        worker = start_worker()
        _wait_for_run(service_env["ASFT_DATABASE_URL"], poison, attempt)
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)
    small = upload_rows(client, team_key, zoo.task_file("sentiment", "train"), 12)
    other = create_job(client, team_key, small, "supervised", {"n_epochs": 1, "batch_size": 4})
    start_worker()
    failed = wait_for_job(client, team_key, poison, TERMINAL, timeout_s=120)
    assert failed["status"] == "failed", failed
    assert failed["error"]["code"] == "worker_lost", failed
    assert "died 2 times" in failed["error"]["message"]
    assert "batch_size" in failed["error"]["message"]  # the hint: memory, most often
    losses = [e for e in _events(client, team_key, poison) if "last_step" in (e.get("data") or {})]
    assert sorted(e["data"]["loss"] for e in losses) == [1, 2]
    assert all(e["data"]["worker"] and e["data"]["last_step"] for e in losses), losses
    # The job that did nothing wrong finishes on the worker the poison job did not take.
    finished = wait_for_job(client, team_key, other, TERMINAL, timeout_s=240)
    assert finished["status"] in ("succeeded", "failed"), finished
    assert finished["error"] is None or finished["error"]["code"] == "safety_gate_failed"
