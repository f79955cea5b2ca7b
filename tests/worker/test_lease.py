"""The database, not the queue, decides: a job delivered twice trains once."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import select

from asft_core.recipe import describe_failure
from asft_core.zoo import ZooPaths
from service.db.models import AlignmentArtifactRow
from service.db.session import make_engine
from service.queue import send_job
from tests.worker.conftest import create_job, upload_rows, wait_for_job


def test_a_job_delivered_twice_to_two_workers_trains_once(
    client: TestClient,
    team_key: str,
    zoo: ZooPaths,
    start_worker: Callable[[], subprocess.Popen[bytes]],
    service_env: dict[str, str],
) -> None:
    headers = {"Authorization": f"Bearer {team_key}"}
    training = upload_rows(client, team_key, zoo.poisoned_file("sentiment", 0.0), 80)
    start_worker()
    start_worker()
    job_id = create_job(client, team_key, training, "asft", {"n_epochs": 1})
    app = client.app.state  # type: ignore[attr-defined]
    send_job(app.queue, app.engine, job_id)  # a duplicate, as a re-sending reconciler makes
    job = wait_for_job(client, team_key, job_id, {"succeeded", "failed", "cancelled"})
    assert job["status"] in ("succeeded", "failed")
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=500", headers=headers).json()
    messages = [e["message"] for e in events["data"]]
    assert messages.count("Fine-tuning started") == 1
    steps = [e["data"]["step"] for e in events["data"] if e["type"] == "metrics"]
    assert sorted(steps) == list(range(1, 11))
    # The pair's alignment direction is recorded once, where the cache holds it.
    engine = make_engine(service_env["ASFT_DATABASE_URL"])
    with engine.connect() as connection:
        rows = connection.execute(select(AlignmentArtifactRow)).all()
    engine.dispose()
    assert len(rows) == 1
    assert Path(rows[0].path).exists() and rows[0].model_pair == "tiny-chat"


def test_running_out_of_memory_fails_with_a_hint_not_a_retry() -> None:
    failure = describe_failure(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert failure.code == "out_of_memory"
    assert "batch_size" in failure.message and "gradient_accumulation_steps" in failure.message
    assert failure.param == "batch_size"
    assert describe_failure(ValueError("boom")).code == "internal_error"


def test_jobs_over_the_limits_are_refused_before_training() -> None:
    import pytest

    from asft_core.recipe import JobLimitExceeded, Limits, check_limits

    limits = Limits(max_steps=100, max_tokens=10_000)
    check_limits(limits, steps=100, tokens=10_000)
    with pytest.raises(JobLimitExceeded, match="101 steps"):
        check_limits(limits, steps=101, tokens=1)
    with pytest.raises(JobLimitExceeded, match="tokens"):
        check_limits(limits, steps=1, tokens=10_001)
    assert JobLimitExceeded.code == "job_limit_exceeded"
    assert describe_failure(JobLimitExceeded("x")).code == "job_limit_exceeded"
