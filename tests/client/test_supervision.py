"""``asft serve`` supervises: a worker killed under a job (what the out-of-memory killer does)
is restarted, the API answers throughout, ``/readyz`` says the worker is down meanwhile, and
the job resumes from its checkpoint."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from asft_core.zoo import ZooPaths
from service.supervision import status_path
from tests.client.conftest import run_service
from tests.client.embedded import Service, asft, create_job, first_rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, zoo: ZooPaths
) -> Iterator[Service]:
    """Short leases, so the restarted worker takes the dead one's job back within seconds."""
    folder = tmp_path_factory.mktemp("supervised")
    yield from run_service(folder, cache_dir, ASFT_STALE_AFTER_S="5", ASFT_HEARTBEAT_INTERVAL_S="1")


def _worker_pid(service: Service) -> int:
    status = json.loads(status_path(service.data_dir).read_text())
    pid: int = status["children"]["worker"]["pid"]
    return pid


def test_a_killed_worker_is_restarted_and_its_job_resumes(
    service: Service, registered: str, zoo: ZooPaths, tmp_path: Path
) -> None:
    training = first_rows(zoo.task_file("sentiment", "train"), tmp_path / "train.jsonl", 400)
    job_id = create_job(service, registered, training, "--epochs", "2", "--batch-size", "4")
    headers = {"Authorization": f"Bearer {service.team_key}"}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # a few checkpoints in
        checkpoints = httpx.get(
            f"{service.url}/v1/fine_tuning/jobs/{job_id}/checkpoints", headers=headers
        ).json()["data"]
        if len(checkpoints) >= 2:
            break
        time.sleep(0.2)
    killed = _worker_pid(service)
    os.kill(killed, signal.SIGKILL)

    # The API answers all along; readiness names the worker until it is back.
    seen_down = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert httpx.get(f"{service.url}/healthz").status_code == 200
        ready = httpx.get(f"{service.url}/readyz")
        if ready.status_code == 503:
            seen_down = ready.json()["checks"]["supervised"]
        elif seen_down is not None:
            break
        time.sleep(0.1)
    assert seen_down == "worker down (killed by SIGKILL), restarting", seen_down
    assert _worker_pid(service) != killed

    watched = asft(service, "jobs", "watch", job_id, timeout_s=300)
    job = json.loads(asft(service, "jobs", "get", job_id).stdout)
    assert job["status"] in ("succeeded", "failed"), (job, watched.stderr)
    assert job["error"] is None or job["error"]["code"] == "safety_gate_failed", job
    events = httpx.get(
        f"{service.url}/v1/fine_tuning/jobs/{job_id}/events?limit=1000", headers=headers
    ).json()["data"]
    messages = [e["message"] for e in events]
    assert any(m.startswith("Resuming from checkpoint") for m in messages), messages[:30]
    assert any("loss 1 of 3" in m for m in messages), messages[:30]
