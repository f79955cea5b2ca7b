"""Reliability with real processes: a worker killed mid-training loses nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable

from fastapi.testclient import TestClient

from asft_core.zoo import ZooPaths
from tests.worker.conftest import create_job, upload_rows, wait_for_job


def test_a_killed_worker_s_job_resumes_from_its_last_checkpoint(
    client: TestClient,
    team_key: str,
    zoo: ZooPaths,
    start_worker: Callable[[], subprocess.Popen[bytes]],
) -> None:
    headers = {"Authorization": f"Bearer {team_key}"}
    training = upload_rows(client, team_key, zoo.poisoned_file("sentiment", 0.1), 1000)
    first = start_worker()
    job_id = create_job(
        client, team_key, training, "asft", {"n_epochs": 1, "batch_size": 4, "learning_rate": 1e-3}
    )
    # Kill the whole process group once a few checkpoints exist, mid-training.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        checkpoints = client.get(
            f"/v1/fine_tuning/jobs/{job_id}/checkpoints", headers=headers
        ).json()
        if len(checkpoints["data"]) >= 3:
            break
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=10)
    killed_at = max(c["step_number"] for c in checkpoints["data"])
    assert (
        client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=headers).json()["status"] == "running"
    )

    picked_up = time.monotonic()
    start_worker()
    wait_for_job(client, team_key, job_id, {"running"}, timeout_s=60)
    job = wait_for_job(client, team_key, job_id, {"succeeded", "failed", "cancelled"})
    assert job["status"] in ("succeeded", "failed"), job
    assert job["error"] is None or job["error"]["code"] == "safety_gate_failed"
    assert time.monotonic() - picked_up < 240

    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=1000", headers=headers).json()
    messages = [e["message"] for e in events["data"]]
    resumed = [m for m in messages if m.startswith("Resuming from checkpoint")]
    assert resumed, messages[:20]
    resumed_step = int(resumed[0].rsplit("-", 1)[1])
    assert resumed_step >= killed_at - 2 and resumed_step > 0  # not step 0
    steps = [e["data"]["step"] for e in events["data"] if e["type"] == "metrics"]
    assert sorted(steps) == list(range(1, 251))  # 1000 rows / batch 4: no gaps, no duplicates
    checkpoint_steps = [
        c["step_number"]
        for c in client.get(
            f"/v1/fine_tuning/jobs/{job_id}/checkpoints?limit=100", headers=headers
        ).json()["data"]
    ]
    assert len(checkpoint_steps) == len(set(checkpoint_steps))
