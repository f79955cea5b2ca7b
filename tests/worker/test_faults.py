"""Faults, on a PostgreSQL cluster and a Redis server of the test's own: the database
restarts under a running job, Redis restarts with its data lost, the artifact volume fills up,
and twenty jobs arrive at once for two workers. Every job must end once, trained once.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, OperationalError

from asft_core.recipe import describe_failure, storage_full
from asft_core.zoo import ZooPaths
from service.db.migrate import upgrade_head
from service.db.models import FineTunedModel, Job
from service.db.session import make_engine
from service.settings import Settings
from service.storage import ArtifactStore
from tests.conftest import PrivatePostgres, PrivateRedis
from tests.worker.conftest import StartWorker, create_job, upload_rows
from worker.persistence import JobContext, retry_database

TERMINAL = {"succeeded", "failed", "cancelled"}
SEED = 1234  # the same adapter every run, so the safety gate's verdict does not vary
SHORT_JOB = {"n_epochs": 1, "batch_size": 4}  # on 12 rows: 3 steps
WORKER_START_TIMEOUT_S = 90.0


@pytest.fixture
def faults_env(
    service_env: dict[str, str],
    private_postgres: PrivatePostgres,
    private_redis_server: PrivateRedis,
    tmp_path: Path,
) -> dict[str, str]:
    """The shared environment on the test's own PostgreSQL and Redis (request it before
    ``client``, which reads it)."""
    upgrade_head(private_postgres.url, tmp_path)
    service_env.update(
        ASFT_DATABASE_URL=private_postgres.url,
        ASFT_BROKER_URL=private_redis_server.url,
        ASFT_EVAL_MAX_PROMPTS="2",
        # Twenty jobs of one team at once, polled often.
        ASFT_MAX_ACTIVE_JOBS_PER_TEAM="50",
        ASFT_RATE_LIMIT_PER_MINUTE="0",
    )
    return service_env


def _headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _events(client: TestClient, key: str, job_id: str) -> list[dict[str, Any]]:
    response = client.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=1000", headers=_headers(key))
    assert response.status_code == 200, response.text
    data: list[dict[str, Any]] = response.json()["data"]
    return data


def _metric_steps(events: list[dict[str, Any]]) -> list[int]:
    return sorted(e["data"]["step"] for e in events if e["type"] == "metrics")


def _wait_for_all(
    client: TestClient, key: str, job_ids: list[str], timeout_s: float
) -> dict[str, dict[str, Any]]:
    """Poll the job list until every job in ``job_ids`` has ended; returns them by id."""
    deadline = time.monotonic() + timeout_s
    jobs: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        page = client.get("/v1/fine_tuning/jobs?limit=100", headers=_headers(key)).json()
        jobs = {job["id"]: job for job in page["data"] if job["id"] in job_ids}
        if len(jobs) == len(job_ids) and all(j["status"] in TERMINAL for j in jobs.values()):
            return jobs
        time.sleep(0.5)
    waiting = {i: j["status"] for i, j in jobs.items() if j["status"] not in TERMINAL}
    raise AssertionError(f"jobs not finished after {timeout_s}s: {waiting}")


def _wait_for_steps(client: TestClient, key: str, job_id: str, steps: int) -> int:
    """Wait until ``job_id`` has recorded more than ``steps`` steps; returns its last step."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done = _metric_steps(_events(client, key, job_id))
        if done and done[-1] > steps:
            return done[-1]
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} recorded no step past {steps}")


def _assert_trained_once(client: TestClient, key: str, job_id: str) -> dict[str, Any]:
    """One training run of the job: every step once, no gap; returns who trained it."""
    events = _events(client, key, job_id)
    started = [e for e in events if e["message"] == "Fine-tuning started"]
    assert len(started) == 1, [e["message"] for e in events]
    assert started[0]["data"]["attempt"] == 1
    total = next(e["data"]["total_steps"] for e in events if e["type"] == "metrics")
    assert _metric_steps(events) == list(range(1, total + 1))
    trainer: dict[str, Any] = started[0]["data"]
    return trainer


def _attempts(database_url: str) -> dict[str, int]:
    """Each job's ``attempt`` (how often a worker took it from the queue), read from the DB."""
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            return {row.id: row.attempt for row in connection.execute(select(Job.id, Job.attempt))}
    finally:
        engine.dispose()


def _wait_until_ready(log: Path, process: Any) -> None:
    """Wait for a worker's "ready" log line (it then consumes from the queue)."""
    deadline = time.monotonic() + WORKER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        if log.exists() and " ready." in log.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise AssertionError(f"worker not ready after {WORKER_START_TIMEOUT_S}s")


@pytest.mark.slow
def test_a_postgresql_restart_under_a_running_job_pauses_it_and_loses_nothing(
    faults_env: dict[str, str],
    client: TestClient,
    team_key: str,
    zoo: ZooPaths,
    start_worker: StartWorker,
    private_postgres: PrivatePostgres,
    tmp_path: Path,
) -> None:
    worker = start_worker()
    long_file = upload_rows(client, team_key, zoo.poisoned_file("sentiment", 0.0), 400)
    short_file = upload_rows(client, team_key, zoo.poisoned_file("sentiment", 0.0), 12)
    running = create_job(client, team_key, long_file, "asft", SHORT_JOB, seed=SEED)  # 100 steps
    waiting = [
        create_job(client, team_key, short_file, "asft", SHORT_JOB, seed=SEED) for _ in range(2)
    ]
    before = _wait_for_steps(client, team_key, running, 5)

    private_postgres.stop("fast")  # every connection is cut, as in a failover
    # Longer than ASFT_STALE_AFTER_S (5 s): every heartbeat is stale when the server is back.
    time.sleep(6)
    private_postgres.start()
    restarted = time.monotonic()
    resumed_at = _wait_for_steps(client, team_key, running, before)
    recovery_s = time.monotonic() - restarted
    print(f"PostgreSQL restart: training went on {recovery_s:.1f}s after the server was back")

    jobs = _wait_for_all(client, team_key, [running, *waiting], timeout_s=180)
    assert resumed_at > before
    for job in jobs.values():
        assert job["status"] == "succeeded", job
        _assert_trained_once(client, team_key, job["id"])
    assert _attempts(faults_env["ASFT_DATABASE_URL"]) == {running: 1, waiting[0]: 1, waiting[1]: 1}
    assert worker.poll() is None  # the worker rode it out
    # The outage did hit the running job's writes...
    assert "database unreachable" in (tmp_path / "worker-0.log").read_text()
    # ...and its lease was not taken away, though its heartbeat had gone stale.
    messages = [e["message"] for e in _events(client, team_key, running)]
    assert not [m for m in messages if "worker running this job died" in m], messages
    assert recovery_s < 30


@pytest.mark.slow
def test_a_redis_restart_that_loses_the_queue_loses_no_job(
    faults_env: dict[str, str],
    client: TestClient,
    team_key: str,
    zoo: ZooPaths,
    start_worker: StartWorker,
    private_redis_server: PrivateRedis,
) -> None:
    worker = start_worker()
    long_file = upload_rows(client, team_key, zoo.poisoned_file("sentiment", 0.0), 400)
    short_file = upload_rows(client, team_key, zoo.poisoned_file("sentiment", 0.0), 12)
    running = create_job(client, team_key, long_file, "asft", SHORT_JOB, seed=SEED)
    waiting = [
        create_job(client, team_key, short_file, "asft", SHORT_JOB, seed=SEED) for _ in range(2)
    ]
    _wait_for_steps(client, team_key, running, 5)
    broker = redis.Redis.from_url(private_redis_server.url)
    assert broker.llen("gpu") >= 2  # the waiting jobs' messages are in Redis...

    private_redis_server.stop()
    private_redis_server.start()
    restarted = time.monotonic()
    assert broker.llen("gpu") == 0  # ...and a restart without persistence lost them

    jobs = _wait_for_all(client, team_key, [running, *waiting], timeout_s=180)
    recovery_s = time.monotonic() - restarted
    print(f"Redis restart: all {len(jobs)} jobs finished {recovery_s:.1f}s after it")
    for job in jobs.values():
        assert job["status"] == "succeeded", job
        _assert_trained_once(client, team_key, job["id"])
    assert _attempts(faults_env["ASFT_DATABASE_URL"]) == {running: 1, waiting[0]: 1, waiting[1]: 1}
    assert worker.poll() is None
    assert recovery_s < 90


@pytest.mark.slow
def test_a_full_artifact_volume_fails_the_job_clearly_and_serves_nothing_partial(
    faults_env: dict[str, str],
    client: TestClient,
    team_key: str,
    zoo: ZooPaths,
    start_worker: StartWorker,
    tmp_path: Path,
) -> None:
    # Room for the worker's log and a checkpoint's adapter (~30 KB), not for the optimizer
    # state beside it (~64 KB): the first checkpoint runs into the limit mid-file.
    worker = start_worker(file_size_limit_bytes=48 * 1024)
    training = upload_rows(client, team_key, zoo.poisoned_file("sentiment", 0.0), 12)
    # supervised: no alignment direction to cache, so the checkpoint is the first big write.
    job_id = create_job(client, team_key, training, "supervised", SHORT_JOB, seed=SEED)
    job = _wait_for_all(client, team_key, [job_id], timeout_s=180)[job_id]

    assert job["status"] == "failed", job
    assert job["error"]["code"] == "storage_full", job["error"]
    assert "no space left on the artifact volume" in job["error"]["message"]
    assert worker.poll() is None  # EFBIG, not a SIGXFSZ that kills the worker
    headers = _headers(team_key)
    adapter = client.get(f"/v1/fine_tuning/jobs/{job_id}/adapter", headers=headers)
    assert adapter.status_code == 409, adapter.text
    assert (
        client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", headers=headers).json()["data"]
        == []
    )
    step_adapter = client.get(
        f"/v1/fine_tuning/jobs/{job_id}/checkpoints/2/adapter", headers=headers
    )
    assert step_adapter.status_code == 404
    job_folder = tmp_path / "data" / "artifacts" / "jobs" / job_id
    assert job_folder.is_dir()  # the worker got as far as writing there...
    left = [path for path in job_folder.rglob("*") if not path.is_dir()]
    assert left == []  # ...and no half-written file or staging folder remains
    assert [p for p in job_folder.rglob(".*")] == []


@pytest.fixture
def base_url(client: TestClient) -> Iterator[str]:
    """The test's app served by uvicorn on a free local port, in a background thread."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        client.app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1.0).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.mark.slow
def test_twenty_jobs_submitted_at_once_run_once_each_across_two_workers(
    faults_env: dict[str, str],
    client: TestClient,
    team_key: str,
    zoo: ZooPaths,
    start_worker: StartWorker,
    base_url: str,
    tmp_path: Path,
) -> None:
    workers = [start_worker(), start_worker()]
    training = upload_rows(client, team_key, zoo.poisoned_file("sentiment", 0.0), 12)
    for index, worker in enumerate(workers):
        _wait_until_ready(tmp_path / f"worker-{index}.log", worker)

    def submit(_: int) -> str:
        response = httpx.post(
            f"{base_url}/v1/fine_tuning/jobs",
            headers=_headers(team_key),
            json={
                "model": "tiny-chat",
                "training_file": training,
                "method": {"type": "asft", "asft": {"hyperparameters": SHORT_JOB}},
                "seed": SEED,
            },
            timeout=60,
        )
        assert response.status_code == 200, response.text
        return str(response.json()["id"])

    submitted = time.monotonic()
    with ThreadPoolExecutor(max_workers=20) as pool:
        job_ids = list(pool.map(submit, range(20)))
    assert len(set(job_ids)) == 20
    jobs = _wait_for_all(client, team_key, job_ids, timeout_s=240)
    elapsed_s = time.monotonic() - submitted
    print(f"20 jobs on 2 workers: {elapsed_s:.1f}s, {20 / elapsed_s * 60:.1f} jobs/min")

    trainers = []
    for job in jobs.values():
        assert job["status"] == "succeeded", job
        trainers.append(_assert_trained_once(client, team_key, job["id"])["worker"])
        adapter = client.get(
            f"/v1/fine_tuning/jobs/{job['id']}/adapter", headers=_headers(team_key)
        )
        assert adapter.status_code == 200
    assert len(set(trainers)) == 2  # both workers took jobs, each job trained by one
    assert set(_attempts(faults_env["ASFT_DATABASE_URL"]).values()) == {1}
    engine = make_engine(faults_env["ASFT_DATABASE_URL"])
    try:
        with engine.connect() as connection:
            adapters = dict(
                connection.execute(
                    select(FineTunedModel.job_id, func.count()).group_by(FineTunedModel.job_id)
                ).all()
            )
    finally:
        engine.dispose()
    assert adapters == {job_id: 1 for job_id in job_ids}
    assert all(worker.poll() is None for worker in workers)


def test_a_full_disk_is_recognised_however_the_writer_reports_it() -> None:
    for number in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        assert describe_failure(OSError(number, os.strerror(number))).code == "storage_full"
    # safetensors reports the OS error inside its own exception's text.
    rust = RuntimeError("Error while serializing: I/O error: File too large (os error 27)")
    failure = describe_failure(rust)
    assert failure.code == "storage_full"
    assert "no space left on the artifact volume" in failure.message
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as error:
            raise RuntimeError("checkpoint failed") from error
    except RuntimeError as wrapped:
        assert storage_full(wrapped)
    assert not storage_full(OSError(errno.ENOENT, "No such file or directory"))
    assert describe_failure(OSError(errno.EACCES, "Permission denied")).code == "internal_error"


def test_database_writes_wait_out_an_outage_then_give_up(tmp_path: Path) -> None:
    context = JobContext(
        Settings(_env_file=None, database_retry_s=1.5),
        make_engine("sqlite://"),
        ArtifactStore(tmp_path),
    )
    tries: list[float] = []

    @retry_database
    def write(context: JobContext, failures: int) -> str:
        tries.append(time.monotonic())
        if len(tries) <= failures:
            raise OperationalError("UPDATE jobs", {}, ConnectionRefusedError("server is down"))
        return "written"

    assert write(context, 2) == "written" and len(tries) == 3
    tries.clear()
    with pytest.raises(OperationalError):
        write(context, 100)
    # 0.25 + 0.5 s of waiting, and no try that would end after the 1.5 s deadline.
    assert len(tries) == 3 and tries[-1] - tries[0] < 1.5

    @retry_database
    def conflict(context: JobContext) -> None:
        tries.append(time.monotonic())
        raise IntegrityError("INSERT", {}, ValueError("duplicate key"))

    tries.clear()
    with pytest.raises(IntegrityError):
        conflict(context)
    assert len(tries) == 1  # not an outage: retrying would not help
