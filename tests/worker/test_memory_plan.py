"""The memory plan in a job's flow: a job that fits only with gradient checkpointing trains
with it, and one that cannot fit fails before training, naming settings that would."""

from __future__ import annotations

import torch
from fastapi.testclient import TestClient

from asft_core.memory import GIB, plan_memory
from asft_core.spec import JobSpec
from asft_core.zoo import ZooPaths
from tests.worker.conftest import StartWorker, create_job, upload_rows, wait_for_job

JOB = {"n_epochs": 1, "batch_size": 4}
TERMINAL = {"succeeded", "failed", "cancelled"}


def test_the_worker_plans_memory_and_refuses_what_cannot_fit(
    client: TestClient,
    team_key: str,
    zoo: ZooPaths,
    service_env: dict[str, str],
    start_worker: StartWorker,
) -> None:
    job = JobSpec.resolve("supervised", JOB)
    plan = plan_memory(zoo.aligned, job, torch.float32)
    checkpointed = plan_memory(zoo.aligned, job, torch.float32, gradient_checkpointing=True)
    # Room for the job with gradient checkpointing, not without.
    service_env["ASFT_DEVICE_MEMORY_GB"] = str((plan.total + checkpointed.total) / 2 / GIB)
    training = upload_rows(client, team_key, zoo.task_file("sentiment", "train"), 80)
    fits = create_job(client, team_key, training, "supervised", JOB)
    too_big = create_job(
        client, team_key, training, "supervised", {"n_epochs": 1, "batch_size": 64}
    )
    start_worker()
    headers = {"Authorization": f"Bearer {team_key}"}

    done = wait_for_job(client, team_key, fits, TERMINAL)
    assert done["status"] in ("succeeded", "failed") and done["trained_tokens"], done
    events = client.get(f"/v1/fine_tuning/jobs/{fits}/events?limit=200", headers=headers).json()
    messages = [event["message"] for event in events["data"]]
    assert any(m.startswith("Memory plan on cpu (") for m in messages), messages
    assert "Turned gradient checkpointing on so that the job fits" in messages

    refused = wait_for_job(client, team_key, too_big, TERMINAL)
    assert refused["status"] == "failed" and refused["trained_tokens"] is None, refused
    assert refused["error"]["code"] == "insufficient_device_memory"
    assert refused["error"]["param"] == "batch_size"
    assert "Would fit: batch_size" in refused["error"]["message"]
