"""Cancellation within one step, and a graceful worker shutdown that checkpoints and requeues."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from asft_core.zoo import ZooPaths
from tests.worker.conftest import create_job, upload_rows, wait_for_job

LONG_JOB = {"n_epochs": 1, "batch_size": 4, "learning_rate": 1e-3}  # 250 steps on 1000 rows


def _start_long_job(client: TestClient, key: str, zoo: ZooPaths) -> str:
    training = upload_rows(client, key, zoo.poisoned_file("sentiment", 0.1), 1000)
    return create_job(client, key, training, "asft", LONG_JOB)


def _wait_checkpoints(
    client: TestClient, key: str, job_id: str, count: int
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        page = client.get(
            f"/v1/fine_tuning/jobs/{job_id}/checkpoints", headers={"Authorization": f"Bearer {key}"}
        ).json()
        if len(page["data"]) >= count:
            data: list[dict[str, Any]] = page["data"]
            return data
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} saved fewer than {count} checkpoints")


def _metric_steps(client: TestClient, key: str, job_id: str) -> list[int]:
    events = client.get(
        f"/v1/fine_tuning/jobs/{job_id}/events?limit=1000",
        headers={"Authorization": f"Bearer {key}"},
    ).json()["data"]
    return [e["data"]["step"] for e in events if e["type"] == "metrics"]


def _messages(client: TestClient, key: str, job_id: str) -> list[str]:
    events = client.get(
        f"/v1/fine_tuning/jobs/{job_id}/events?limit=1000",
        headers={"Authorization": f"Bearer {key}"},
    ).json()["data"]
    return [e["message"] for e in events]


@pytest.mark.parametrize("metrics_interval_s", ["0", "2"], ids=["each-step", "batched"])
def test_cancelling_a_running_job_stops_it_within_a_step_and_keeps_a_checkpoint(
    client: TestClient,
    team_key: str,
    zoo: ZooPaths,
    start_worker: Callable[[], subprocess.Popen[bytes]],
    service_env: dict[str, str],
    metrics_interval_s: str,
) -> None:
    headers = {"Authorization": f"Bearer {team_key}"}
    service_env["ASFT_METRICS_INTERVAL_S"] = metrics_interval_s
    start_worker()
    job_id = _start_long_job(client, team_key, zoo)
    _wait_checkpoints(client, team_key, job_id, 2)
    running = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=headers).json()
    assert running["status"] == "running"
    assert running["estimated_finish"] >= running["created_at"]  # kept current while training
    answer = client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=headers)
    assert answer.status_code == 200
    steps_at_cancel = max(_metric_steps(client, team_key, job_id))
    job = wait_for_job(client, team_key, job_id, {"cancelled", "succeeded", "failed"}, 60)
    assert job["status"] == "cancelled"
    final_steps = _metric_steps(client, team_key, job_id)
    if metrics_interval_s == "0":
        assert max(final_steps) <= steps_at_cancel + 1
    else:  # steps show up to an interval late; every step trained is recorded, none after
        stopped = f"cancelled before step {max(final_steps) + 1}"
        assert stopped in _messages(client, team_key, job_id)
    assert max(final_steps) < 250
    checkpoints = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", headers=headers).json()
    assert checkpoints["data"][0]["step_number"] == max(final_steps)  # the last state is kept
    adapter = client.get(
        f"/v1/fine_tuning/jobs/{job_id}/checkpoints/{max(final_steps)}/adapter", headers=headers
    )
    assert adapter.status_code == 200


def test_sigterm_checkpoints_and_requeues_the_running_job(
    client: TestClient,
    team_key: str,
    zoo: ZooPaths,
    start_worker: Callable[[], subprocess.Popen[bytes]],
) -> None:
    headers = {"Authorization": f"Bearer {team_key}"}
    first = start_worker()
    job_id = _start_long_job(client, team_key, zoo)
    _wait_checkpoints(client, team_key, job_id, 2)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=60) == 0
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=headers).json()
    assert job["status"] == "queued"
    stopped_at = max(_metric_steps(client, team_key, job_id))
    checkpoint = _wait_checkpoints(client, team_key, job_id, 1)[0]
    assert checkpoint["step_number"] == stopped_at  # checkpointed on the way out

    start_worker()
    job = wait_for_job(client, team_key, job_id, {"succeeded", "failed", "cancelled"})
    assert job["status"] in ("succeeded", "failed")
    assert job["error"] is None or job["error"]["code"] == "safety_gate_failed"
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=1000", headers=headers).json()
    messages = [e["message"] for e in events["data"]]
    assert any("shutting down" in m for m in messages)
    assert f"Resuming from checkpoint step-{stopped_at:06d}" in messages
    assert sorted(_metric_steps(client, team_key, job_id)) == list(range(1, 251))
