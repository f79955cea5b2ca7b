"""The scale-out setup: a worker on Redis and PostgreSQL, and a broker that loses messages."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from asft_core.zoo import ZooPaths
from service.db.migrate import upgrade_head
from tests.conftest import postgres_database
from tests.worker.conftest import create_job, upload_rows, wait_for_job

SHORT_JOB = {"n_epochs": 1, "batch_size": 8}


@pytest.fixture
def scale_out_env(
    service_env: dict[str, str], private_redis: str, tmp_path: Path
) -> Iterator[dict[str, str]]:
    """Switch the shared environment to PostgreSQL and the test's own Redis."""
    for url in postgres_database():
        upgrade_head(url, tmp_path)
        service_env["ASFT_DATABASE_URL"] = url
        service_env["ASFT_BROKER_URL"] = private_redis
        yield service_env


def _submit(client: TestClient, key: str, zoo: ZooPaths) -> str:
    training = upload_rows(client, key, zoo.poisoned_file("sentiment", 0.0), 40)
    return create_job(client, key, training, "asft", SHORT_JOB)


def test_a_job_runs_on_redis_and_postgresql(
    scale_out_env: dict[str, str],
    client: TestClient,
    team_key: str,
    zoo: ZooPaths,
    start_worker: Callable[[], subprocess.Popen[bytes]],
) -> None:
    start_worker()
    job = wait_for_job(client, team_key, _submit(client, team_key, zoo), {"succeeded", "failed"})
    assert job["status"] == "succeeded" or job["error"]["code"] == "safety_gate_failed"
    assert job["trained_tokens"] > 0


def test_a_flushed_redis_loses_no_job(
    scale_out_env: dict[str, str],
    client: TestClient,
    team_key: str,
    zoo: ZooPaths,
    start_worker: Callable[[], subprocess.Popen[bytes]],
) -> None:
    job_id = _submit(client, team_key, zoo)
    broker = redis.Redis.from_url(scale_out_env["ASFT_BROKER_URL"])
    assert broker.llen("gpu") == 2  # the upload's scan and the job are there...
    broker.flushall()
    assert broker.llen("gpu") == 0  # ...and now it is gone
    started = time.monotonic()
    start_worker()
    job = wait_for_job(client, team_key, job_id, {"succeeded", "failed"}, timeout_s=120)
    assert job["status"] == "succeeded" or job["error"]["code"] == "safety_gate_failed"
    assert time.monotonic() - started < 60  # the reconciler re-sent it within a few periods
