"""The chaos soak: on a PostgreSQL cluster and a Redis server of its own with two workers,
jobs are submitted over HTTP while a driver kills a random component every few seconds (a
worker with SIGKILL, the API with SIGKILL, Redis and PostgreSQL restarted); a planted poison
job's worker is killed each time it runs. At the end every other job succeeded, the poison
job failed with worker_lost, each step was recorded once, every adapter's checksum matches
its archive and no temporary file is left.

A reduced run is part of ``make test``; ``make chaos`` runs the full one (50 jobs). Loopback
only, bounded in kills and time: it stops by itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from asft_core.zoo import ZooPaths
from service.db.migrate import upgrade_head
from service.db.models import FineTunedModel, Job
from service.db.session import make_engine
from tests.conftest import REPO_ROOT, PrivatePostgres, PrivateRedis, free_port
from tests.worker.conftest import StartWorker, settings_from, upload_rows

JOBS = int(os.environ.get("ASFT_CHAOS_JOBS", "10"))
KILLS = int(os.environ.get("ASFT_CHAOS_KILLS", "6"))
KILL_EVERY_S = float(os.environ.get("ASFT_CHAOS_EVERY_S", "4"))
CHAOS_SEED = int(os.environ.get("ASFT_CHAOS_SEED", "7"))
# Where the figures go as JSON (make chaos), besides the test's output.
REPORT = os.environ.get("ASFT_CHAOS_REPORT")
LIMIT_S = 240 + 30 * JOBS  # the whole soak, kills and the last jobs included
MAX_LOSSES = 3
SEED = 1234  # the same adapter every run, so the safety gate's verdict does not vary
SHORT_JOB = {"n_epochs": 1, "batch_size": 4}  # on 12 rows: 3 steps
COMPONENTS = ("worker", "api", "redis", "postgresql")
TERMINAL = {"succeeded", "failed", "cancelled"}


@dataclass
class Api:
    """``asft api`` in a process of its own, which the driver kills and starts again."""

    env: dict[str, str]
    log: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Where it answers."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start it and wait until /healthz answers."""
        command = [sys.executable, "-m", "asft.cli", "api", "--host", "127.0.0.1"]
        self.process = subprocess.Popen(
            [*command, "--port", str(self.port)],
            cwd=REPO_ROOT,
            env=self.env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _wait(lambda: _answers(f"{self.url}/healthz"), 60, "the API to answer")

    def kill(self) -> None:
        """SIGKILL, as the OOM killer would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _wait(ready: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.2)


@dataclass
class Soak:
    """The components under the driver and what it did to them."""

    env: dict[str, str]
    api: Api
    redis: PrivateRedis
    postgres: PrivatePostgres
    start_worker: StartWorker
    rng: random.Random
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    kills: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def kill(self, component: str) -> None:
        """Kill or restart one component, then bring it back as a supervisor would."""
        with self.lock:
            if component == "worker":
                self._kill_worker(self.rng.choice(self.workers))
            elif component == "api":
                self.api.kill()
                self.api.start()
            elif component == "redis":
                self.redis.stop()  # no persistence: every queued message is gone
                self.redis.start()
            else:
                self.postgres.stop()
                time.sleep(1.0)
                self.postgres.start()
            self.kills[component] += 1

    def kill_worker_running(self, job_id: str) -> bool:
        """SIGKILL the worker that holds ``job_id``'s lease, if one of ours does."""
        engine = make_engine(self.env["ASFT_DATABASE_URL"])
        try:
            with engine.connect() as connection:
                row = connection.execute(
                    select(Job.status, Job.lease_owner).where(Job.id == job_id)
                ).one()
        except Exception:  # PostgreSQL may be restarting: next time
            return False
        finally:
            engine.dispose()
        if row.status != "running" or not row.lease_owner:
            return False
        pid = int(row.lease_owner.rsplit(":", 1)[1])
        with self.lock:
            for worker in self.workers:
                if worker.pid == pid and worker.poll() is None:
                    self._kill_worker(worker)
                    self.kills["worker (poison job)"] += 1
                    return True
        return False

    def _kill_worker(self, worker: subprocess.Popen[bytes]) -> None:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
        self.workers[self.workers.index(worker)] = self.start_worker()

    def replace_dead_workers(self) -> int:
        """Start a worker for each that died by itself (none should); returns how many."""
        with self.lock:
            dead = [w for w in self.workers if w.poll() is not None]
            for worker in dead:
                self.workers[self.workers.index(worker)] = self.start_worker()
            return len(dead)


@pytest.fixture
def soak(
    service_env: dict[str, str],
    private_postgres: PrivatePostgres,
    private_redis_server: PrivateRedis,
    start_worker: StartWorker,
    tmp_path: Path,
) -> Iterator[Soak]:
    """The shared environment on the soak's own PostgreSQL and Redis, the API started."""
    upgrade_head(private_postgres.url, tmp_path)
    service_env.update(
        ASFT_DATABASE_URL=private_postgres.url,
        ASFT_BROKER_URL=private_redis_server.url,
        ASFT_EVAL_MAX_PROMPTS="2",
        ASFT_MAX_ACTIVE_JOBS_PER_TEAM=str(JOBS + 10),
        ASFT_RATE_LIMIT_PER_MINUTE="0",
        ASFT_MAX_WORKER_LOSSES=str(MAX_LOSSES),
        ASFT_LOG_LEVEL="WARNING",
    )
    api_env = {**os.environ, **service_env, "OMP_NUM_THREADS": "1"}
    api = Api(api_env, tmp_path / "api.log")
    api.start()
    soak = Soak(
        service_env,
        api,
        private_redis_server,
        private_postgres,
        start_worker,
        random.Random(CHAOS_SEED),
    )
    try:
        yield soak
    finally:
        api.kill()


def _submit(url: str, key: str, index: int, training: str, deadline: float) -> str:
    """Create a job, retried through outages under one idempotency key; returns its id."""
    body = {
        "model": "tiny-chat",
        "training_file": training,
        "method": {"type": "asft", "asft": {"hyperparameters": SHORT_JOB}},
        "seed": SEED,
    }
    headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": f"chaos-{index}"}
    while time.monotonic() < deadline:
        try:
            response = httpx.post(f"{url}/v1/fine_tuning/jobs", json=body, headers=headers)
        except httpx.HTTPError:
            time.sleep(0.5)
            continue
        if response.status_code == 200:
            return str(response.json()["id"])
        # Only an outage may refuse it (the database restarting), never the request itself.
        assert response.status_code == 503, response.text
        time.sleep(0.5)
    raise AssertionError(f"job {index} could not be submitted")


def _jobs(client: TestClient, key: str, ids: set[str]) -> dict[str, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {key}"}
    page = client.get(f"/v1/fine_tuning/jobs?limit={len(ids) + 10}", headers=headers)
    if page.status_code != 200:  # the database restarting
        return {}
    return {job["id"]: job for job in page.json()["data"] if job["id"] in ids}


@pytest.mark.slow
@pytest.mark.timeout(LIMIT_S + 120)
def test_jobs_survive_random_kills_of_every_component(
    soak: Soak,
    client: TestClient,
    team_key: str,
    zoo: ZooPaths,
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    deadline = started + LIMIT_S
    short = upload_rows(client, team_key, zoo.poisoned_file("sentiment", 0.0), 12)
    long = upload_rows(client, team_key, zoo.task_file("sentiment", "train"), 400)
    headers = {"Authorization": f"Bearer {team_key}"}
    poison_body = {
        "model": "tiny-chat",
        "training_file": long,
        "method": {"type": "supervised", "supervised": {"hyperparameters": SHORT_JOB}},
    }
    poison = client.post("/v1/fine_tuning/jobs", json=poison_body, headers=headers).json()["id"]
    soak.workers.extend([soak.start_worker(), soak.start_worker()])

    job_ids: list[str] = []

    def submit_all() -> None:
        for index in range(JOBS):
            job_ids.append(_submit(soak.api.url, team_key, index, short, deadline))

    # A daemon: a failing test does not wait for it to give up.
    submitter = threading.Thread(target=submit_all, daemon=True)
    submitter.start()
    # Kills start once the first job has succeeded: the pair's direction is cached by then.
    _wait(
        lambda: any(
            j["status"] == "succeeded" for j in _jobs(client, team_key, set(job_ids)).values()
        ),
        180,
        "a first job to succeed",
    )
    died_by_themselves = 0
    next_kill = time.monotonic()
    while time.monotonic() < deadline:
        soak.kill_worker_running(poison)
        died_by_themselves += soak.replace_dead_workers()
        if sum(v for k, v in soak.kills.items() if k in COMPONENTS) < KILLS:
            if time.monotonic() >= next_kill:
                soak.kill(soak.rng.choice(COMPONENTS))
                next_kill = time.monotonic() + KILL_EVERY_S * soak.rng.uniform(0.5, 1.5)
        elif not submitter.is_alive():
            jobs = _jobs(client, team_key, {*job_ids, poison})
            if len(jobs) == JOBS + 1 and all(j["status"] in TERMINAL for j in jobs.values()):
                break
        time.sleep(0.3)
    submitter.join(timeout=5)
    elapsed_s = time.monotonic() - started

    jobs = _jobs(client, team_key, {*job_ids, poison})
    unfinished = {i: j["status"] for i, j in jobs.items() if j["status"] not in TERMINAL}
    assert len(job_ids) == JOBS and not unfinished, unfinished
    figures = {
        "jobs": JOBS,
        "poison_jobs": 1,
        "kills": dict(soak.kills),
        "workers_that_died_by_themselves": died_by_themselves,
        "duration_s": round(elapsed_s, 1),
        "succeeded": sum(jobs[i]["status"] == "succeeded" for i in job_ids),
        "lost": [i for i in job_ids if jobs[i]["status"] != "succeeded"],
    }
    print("chaos soak:", json.dumps(figures))
    if REPORT:
        Path(REPORT).write_text(json.dumps(figures, indent=1))

    assert jobs[poison]["status"] == "failed", jobs[poison]
    assert jobs[poison]["error"]["code"] == "worker_lost", jobs[poison]
    assert figures["lost"] == [], {i: jobs[i] for i in figures["lost"]}
    assert died_by_themselves == 0
    database = make_engine(soak.env["ASFT_DATABASE_URL"])
    with database.connect() as connection:
        rows = connection.execute(select(FineTunedModel.job_id, FineTunedModel.sha256)).all()
        checksums = {job_id: sha256 for job_id, sha256 in rows}
    database.dispose()
    for job_id in job_ids:
        events = client.get(
            f"/v1/fine_tuning/jobs/{job_id}/events?limit=1000", headers=headers
        ).json()["data"]
        steps = sorted(e["data"]["step"] for e in events if e["type"] == "metrics")
        total = next(e["data"]["total_steps"] for e in events if e["type"] == "metrics")
        assert steps == list(range(1, total + 1)), (job_id, steps)  # each step once
        adapter = client.get(f"/v1/fine_tuning/jobs/{job_id}/adapter", headers=headers)
        assert adapter.status_code == 200, adapter.text
        digest = hashlib.sha256(adapter.content).hexdigest()
        assert digest == adapter.headers["X-Content-SHA256"] == checksums[job_id], job_id
    artifacts = settings_from(soak.env).resolved_artifact_dir
    assert [p.relative_to(artifacts).as_posix() for p in artifacts.rglob(".*")] == []
