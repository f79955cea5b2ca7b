"""HTTP load on the API while the polled jobs are being trained, with a bare app for reference.

A writer thread (its own SQLAlchemy engine) trains ``--training-jobs`` running jobs with the
worker's own write, ``worker.persistence.sync_job``: every ``--step-s`` seconds per job it
upserts the step's metrics event (keyed job, type, step) and updates the job's
``trained_tokens``, ``estimated_finish`` and ``heartbeat_at`` (a worker batches a job's steps
into one such write every ``ASFT_METRICS_INTERVAL_S``; one per step is the heavier case).
``wrk`` (with ``bench/api_load.lua``) spreads its requests over those jobs, at each connection
count, for these rows:

- ``get_job`` and ``list_events`` (``GET /v1/fine_tuning/jobs/{id}`` and its events page),
  each ``plain`` and ``if-none-match``: the latter sends, per job, the ``ETag`` of the last
  200 it got, so answers mix 200s (the job changed) and bodiless 304s (it did not);
- ``list_jobs``: the first page of the team's jobs (plain: it has no ``ETag``);
- ``bare``: ``bench/bare_app.py``, a constant job-sized JSON, on the same uvicorn command line.

Both servers run with 2 uvicorn workers; the API on a fresh, migrated PostgreSQL database.
Each row shows requests/s, p50 and p99, the share of 304s, the CPU that the uvicorn processes
and the API's PostgreSQL backends spent per request (from /proc), and ``jobs@1Hz/proc`` =
1 / (uvicorn CPU seconds per poll): the jobs, each polled once a second, that one API process
could serve on one core. With ``--rounds`` > 1 the rows are measured that many times,
interleaved, and the round with the median requests/s is shown.

Targets: ``get_job`` p99 <= 50 ms at 64 connections (both modes), and no answer other than 2xx
or 304 (else the script exits 1).

    python bench/api_load.py [--duration 10] [--rounds 3] [--training-jobs 16] [--step-s 0.5]

Needs ``wrk`` (Debian/Ubuntu: ``apt-get install -y wrk``) and PostgreSQL at ``--pg-server``
(the backends' CPU is read only when it runs on this host; elsewhere that column shows ``-``).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from api.schemas.jobs import JobCreate, job_spec
from asft_core.training import StepMetrics
from service.db.migrate import upgrade_head
from service.db.models import ApiKey, File, Job, JobEvent, ModelPair, Team, new_id, now
from service.db.session import make_engine, transaction
from service.settings import Settings
from service.storage import ArtifactStore
from service.teams import create_team_with_key
from worker.persistence import JobContext, sync_job

REPO_ROOT = Path(__file__).resolve().parents[1]
LUA_SCRIPT = Path(__file__).resolve().with_name("api_load.lua")
DEFAULT_PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"
MODEL_ID = "bench-chat"
WORKERS = 2
WRK_THREADS = 2
WARMUP_S = 2
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
TARGET_ENDPOINT = "get_job"
TARGET_P99_CONNECTIONS = 64
TARGET_P99_MS = 50.0
# Statuses the history jobs cycle through: finished jobs dominate a real team's list.
HISTORY_STATUSES = ("succeeded", "succeeded", "failed", "cancelled", "queued")
# Far enough that no training job reaches its last step during a run.
TOTAL_STEPS = 100_000
TOKENS_PER_STEP = 4096
# The writer's connections carry this name, so their CPU is not counted as the API's.
WRITER_APPLICATION = "asft-bench-writer"
JOB_PATH = "/v1/fine_tuning/jobs/{job}"


@dataclass(frozen=True)
class Row:
    """A measured row: its name, the path polled (``{job}``: each training job in turn), the
    server (the API or the bare app) and whether the client sends ``If-None-Match``."""

    name: str
    path: str
    is_api: bool
    conditional: bool = False

    @property
    def mode(self) -> str:
        """``plain`` or ``if-none-match``."""
        return "if-none-match" if self.conditional else "plain"

    def paths(self, job_ids: tuple[str, ...]) -> list[str]:
        """The paths wrk polls in turn: one per job, or one in all if the path names none."""
        return list(dict.fromkeys(self.path.format(job=job_id) for job_id in job_ids))


ROWS = (
    Row("bare", JOB_PATH, is_api=False),
    Row("get_job", JOB_PATH, is_api=True),
    Row("get_job", JOB_PATH, is_api=True, conditional=True),
    Row("list_events", JOB_PATH + "/events", is_api=True),
    Row("list_events", JOB_PATH + "/events", is_api=True, conditional=True),
    Row("list_jobs", "/v1/fine_tuning/jobs", is_api=True),
)


@dataclass(frozen=True)
class WrkResult:
    """What one wrk run reports, and the CPU the server side spent per request."""

    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    answers_304: int
    answers_other: int
    """Answers neither 2xx nor 304, counted by the lua script (wrk counts only >= 400)."""
    socket_errors: int
    server_cpu_ms: float | None = None
    """CPU of the uvicorn processes per request (None where /proc is missing)."""
    database_cpu_ms: float | None = None
    """CPU of the API's PostgreSQL backends per request (None where they are not visible)."""


@dataclass(frozen=True)
class Server:
    """A running uvicorn server: its base URL, the supervisor's pid and its log file."""

    base_url: str
    pid: int
    log_path: Path


@dataclass(frozen=True)
class Seeded:
    """The bench team's secret key, its id (for the rate-limit exemption) and the ids of the
    jobs the writer trains and wrk polls."""

    key: str
    key_id: str
    training_job_ids: tuple[str, ...]


@dataclass
class WriterProgress:
    """What the training writer did: the steps it wrote, since when, and the error that
    stopped it, if one did."""

    steps: int = 0
    started_s: float = field(default_factory=time.monotonic)
    stopped_s: float | None = None
    error: BaseException | None = None

    def steps_per_s(self) -> float:
        """Steps written per second over the writer's run so far."""
        elapsed_s = (self.stopped_s or time.monotonic()) - self.started_s
        return self.steps / elapsed_s if elapsed_s > 0 else 0.0


def require_wrk() -> str:
    """The path of ``wrk``, or exit saying how to install it."""
    executable = shutil.which("wrk")
    if executable is None:
        raise SystemExit(
            "wrk is not on PATH; install it (Debian/Ubuntu: apt-get install -y wrk) and rerun"
        )
    return executable


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def psycopg_url(sqlalchemy_url: str) -> str:
    """A ``postgresql+psycopg://`` URL as psycopg itself takes it."""
    return sqlalchemy_url.replace("postgresql+psycopg://", "postgresql://")


@contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """A new, empty PostgreSQL database on ``server_url``; yields its URL, drops it at the end."""
    import psycopg

    plain = psycopg_url(server_url)
    name = f"asft_bench_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(f"{plain}/postgres", autocommit=True, connect_timeout=3) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as error:
        raise SystemExit(f"PostgreSQL at {server_url} is not reachable: {error}") from error
    try:
        yield f"{server_url}/{name}"
    finally:
        with psycopg.connect(f"{plain}/postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def metrics_data(step: int) -> dict[str, float | int]:
    """A metrics event's data as the worker writes it (``sync_job``), made-up values."""
    loss = 2.0 / (1 + step / 10)
    return {
        "step": step,
        "total_steps": TOTAL_STEPS,
        "train_loss": loss,
        "penalty": 1e-4 * step,
        "loss": loss + 1e-4 * step,
        "learning_rate": 5e-5,
        "tokens_per_s": 2048.0,
        "trained_tokens": TOKENS_PER_STEP * step,
    }


def metrics_message(step: int) -> str:
    """A metrics event's message, worded as the worker words it."""
    data = metrics_data(step)
    loss, penalty = data["train_loss"], data["penalty"]
    return f"Step {step}/{TOTAL_STEPS}: loss={loss:.4f}, penalty={penalty:.3e}"


def seed(database_url: str, jobs: int, training_jobs: int, events: int, step_s: float) -> Seeded:
    """Write the bench team (key, file, ``training_jobs`` running jobs with ``events`` metrics
    events each, and ``jobs`` jobs of history) and a second team with as much history, so team
    filters have rows to skip; then analyze, as autovacuum would."""
    engine = make_engine(database_url)
    # The method column exactly as the API writes it for a job created with the defaults.
    method = job_spec(JobCreate(model=MODEL_ID, training_file="file-bench")).to_json()
    started = now() - 10 * jobs
    try:
        with transaction(engine) as session:
            session.add(ModelPair(id=MODEL_ID, aligned_model="bench/chat", base_model="bench/base"))
            bench_team, secret = create_team_with_key(session, "bench")
            other_team, _ = create_team_with_key(session, "bench-other")
            key_id = session.scalar(select(ApiKey.id).where(ApiKey.team_id == bench_team.id))
            assert key_id is not None
            files = {team.id: _training_file(team) for team in (bench_team, other_team)}
            session.add_all(files.values())
            for team in (bench_team, other_team):
                for index in range(jobs):
                    job = _history_job(team, files[team.id], method, index, started + 10 * index)
                    _add_with_message_events(session, job)
            training = [
                _training_job(bench_team, files[bench_team.id], method, index, events, step_s)
                for index in range(training_jobs)
            ]
            for job in training:
                _add_with_message_events(session, job)
            session.flush()
            session.add_all(
                JobEvent(
                    job_id=job.id,
                    level="info",
                    type="metrics",
                    message=metrics_message(step),
                    data=metrics_data(step),
                    step=step,
                )
                for job in training
                for step in range(1, events + 1)
            )
        # A live database has statistics (autovacuum analyzes); without them the planner
        # guesses one row per table and may pick other indexes than in production.
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.exec_driver_sql("ANALYZE")
    finally:
        engine.dispose()
    return Seeded(key=secret, key_id=key_id, training_job_ids=tuple(job.id for job in training))


def _training_file(team: Team) -> File:
    """The training file that ``team``'s jobs name."""
    return File(
        id=new_id("file"),
        team_id=team.id,
        filename="train.jsonl",
        purpose="fine-tune",
        bytes=123_456,
        sha256="0" * 64,
        storage_key=f"files/{team.id}/train.jsonl",
        row_format="chat",
        num_examples=200,
    )


def _add_with_message_events(session: Session, job: Job) -> None:
    """Add ``job`` and the message events every job gets on its way to the queue."""
    session.add(job)
    for message in ("Created fine-tuning job", "Files validated", "Job queued"):
        session.add(JobEvent(job_id=job.id, level="info", message=message))


def _history_job(
    team: Team, file: File, method: dict[str, object], index: int, created_at: int
) -> Job:
    """The ``index``-th job of ``team``'s history: statuses cycle, so every page mixes them."""
    status = HISTORY_STATUSES[index % len(HISTORY_STATUSES)]
    finished = status in ("succeeded", "failed", "cancelled")
    return Job(
        id=new_id("ftjob"),
        team_id=team.id,
        model=MODEL_ID,
        training_file=file.id,
        status=status,
        method=method,
        validation={"training_examples": 200, "validation_examples": None, "warnings": []},
        seed=index,
        metadata_={"bench": "api_load", "index": str(index)},
        trained_tokens=TOKENS_PER_STEP * 75 if finished else None,
        fine_tuned_model=f"ft:{MODEL_ID}:{team.name}:{index}" if status == "succeeded" else None,
        error_code="out_of_memory" if status == "failed" else None,
        error_message="CUDA out of memory" if status == "failed" else None,
        created_at=created_at,
        finished_at=created_at + 5 if finished else None,
    )


def _training_job(
    team: Team, file: File, method: dict[str, object], index: int, steps_done: int, step_s: float
) -> Job:
    """A running job, ``steps_done`` steps in, leased by the bench's writer."""
    started_at = now() - math.ceil(steps_done * step_s)
    return Job(
        id=new_id("ftjob"),
        team_id=team.id,
        model=MODEL_ID,
        training_file=file.id,
        status="running",
        method=method,
        validation={"training_examples": 200, "validation_examples": None, "warnings": []},
        seed=index,
        metadata_={"bench": "api_load", "training": str(index)},
        trained_tokens=TOKENS_PER_STEP * steps_done,
        estimated_finish=now() + math.ceil((TOTAL_STEPS - steps_done) * step_s),
        attempt=1,
        lease_owner=WRITER_APPLICATION,
        heartbeat_at=now(),
        created_at=started_at - 5,
        started_at=started_at,
    )


def step_metrics(step: int, step_s: float) -> StepMetrics:
    """What a trainer reports after ``step`` (made-up losses, the bench's token count)."""
    data = metrics_data(step)
    return StepMetrics(
        step=step,
        total_steps=TOTAL_STEPS,
        epoch=0,
        train_loss=data["train_loss"],
        penalty=data["penalty"],
        loss=data["loss"],
        learning_rate=data["learning_rate"],
        tokens=TOKENS_PER_STEP,
        trained_tokens=TOKENS_PER_STEP * step,
        tokens_per_s=data["tokens_per_s"],
        elapsed_s=step * step_s,
        eta_s=(TOTAL_STEPS - step) * step_s,
    )


def write_steps(
    engine: Engine,
    job_ids: tuple[str, ...],
    first_step: int,
    step_s: float,
    stop: threading.Event,
    progress: WriterProgress,
) -> None:
    """Until ``stop``, give every job one step per ``step_s`` seconds, one transaction each.

    The jobs take turns at even intervals (``step_s / len(job_ids)``), as independent trainers
    would spread out, rather than all updating at once.
    """
    store = ArtifactStore(Path(tempfile.gettempdir()))  # sync_job writes no artifact
    context = JobContext(Settings(_env_file=None), engine, store)
    interval_s = step_s / len(job_ids)
    due_s = time.monotonic()
    turn = 0
    try:
        while not stop.wait(max(0.0, due_s - time.monotonic())):
            step = first_step + turn // len(job_ids)
            # The worker's own write (one job's steps, progress and lease in one transaction).
            sync_job(context, job_ids[turn % len(job_ids)], [step_metrics(step, step_s)])
            progress.steps += 1
            turn += 1
            # Behind by more than a whole step (a starved CPU): resume the pace from now on,
            # instead of catching up in a burst that no real set of trainers would make.
            due_s = max(due_s + interval_s, time.monotonic() - step_s)
    except BaseException as error:  # reported by training_writer, in the main thread
        progress.error = error
    finally:
        progress.stopped_s = time.monotonic()


@contextmanager
def training_writer(
    database_url: str, job_ids: tuple[str, ...], first_step: int, step_s: float
) -> Iterator[WriterProgress]:
    """Train ``job_ids`` from ``first_step`` on, from a thread with its own engine, until the
    block ends; raises the writer's error, if it had one."""
    separator = "&" if "?" in database_url else "?"
    engine = make_engine(f"{database_url}{separator}application_name={WRITER_APPLICATION}")
    stop = threading.Event()
    progress = WriterProgress()
    thread = threading.Thread(
        target=write_steps,
        args=(engine, job_ids, first_step, step_s, stop, progress),
        name="training-writer",
    )
    thread.start()
    try:
        yield progress
    finally:
        stop.set()
        thread.join()
        engine.dispose()
    if progress.error is not None:
        raise RuntimeError("the training writer failed") from progress.error


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


def uvicorn_command(factory: str, port: int) -> list[str]:
    """The uvicorn command line, identical for the API and the bare app but for ``factory``."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        factory,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(WORKERS),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--log-level",
        "warning",
        "--no-access-log",
    ]


@contextmanager
def uvicorn_server(
    factory: str, env: dict[str, str], ready_path: str, headers: dict[str, str], log_path: Path
) -> Iterator[Server]:
    """A uvicorn server of ``factory`` on a free port, yielded once ``ready_path`` answers 200.
    Its process group (supervisor and workers) is stopped on exit."""
    port = free_port()
    log = log_path.open("wb")
    process = subprocess.Popen(
        uvicorn_command(factory, port),
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                if httpx.get(base_url + ready_path, headers=headers, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{factory} did not answer 200 on {ready_path}:\n{tail}")
            time.sleep(0.2)
        yield Server(base_url=base_url, pid=process.pid, log_path=log_path)
    finally:
        stop_process_group(process)
        log.close()


_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def _latency_ms(text: str) -> float:
    """``1.23ms``, ``870.00us`` or ``1.02s`` (wrk's formats) in milliseconds."""
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if match is None:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(match[1]) * _UNIT_MS[match[2]]


def parse_wrk(output: str) -> WrkResult:
    """The figures of a ``wrk --latency`` report and of the lua script's ``answers:`` line.
    wrk prints its socket-error line only when it is not zero."""
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.MULTILINE)
    total = re.search(r"^\s+(\d+) requests in ", output, re.MULTILINE)
    answers = re.search(r"^answers: 2xx=(\d+) 304=(\d+) other=(\d+)", output, re.MULTILINE)
    if rate is None or p50 is None or p99 is None or total is None or answers is None:
        raise ValueError(f"could not read wrk's report:\n{output}")
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    return WrkResult(
        requests_per_s=float(rate[1]),
        p50_ms=_latency_ms(p50[1]),
        p99_ms=_latency_ms(p99[1]),
        requests=int(total[1]),
        answers_304=int(answers[2]),
        answers_other=int(answers[3]),
        socket_errors=sum(int(count) for count in errors.groups()) if errors else 0,
    )


_CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (raises FileNotFoundError once it has ended)."""
    # Fields after the parenthesised name: utime and stime are the 12th and 13th.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS_PER_S


def process_tree_cpu_s(pid: int) -> float | None:
    """CPU seconds of ``pid`` and its living descendants, from /proc (Linux); None where /proc
    is missing. uvicorn's workers are children of its supervisor."""
    if not Path(f"/proc/{pid}/stat").exists():
        return None
    total, pending = 0.0, [pid]
    while pending:
        current = pending.pop()
        try:
            total += _process_cpu_s(current)
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue  # it ended meanwhile
    return total


def database_backends_cpu_s(database_url: str) -> dict[int, float] | None:
    """CPU seconds of each client backend on ``database_url``'s database but the writer's,
    by pid; None when they are not processes of this host (PostgreSQL elsewhere, or /proc
    hidden), since a pid of another host may name an unrelated process here."""
    import psycopg

    with psycopg.connect(psycopg_url(database_url), connect_timeout=3) as connection:
        pids = [
            pid
            for (pid,) in connection.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                " AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
                " AND application_name <> %s",
                (WRITER_APPLICATION,),
            )
        ]
    cpu_s: dict[int, float] = {}
    for pid in pids:
        try:
            if not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"postgres"):
                return None
            cpu_s[pid] = _process_cpu_s(pid)
        except FileNotFoundError:
            continue  # it ended meanwhile (or is another host's: then all of them are missing)
        except PermissionError:
            return None
    return cpu_s if cpu_s or not pids else None


def _backends_delta_s(
    before: dict[int, float] | None, after: dict[int, float] | None
) -> float | None:
    """The CPU the backends spent between two readings. One opened in between counts in full
    and one closed in between is lost; the API's connection pools keep theirs, so few are."""
    if before is None or after is None:
        return None
    return sum(cpu_s - before.get(pid, 0.0) for pid, cpu_s in after.items())


def run_wrk(
    wrk: str,
    server: Server,
    paths: list[str],
    conditional: bool,
    connections: int,
    duration_s: int,
    key: str,
    database_url: str | None,
) -> WrkResult:
    """Poll ``paths`` in turn on ``server`` with ``connections`` keep-alive connections for
    ``duration_s`` seconds (sending ``If-None-Match`` when ``conditional``). The result carries
    the CPU the server's processes, and with ``database_url`` its PostgreSQL backends, spent
    per request."""
    threads = min(WRK_THREADS, connections)
    command = [wrk, f"-t{threads}", f"-c{connections}", f"-d{duration_s}s", "--latency"]
    command += ["-s", str(LUA_SCRIPT), server.base_url]
    env = {
        **os.environ,
        "ASFT_BENCH_KEY": key,
        "ASFT_BENCH_PATHS": " ".join(paths),
        "ASFT_BENCH_CONDITIONAL": "1" if conditional else "0",
    }
    backends_before = database_backends_cpu_s(database_url) if database_url else None
    cpu_before = process_tree_cpu_s(server.pid)
    completed = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=duration_s + 60, check=False
    )
    cpu_after = process_tree_cpu_s(server.pid)
    backends_after = database_backends_cpu_s(database_url) if database_url else None
    if completed.returncode != 0:
        raise RuntimeError(f"wrk failed ({completed.returncode}): {completed.stderr}")
    result = parse_wrk(completed.stdout)
    if result.requests == 0:
        return result
    server_s = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    database_s = _backends_delta_s(backends_before, backends_after)
    return replace(
        result,
        server_cpu_ms=None if server_s is None else server_s * 1000 / result.requests,
        database_cpu_ms=None if database_s is None else database_s * 1000 / result.requests,
    )


def response_bytes(url: str, key: str) -> int:
    """The body size of one GET of ``url`` with the key; fails unless it answers 200."""
    response = httpx.get(url, headers={"Authorization": f"Bearer {key}"}, timeout=10)
    if response.status_code != 200:
        raise RuntimeError(f"GET {url} answered {response.status_code}: {response.text[:500]}")
    return len(response.content)


def parse_args() -> argparse.Namespace:
    """The command line, checked."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run (whole)")
    parser.add_argument(
        "--connections", type=int, nargs="+", default=[8, 64], help="connection counts"
    )
    parser.add_argument("--rounds", type=int, default=1, help="measurements per row (median)")
    parser.add_argument(
        "--training-jobs", type=int, default=16, help="running jobs the writer trains, wrk polls"
    )
    parser.add_argument(
        "--step-s", type=float, default=0.5, help="seconds between two steps of a training job"
    )
    parser.add_argument("--jobs", type=int, default=200, help="history jobs per team")
    parser.add_argument(
        "--events", type=int, default=100, help="metrics events per training job at the start"
    )
    parser.add_argument("--warmup", type=int, default=WARMUP_S, help="seconds per server")
    parser.add_argument(
        "--pg-server",
        default=os.environ.get("ASFT_BENCH_PG", DEFAULT_PG_SERVER),
        help="PostgreSQL server URL without a database (env ASFT_BENCH_PG)",
    )
    args = parser.parse_args()
    if args.jobs < len(HISTORY_STATUSES):
        parser.error(f"--jobs must be at least {len(HISTORY_STATUSES)} (one of each status)")
    if min(args.rounds, args.duration, args.warmup, args.training_jobs, *args.connections) < 1:
        parser.error(
            "--rounds, --duration, --warmup, --training-jobs and --connections must be >= 1"
        )
    if args.step_s <= 0 or args.events < 0:
        parser.error("--step-s must be positive and --events not negative")
    return args


def main() -> None:
    """Seed, start both servers and the writer, run wrk for every row and connection count,
    print the table; exit 1 if any answer was neither 2xx nor 304."""
    args = parse_args()
    wrk = require_wrk()
    # Other work on the machine moves every figure: the table shows the load before and after.
    load_at_start = os.getloadavg()[0]
    with (
        tempfile.TemporaryDirectory(prefix="asft-api-load-") as temp,
        fresh_database(args.pg_server) as database_url,
    ):
        folder = Path(temp)
        upgrade_head(database_url, folder)
        seeded = seed(database_url, args.jobs, args.training_jobs, args.events, args.step_s)
        # The servers see exactly these settings, nothing inherited from the caller's ASFT_*.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("ASFT_")}
        env = {
            **inherited,
            "ASFT_DATA_DIR": str(folder / "data"),
            "ASFT_DATABASE_URL": database_url,
            "ASFT_RATE_LIMIT_EXEMPT_KEYS": seeded.key_id,
            "ASFT_LOG_LEVEL": "WARNING",
        }
        auth = {"Authorization": f"Bearer {seeded.key}"}
        job_ids = seeded.training_job_ids
        with (
            uvicorn_server("api.main:create_app", env, "/healthz", auth, folder / "api.log") as api,
            uvicorn_server(
                "bench.bare_app:create_app", env, "/healthz", auth, folder / "bare.log"
            ) as bare,
            training_writer(database_url, job_ids, args.events + 1, args.step_s) as writer,
        ):
            servers = {True: api, False: bare}
            sizes = {
                row: response_bytes(
                    servers[row.is_api].base_url + row.paths(job_ids)[0], seeded.key
                )
                for row in ROWS
            }
            # Unreported: fills both servers' connection pools and warms their code paths.
            polled = [JOB_PATH.format(job=job_id) for job_id in job_ids]
            for server in (bare, api):
                connections = max(args.connections)
                run_wrk(wrk, server, polled, False, connections, args.warmup, seeded.key, None)
            measured: dict[tuple[Row, int], list[WrkResult]] = {}
            for _ in range(args.rounds):
                for connections in args.connections:
                    for row in ROWS:
                        result = run_wrk(
                            wrk,
                            servers[row.is_api],
                            row.paths(job_ids),
                            row.conditional,
                            connections,
                            args.duration,
                            seeded.key,
                            database_url if row.is_api else None,
                        )
                        measured.setdefault((row, connections), []).append(result)
        api_log = api.log_path.read_text(errors="replace")

    print_table(args, measured, sizes, load_at_start)
    print_summary(args, measured, writer)
    failed = sum(result.answers_other for results in measured.values() for result in results)
    if failed:
        print(f"{failed} answers were neither 2xx nor 304: the figures above are not valid")
        print(f"the API's log ends with:\n{api_log[-3000:]}")
        sys.exit(1)


def median_result(results: list[WrkResult]) -> WrkResult:
    """The round with the median requests/s (the lower middle one for an even count)."""
    ordered = sorted(results, key=lambda result: result.requests_per_s)
    return ordered[(len(ordered) - 1) // 2]


def jobs_polled_at_1hz(cpu_ms_per_poll: float | None) -> float | None:
    """Jobs, each polled once a second, that one process serves with one core: 1 / (CPU
    seconds per poll)."""
    if cpu_ms_per_poll is None or cpu_ms_per_poll <= 0:
        return None
    return 1000.0 / cpu_ms_per_poll


def target_verdict(row: Row, connections: int, p99_ms: float) -> str:
    """The target a row is held to and PASS/FAIL, or blank when it has none."""
    if row.name != TARGET_ENDPOINT or connections != TARGET_P99_CONNECTIONS:
        return ""
    verdict = "PASS" if p99_ms <= TARGET_P99_MS else "FAIL"
    return f"{f'p99<={TARGET_P99_MS:.0f}ms':<11}{verdict}"


def _figure(value: float | None, digits: int) -> str:
    """``value`` with ``digits`` decimals, or ``-`` when it was not measured."""
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(
    args: argparse.Namespace,
    measured: dict[tuple[Row, int], list[WrkResult]],
    sizes: dict[Row, int],
    load_at_start: float,
) -> None:
    """One line per row and connection count: the median round's figures, with ``bad``
    (answers neither 2xx nor 304) and ``sock err`` summed over the rounds."""
    load = f"{load_at_start:.2f} -> {os.getloadavg()[0]:.2f}"
    print(
        f"cpus={os.cpu_count()} load average (1 min) {load} uvicorn workers={WORKERS} "
        f"wrk threads={WRK_THREADS} duration={args.duration}s rounds={args.rounds} "
        f"training jobs={args.training_jobs} step={args.step_s}s history jobs per team="
        f"{args.jobs}"
    )
    print(
        f"{'endpoint':<12}{'mode':<14}{'conns':>5}{'req/s':>9}{'p50 ms':>8}{'p99 ms':>8}"
        f"{'304s':>6}{'cpu ms/req':>11}{'db ms/req':>10}{'jobs@1Hz/proc':>14}{'bad':>5}"
        f"{'sock err':>9}{'bytes':>7}  {'target':<11}met"
    )
    for connections in args.connections:
        for row in ROWS:
            results = measured[(row, connections)]
            shown = median_result(results)
            share_304 = shown.answers_304 / shown.requests if shown.requests else 0.0
            verdict = target_verdict(row, connections, shown.p99_ms)
            print(
                f"{row.name:<12}{row.mode:<14}{connections:>5}{shown.requests_per_s:>9.1f}"
                f"{shown.p50_ms:>8.2f}{shown.p99_ms:>8.2f}{share_304:>6.0%}"
                f"{_figure(shown.server_cpu_ms, 3):>11}{_figure(shown.database_cpu_ms, 3):>10}"
                f"{_figure(jobs_polled_at_1hz(shown.server_cpu_ms), 0):>14}"
                f"{sum(r.answers_other for r in results):>5}"
                f"{sum(r.socket_errors for r in results):>9}{sizes[row]:>7}  {verdict}".rstrip()
            )


def print_summary(
    args: argparse.Namespace,
    measured: dict[tuple[Row, int], list[WrkResult]],
    writer: WriterProgress,
) -> None:
    """How to read ``jobs@1Hz/proc``, whether the writer kept its pace, and the targets."""
    print(
        "jobs@1Hz/proc = 1 / (uvicorn CPU seconds per poll) = 1000 / cpu ms/req: jobs, each "
        "polled once a second, that one API process serves on one core (PostgreSQL's CPU, "
        "db ms/req, not included)"
    )
    intended = args.training_jobs / args.step_s
    pace = writer.steps_per_s()
    lagging = "" if pace >= 0.9 * intended else "  (BEHIND: fewer changes than intended)"
    print(
        f"writer: {writer.steps} steps at {pace:.1f} steps/s (intended {intended:.1f}: "
        f"{args.training_jobs} jobs, one step every {args.step_s}s each){lagging}"
    )
    target_rows = [
        (row, median_result(measured[(row, TARGET_P99_CONNECTIONS)]))
        for row in ROWS
        if row.name == TARGET_ENDPOINT and (row, TARGET_P99_CONNECTIONS) in measured
    ]
    if target_rows:
        figures = ", ".join(f"{row.mode} {result.p99_ms:.1f} ms" for row, result in target_rows)
        met = all(result.p99_ms <= TARGET_P99_MS for _, result in target_rows)
        print(
            f"target {TARGET_ENDPOINT} p99 <= {TARGET_P99_MS:.0f} ms at "
            f"{TARGET_P99_CONNECTIONS} connections: {figures}: {'MET' if met else 'NOT MET'}"
        )
    else:
        print(f"target p99 not measured: no run at {TARGET_P99_CONNECTIONS} connections")
    bad = sum(result.answers_other for results in measured.values() for result in results)
    print(f"target 0 answers neither 2xx nor 304: {bad}: {'MET' if bad == 0 else 'NOT MET'}")


if __name__ == "__main__":
    main()
