"""Worker fixtures: a real Celery worker process on the embedded broker and SQLite, and an
API app on the same settings, with the tiny zoo pair registered.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from asft_core.zoo import ZooPaths
from service.db.migrate import upgrade_head
from service.settings import Settings

ADMIN_KEY = "admin-worker-test"
REPO_ROOT = Path(__file__).resolve().parents[2]


def worker_environment(tmp_path: Path, cache_dir: Path) -> dict[str, str]:
    """The ASFT_* variables that the worker process and the in-test app share."""
    return {
        "ASFT_DATA_DIR": str(tmp_path / "data"),
        "ASFT_DATABASE_URL": f"sqlite:///{tmp_path / 'asft.db'}",
        "ASFT_CACHE_DIR": str(cache_dir),
        "ASFT_ADMIN_KEY": ADMIN_KEY,
        "ASFT_DEVICE": "cpu",
        "ASFT_EVAL_MAX_PROMPTS": "8",
        "ASFT_CHECKPOINT_EVERY_STEPS": "2",
        # Fast leases, so a killed worker's job is picked up within seconds.
        "ASFT_HEARTBEAT_INTERVAL_S": "1",
        "ASFT_STALE_AFTER_S": "5",
        "ASFT_WEBHOOK_ALLOWLIST": '["127.0.0.1"]',
        "ASFT_WEBHOOK_BACKOFF_S": "0.2",
    }


@pytest.fixture
def service_env(tmp_path: Path, cache_dir: Path) -> dict[str, str]:
    """Migrated database and the shared environment."""
    env = worker_environment(tmp_path, cache_dir / "service")
    upgrade_head(env["ASFT_DATABASE_URL"], tmp_path)
    return env


class StartWorker(Protocol):
    """The ``start_worker`` fixture: starts one worker process and returns it."""

    def __call__(self, file_size_limit_bytes: int | None = None) -> subprocess.Popen[bytes]:
        """``file_size_limit_bytes``: the worker's RLIMIT_FSIZE (a full artifact volume)."""
        ...


@pytest.fixture
def start_worker(service_env: dict[str, str], tmp_path: Path) -> Iterator[StartWorker]:
    """Start real Celery worker processes (in their own process group); all stopped at the end.

    Their logs are ``worker-<n>.log`` in the test's temp folder.
    """
    started: list[subprocess.Popen[bytes]] = []

    def start(file_size_limit_bytes: int | None = None) -> subprocess.Popen[bytes]:
        env = {**os.environ, **service_env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        log = (tmp_path / f"worker-{len(started)}.log").open("wb")

        def limit_file_size() -> None:
            # Runs in the child before exec: every write past the limit fails with EFBIG.
            if file_size_limit_bytes is not None:
                limit = (file_size_limit_bytes, file_size_limit_bytes)
                resource.setrlimit(resource.RLIMIT_FSIZE, limit)

        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker.celery_app",
                "worker",
                "--pool",
                "solo",
                "--concurrency",
                "1",
                "-Q",
                "gpu",
                "--loglevel",
                "INFO",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=limit_file_size if file_size_limit_bytes is not None else None,
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def settings_from(env: dict[str, str]) -> Settings:
    """The Settings the worker process reads from ``env``, built the same way here."""
    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("ASFT_")]:
            patch.delenv(name)
        for name, value in env.items():
            patch.setenv(name, value)
        return Settings(_env_file=None)


@pytest.fixture
def client(service_env: dict[str, str]) -> Iterator[TestClient]:
    """The API on the worker's settings."""
    with TestClient(create_app(settings_from(service_env))) as test_client:
        yield test_client


@pytest.fixture
def team_key(client: TestClient, zoo: ZooPaths) -> str:
    """A team's key, with the zoo pair registered as ``tiny-chat``."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    pair = {
        "id": "tiny-chat",
        "aligned_model": str(zoo.aligned),
        "base_model": str(zoo.base),
        "eval_suite": str(zoo.eval_suite),
    }
    assert client.post("/v1/models", json=pair, headers=admin).status_code == 200
    team = client.post("/v1/admin/teams", json={"name": "search"}, headers=admin).json()
    key: str = client.post(f"/v1/admin/teams/{team['id']}/keys", json={}, headers=admin).json()[
        "key"
    ]
    return key


def wait_for_job(
    client: TestClient, key: str, job_id: str, statuses: set[str], timeout_s: float = 240
) -> dict[str, Any]:
    """Poll a job until its status is one of ``statuses`` (fails after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = client.get(
            f"/v1/fine_tuning/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"}
        ).json()
        if job["status"] in statuses:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {job.get('status')} after {timeout_s}s: {job}")


def upload_rows(client: TestClient, key: str, path: Path, rows: int) -> str:
    """Upload the first ``rows`` lines of ``path`` as a fine-tune file; returns its id."""
    import io

    content = "".join(path.read_text().splitlines(keepends=True)[:rows]).encode()
    response = client.post(
        "/v1/files",
        headers={"Authorization": f"Bearer {key}"},
        files={"file": ("train.jsonl", io.BytesIO(content))},
        data={"purpose": "fine-tune"},
    )
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def create_job(
    client: TestClient,
    key: str,
    training_file: str,
    method: str = "asft",
    hyperparameters: dict[str, Any] | None = None,
    **fields: Any,
) -> str:
    """Create a job on the registered tiny pair through the API; returns its id."""
    response = client.post(
        "/v1/fine_tuning/jobs",
        headers={"Authorization": f"Bearer {key}"},
        json={
            "model": "tiny-chat",
            "training_file": training_file,
            "method": {"type": method, method: {"hyperparameters": hyperparameters or {}}},
            **fields,
        },
    )
    assert response.status_code == 200, response.text
    return str(response.json()["id"])
