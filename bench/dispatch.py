"""Dispatch latency of fine-tuning jobs: the Redis broker vs the embedded filesystem broker.

Dispatch is the time from the moment ``POST /v1/fine_tuning/jobs`` returns to the moment a
worker picks the job up. A worker's very first act with a job is the event "Picked up by worker
<host:pid>" (``worker.runner.execute_job``), so the bench polls the database directly (every
~2 ms, its own connection) for that event and timestamps it with its own monotonic clock.

Each broker gets a fresh folder: a migrated SQLite database, a real Celery worker process
(solo pool, queue ``gpu``) and the API app in-process (``TestClient``), all on the same
settings; Redis runs as a private ``redis-server`` on a free loopback port, never the shared one.
Jobs are created with ``auto_start: false``, so the worker only validates the files (about a
second) and stops in ``validated``; they are submitted one at a time, each after the previous
one is validated, so every job finds an idle worker. The first job of each broker warms up
connections and caches and is discarded. The two brokers run one after the other in one run.

Targets: p50 <= 100 ms with Redis, p50 <= 1 s with the embedded broker (it polls its folder
every 0.1 s). A job picked up before the POST returned counts as the first poll's time (~0).

    python bench/dispatch.py [--jobs 20] [--cache-dir var/cache]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import Engine, select

from api.main import create_app
from asft_core.zoo import ZooPaths, build_zoo
from service.db.migrate import upgrade_head
from service.db.models import Job, JobEvent
from service.db.session import make_engine
from service.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]
ADMIN_KEY = "admin-dispatch-bench"
MODEL_ID = "tiny-chat"
PICKUP_PREFIX = "Picked up by worker "
TRAINING_ROWS = 20
POLL_INTERVAL_S = 0.002
READY_TIMEOUT_S = 180.0
PICKUP_TIMEOUT_S = 30.0
VALIDATED_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class Broker:
    """One broker to measure: its name, its target p50 and whether it needs a Redis server."""

    name: str
    target_p50_ms: float
    uses_redis: bool


BROKERS = (
    Broker("redis", target_p50_ms=100.0, uses_redis=True),
    Broker("embedded", target_p50_ms=1000.0, uses_redis=False),
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def stop_process_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group of ``process``, then SIGKILL it if it lingers."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextmanager
def private_redis(folder: Path) -> Iterator[str]:
    """A throwaway ``redis-server`` on a free loopback port; yields its broker URL."""
    import redis

    executable = shutil.which("redis-server")
    if executable is None:
        raise SystemExit("redis-server is not on PATH: it is needed for the Redis broker")
    port = free_port()
    log = (folder / "redis.log").open("wb")
    command = [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    command += ["--appendonly", "no", "--dir", str(folder), "--daemonize", "no"]
    process = subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError as error:
                if process.poll() is not None or time.monotonic() > deadline:
                    log_name = folder / "redis.log"
                    raise RuntimeError(f"redis-server did not start; see {log_name}") from error
                time.sleep(0.05)
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_process_group(process)
        log.close()


def service_environment(folder: Path, cache_dir: Path, broker_url: str | None) -> dict[str, str]:
    """The ``ASFT_*`` variables that the worker and the in-process app share."""
    env = {
        "ASFT_DATA_DIR": str(folder / "data"),
        "ASFT_DATABASE_URL": f"sqlite:///{folder / 'asft.db'}",
        "ASFT_ADMIN_KEY": ADMIN_KEY,
        "ASFT_DEVICE": "cpu",
        "ASFT_CACHE_DIR": str(cache_dir),
    }
    if broker_url is not None:
        env["ASFT_BROKER_URL"] = broker_url
    return env


@contextmanager
def celery_worker(env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A real Celery worker process on ``env``, yielded once it logs that it is ready.

    Celery logs "ready" after the ``worker_ready`` signal, whose handler imports the ML stack,
    so a ready worker no longer pays for imports. Its process group is killed on exit.
    """
    # The caller's ASFT_* settings are not inherited: worker and app see exactly ``env``.
    inherited = {name: value for name, value in os.environ.items() if not name.startswith("ASFT_")}
    full_env = {**inherited, **env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker"]
    command += ["--pool", "solo", "--concurrency", "1", "-Q", "gpu", "--loglevel", "INFO"]
    command += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    log = log_path.open("wb")
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while " ready." not in log_path.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the Celery worker did not become ready:\n{tail}")
            time.sleep(0.1)
        yield process
    finally:
        stop_process_group(process)
        log.close()


def wait_for_pickup(engine: Engine, job_id: str) -> float:
    """Poll for the job's pickup event; returns the monotonic time at which it was seen."""
    query = (
        select(JobEvent.seq)
        .where(JobEvent.job_id == job_id, JobEvent.message.startswith(PICKUP_PREFIX))
        .order_by(JobEvent.seq)
        .limit(1)
    )
    deadline = time.monotonic() + PICKUP_TIMEOUT_S
    while True:
        # A fresh connection checkout per poll, so each read sees the latest commit.
        with engine.connect() as connection:
            found = connection.execute(query).first()
        seen_at = time.monotonic()
        if found is not None:
            return seen_at
        if seen_at > deadline:
            raise RuntimeError(f"no worker picked up {job_id} within {PICKUP_TIMEOUT_S:.0f}s")
        time.sleep(POLL_INTERVAL_S)


def wait_for_validated(engine: Engine, job_id: str) -> None:
    """Wait until the worker has validated the job (fails on any other final status)."""
    query = select(Job.status, Job.error_code, Job.error_message).where(Job.id == job_id)
    deadline = time.monotonic() + VALIDATED_TIMEOUT_S
    while time.monotonic() < deadline:
        with engine.connect() as connection:
            row = connection.execute(query).one()
        if row.status == "validated":
            return
        if row.status in ("failed", "cancelled", "succeeded"):
            raise RuntimeError(
                f"job {job_id} ended {row.status}: {row.error_code} {row.error_message}"
            )
        time.sleep(0.02)
    raise RuntimeError(f"job {job_id} was not validated within {VALIDATED_TIMEOUT_S:.0f}s")


def prepare_team(client: TestClient, zoo: ZooPaths) -> tuple[dict[str, str], str]:
    """Register the zoo pair, create a team and its key, upload the training file.

    Returns the team's auth headers and the uploaded file's id.
    """
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    pair = {"id": MODEL_ID, "aligned_model": str(zoo.aligned), "base_model": str(zoo.base)}
    response = client.post("/v1/models", json=pair, headers=admin)
    response.raise_for_status()
    team = client.post("/v1/admin/teams", json={"name": "bench"}, headers=admin)
    team.raise_for_status()
    key = client.post(f"/v1/admin/teams/{team.json()['id']}/keys", json={}, headers=admin)
    key.raise_for_status()
    headers = {"Authorization": f"Bearer {key.json()['key']}"}
    lines = zoo.poisoned_file("sentiment", 0.0).read_text().splitlines(keepends=True)
    upload = client.post(
        "/v1/files",
        headers=headers,
        files={"file": ("train.jsonl", io.BytesIO("".join(lines[:TRAINING_ROWS]).encode()))},
        data={"purpose": "fine-tune"},
    )
    upload.raise_for_status()
    return headers, str(upload.json()["id"])


def measure_dispatch(
    zoo: ZooPaths, cache_dir: Path, folder: Path, broker_url: str | None, jobs: int
) -> list[float]:
    """Dispatch latencies in ms of ``jobs`` jobs on one broker, the warm-up job included."""
    env = service_environment(folder, cache_dir, broker_url)
    upgrade_head(env["ASFT_DATABASE_URL"], folder)
    settings = Settings(
        _env_file=None,
        data_dir=Path(env["ASFT_DATA_DIR"]),
        database_url=env["ASFT_DATABASE_URL"],
        broker_url=broker_url,
        cache_dir=cache_dir,
        admin_key=ADMIN_KEY,
        device="cpu",
        # Validated jobs hold no slot, but keep the team limit out of the way regardless.
        max_active_jobs_per_team=jobs + 10,
    )
    engine = make_engine(env["ASFT_DATABASE_URL"])
    latencies_ms: list[float] = []
    try:
        with (
            TestClient(create_app(settings)) as client,
            celery_worker(env, folder / "worker.log"),
        ):
            headers, training_file = prepare_team(client, zoo)
            body = {
                "model": MODEL_ID,
                "training_file": training_file,
                "method": {"type": "supervised"},
                "auto_start": False,
            }
            for _ in range(jobs):
                response = client.post("/v1/fine_tuning/jobs", json=body, headers=headers)
                returned_at = time.monotonic()
                response.raise_for_status()
                job_id = str(response.json()["id"])
                latencies_ms.append((wait_for_pickup(engine, job_id) - returned_at) * 1000)
                wait_for_validated(engine, job_id)
    finally:
        engine.dispose()
    return latencies_ms


def percentile(values: list[float], share: float) -> float:
    """The ``share`` quantile (0..1) of ``values``, linearly interpolated between ranks."""
    ordered = sorted(values)
    position = share * (len(ordered) - 1)
    below = int(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


def main() -> None:
    """Measure both brokers and print the table and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=20, help="jobs per broker, warm-up included")
    parser.add_argument("--cache-dir", type=Path, default=Path("var/cache"))
    args = parser.parse_args()
    if args.jobs < 3:
        parser.error("--jobs must be at least 3 (the first one is a warm-up)")
    # The in-process app must see exactly the settings the worker gets, nothing inherited.
    for name in [name for name in os.environ if name.startswith("ASFT_")]:
        del os.environ[name]

    cache_dir = args.cache_dir.resolve()
    zoo = build_zoo(cache_dir / "zoo")
    results: dict[str, list[float]] = {}
    for broker in BROKERS:
        with tempfile.TemporaryDirectory(prefix=f"asft-dispatch-{broker.name}-") as temp:
            folder = Path(temp)
            if broker.uses_redis:
                with private_redis(folder) as broker_url:
                    latencies = measure_dispatch(zoo, cache_dir, folder, broker_url, args.jobs)
            else:
                latencies = measure_dispatch(zoo, cache_dir, folder, None, args.jobs)
        results[broker.name] = latencies[1:]  # the first job is the warm-up

    print(f"cpus={os.cpu_count()} jobs per broker={args.jobs} (first discarded as warm-up)")
    print(f"{'broker':<10}{'n':>4}{'p50 ms':>10}{'p95 ms':>10}{'max ms':>10}  target       met")
    for broker in BROKERS:
        values = results[broker.name]
        p50, p95 = percentile(values, 0.5), percentile(values, 0.95)
        target = f"p50<={broker.target_p50_ms:.0f}ms"
        met = "yes" if p50 <= broker.target_p50_ms else "no"
        print(
            f"{broker.name:<10}{len(values):>4}{p50:>10.1f}{p95:>10.1f}{max(values):>10.1f}"
            f"  {target:<13}{met}"
        )
    redis_p50 = percentile(results["redis"], 0.5)
    embedded_p50 = percentile(results["embedded"], 0.5)
    print(f"ratio embedded p50 / redis p50: {embedded_p50 / max(redis_p50, 1e-3):.1f}x")


if __name__ == "__main__":
    main()
