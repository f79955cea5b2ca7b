"""HTTP load on the API's read paths, against a bare FastAPI app on the same server settings.

One run starts two servers side by side with the same uvicorn command line (``--workers 2``,
uvloop, httptools, log level warning, no access log, 127.0.0.1): the API
(``api.main:create_app``) on a fresh, migrated PostgreSQL database, and ``bench/bare_app.py``,
which answers every GET with one constant job-sized JSON object and does nothing else. The same
load generator, ``wrk`` (with ``bench/api_load.lua`` adding the team's key to every request,
so both servers get identical requests), drives each in turn for:

- ``get_job``: polling one job, ``GET /v1/fine_tuning/jobs/{id}``;
- ``list_jobs``: the first page of the team's jobs, ``GET /v1/fine_tuning/jobs``;
- ``list_events``: the first page of the polled job's events, ``GET .../{id}/events``;

at each connection count (8 and 64 by default), and prints requests/s, p50 and p99 latency,
the ratio of requests/s to the bare app's at the same connection count, the CPU time the
server's processes spent per request (from /proc: less sensitive than requests/s to other load
on a shared machine), and the number of answers that were not 2xx (a bench whose requests
fail measures nothing: the script then exits 1).

The database holds a bench team with ``--jobs`` jobs (three message events each), a second team
with as many (so team filters have rows to skip), and on the polled job ``--events`` metrics
events, all written with the SQLAlchemy models, then analyzed as autovacuum would. The bench
key is exempt from rate limits (``ASFT_RATE_LIMIT_EXEMPT_KEYS``). Before measuring, each server
gets a short warm-up that is not reported. With ``--rounds`` > 1 every row is measured that
many times, interleaved, and the round with the median requests/s is shown.

Targets: ``get_job`` at 64 connections >= 50% of the bare app's requests/s; p99 <= 50 ms at
8 connections for every API endpoint. wrk shares the CPU with both servers and PostgreSQL, so
absolute figures depend on the machine; the ratios are the result.

    python bench/api_load.py [--duration 10] [--connections 8 64] [--rounds 1]

Needs ``wrk`` (Debian/Ubuntu: ``apt-get install -y wrk``) and PostgreSQL at ``--pg-server``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
from sqlalchemy import select

from api.schemas.jobs import JobCreate, resolve_method
from service.db.migrate import upgrade_head
from service.db.models import ApiKey, File, Job, JobEvent, ModelPair, Team, new_id
from service.db.session import make_engine, transaction
from service.teams import create_team_with_key

REPO_ROOT = Path(__file__).resolve().parents[1]
LUA_SCRIPT = Path(__file__).resolve().with_name("api_load.lua")
DEFAULT_PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"
MODEL_ID = "bench-chat"
WORKERS = 2
WRK_THREADS = 2
WARMUP_S = 2
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
TARGET_RATIO_CONNECTIONS = 64
TARGET_RATIO = 0.5
TARGET_P99_CONNECTIONS = 8
TARGET_P99_MS = 50.0
# Statuses the seeded jobs cycle through: finished ones dominate a real team's history.
SEEDED_STATUSES = ("succeeded", "succeeded", "failed", "cancelled", "queued", "running")


@dataclass(frozen=True)
class Endpoint:
    """A measured request: a row name and the path requested (on both servers alike)."""

    name: str
    path: str
    is_api: bool


@dataclass(frozen=True)
class WrkResult:
    """What one wrk run reports."""

    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: int
    server_cpu_ms: float | None = None
    """CPU time the server's processes spent per request (None where /proc is missing)."""


@dataclass(frozen=True)
class Server:
    """A running uvicorn server: its base URL, the supervisor's pid and its log file."""

    base_url: str
    pid: int
    log_path: Path


@dataclass(frozen=True)
class Seeded:
    """The bench team's secret key, its id (for the rate-limit exemption) and the polled job."""

    key: str
    key_id: str
    polled_job_id: str


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


@contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """A new, empty PostgreSQL database on ``server_url``; yields its URL, drops it at the end."""
    import psycopg

    plain = server_url.replace("postgresql+psycopg://", "postgresql://")
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


def _metrics_data(step: int, total_steps: int) -> dict[str, float | int]:
    """A metrics event's data as the worker writes it (``worker.runner``), with made-up values."""
    loss = 2.0 / (1 + step / 10)
    return {
        "step": step,
        "total_steps": total_steps,
        "train_loss": loss,
        "penalty": 1e-4 * step,
        "loss": loss + 1e-4 * step,
        "learning_rate": 5e-5,
        "tokens_per_s": 2048.0,
        "trained_tokens": 4096 * step,
    }


def seed(database_url: str, jobs: int, events: int) -> Seeded:
    """Write the bench team (key, file, ``jobs`` jobs), a second team and the polled job's
    ``events`` metrics events; returns the key and the polled job's id."""
    engine = make_engine(database_url)
    method = resolve_method(JobCreate(model=MODEL_ID, training_file="file-bench"))
    started = int(time.time()) - 10 * jobs
    try:
        with transaction(engine) as session:
            session.add(ModelPair(id=MODEL_ID, aligned_model="bench/chat", base_model="bench/base"))
            bench_team, secret = create_team_with_key(session, "bench")
            other_team, _ = create_team_with_key(session, "bench-other")
            key_id = session.scalar(select(ApiKey.id).where(ApiKey.team_id == bench_team.id))
            assert key_id is not None
            polled_job_id = ""
            for team in (bench_team, other_team):
                file = File(
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
                session.add(file)
                for index in range(jobs):
                    job = _seeded_job(team, file, method, index, started + 10 * index)
                    session.add(job)
                    for message in ("Created fine-tuning job", "Files validated", "Job queued"):
                        session.add(JobEvent(job_id=job.id, level="info", message=message))
                    if team is bench_team and job.status == "running":
                        polled_job_id = job.id
            session.flush()
            session.add_all(
                JobEvent(
                    job_id=polled_job_id,
                    level="info",
                    type="metrics",
                    message=f"Step {step}/{events}",
                    data=_metrics_data(step, events),
                    step=step,
                )
                for step in range(1, events + 1)
            )
        # A live database has statistics (autovacuum analyzes); without them the planner
        # guesses one row per table and may pick other indexes than in production.
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.exec_driver_sql("ANALYZE")
    finally:
        engine.dispose()
    return Seeded(key=secret, key_id=key_id, polled_job_id=polled_job_id)


def _seeded_job(
    team: Team, file: File, method: dict[str, object], index: int, created_at: int
) -> Job:
    """The ``index``-th job of ``team``: statuses cycle, so every page mixes them."""
    status = SEEDED_STATUSES[index % len(SEEDED_STATUSES)]
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
        trained_tokens=4096 * 75 if finished else None,
        fine_tuned_model=f"ft:{MODEL_ID}:{team.name}:{index}" if status == "succeeded" else None,
        error_code="out_of_memory" if status == "failed" else None,
        error_message="CUDA out of memory" if status == "failed" else None,
        created_at=created_at,
        finished_at=created_at + 5 if finished else None,
    )


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
    """The figures of a ``wrk --latency`` report. wrk prints the non-2xx and socket-error lines
    only when they are not zero."""
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.MULTILINE)
    total = re.search(r"^\s+(\d+) requests in ", output, re.MULTILINE)
    if rate is None or p50 is None or p99 is None or total is None:
        raise ValueError(f"could not read wrk's report:\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    return WrkResult(
        requests_per_s=float(rate[1]),
        p50_ms=_latency_ms(p50[1]),
        p99_ms=_latency_ms(p99[1]),
        requests=int(total[1]),
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
        socket_errors=sum(int(count) for count in errors.groups()) if errors else 0,
    )


_CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_tree_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` and its living descendants, from /proc (Linux);
    None where /proc is missing. uvicorn's workers are children of its supervisor."""
    if not Path(f"/proc/{pid}/stat").exists():
        return None
    total, pending = 0.0, [pid]
    while pending:
        current = pending.pop()
        try:
            # Fields after the parenthesised name: utime and stime are the 12th and 13th.
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS_PER_S
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue  # it ended meanwhile
    return total


def run_wrk(
    wrk: str, url: str, connections: int, duration_s: int, key: str, server_pid: int
) -> WrkResult:
    """Drive ``url`` with ``connections`` keep-alive connections for ``duration_s`` seconds;
    the result carries the CPU the server (``server_pid`` and its children) spent per request.
    """
    threads = min(WRK_THREADS, connections)
    command = [wrk, f"-t{threads}", f"-c{connections}", f"-d{duration_s}s", "--latency"]
    command += ["-s", str(LUA_SCRIPT), url]
    cpu_before = process_tree_cpu_s(server_pid)
    completed = subprocess.run(
        command,
        env={**os.environ, "ASFT_BENCH_KEY": key},
        capture_output=True,
        text=True,
        timeout=duration_s + 60,
        check=False,
    )
    cpu_after = process_tree_cpu_s(server_pid)
    if completed.returncode != 0:
        raise RuntimeError(f"wrk failed ({completed.returncode}): {completed.stderr}")
    result = parse_wrk(completed.stdout)
    if cpu_before is None or cpu_after is None or result.requests == 0:
        return result
    return replace(result, server_cpu_ms=(cpu_after - cpu_before) * 1000 / result.requests)


def response_bytes(url: str, key: str) -> int:
    """The body size of one GET of ``url`` with the key; fails unless it answers 200."""
    response = httpx.get(url, headers={"Authorization": f"Bearer {key}"}, timeout=10)
    if response.status_code != 200:
        raise RuntimeError(f"GET {url} answered {response.status_code}: {response.text[:500]}")
    return len(response.content)


def main() -> None:
    """Seed, start both servers, run wrk on every endpoint and connection count, print."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run (whole)")
    parser.add_argument(
        "--connections", type=int, nargs="+", default=[8, 64], help="connection counts"
    )
    parser.add_argument("--rounds", type=int, default=1, help="measurements per row (median)")
    parser.add_argument("--jobs", type=int, default=200, help="jobs per team")
    parser.add_argument("--events", type=int, default=100, help="metrics events, polled job")
    parser.add_argument("--warmup", type=int, default=WARMUP_S, help="seconds per server")
    parser.add_argument(
        "--pg-server",
        default=os.environ.get("ASFT_BENCH_PG", DEFAULT_PG_SERVER),
        help="PostgreSQL server URL without a database (env ASFT_BENCH_PG)",
    )
    args = parser.parse_args()
    if args.jobs < len(SEEDED_STATUSES):
        parser.error(f"--jobs must be at least {len(SEEDED_STATUSES)} (one of each status)")
    if min(args.rounds, args.duration, args.warmup, *args.connections) < 1:
        parser.error("--rounds, --duration, --warmup and --connections must be at least 1")
    wrk = require_wrk()

    with (
        tempfile.TemporaryDirectory(prefix="asft-api-load-") as temp,
        fresh_database(args.pg_server) as database_url,
    ):
        folder = Path(temp)
        upgrade_head(database_url, folder)
        seeded = seed(database_url, args.jobs, args.events)
        # The servers see exactly these settings, nothing inherited from the caller's ASFT_*.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("ASFT_")}
        env = {
            **inherited,
            "ASFT_DATA_DIR": str(folder / "data"),
            "ASFT_DATABASE_URL": database_url,
            "ASFT_RATE_LIMIT_EXEMPT_KEYS": seeded.key_id,
            "ASFT_LOG_LEVEL": "WARNING",
        }
        job_path = f"/v1/fine_tuning/jobs/{seeded.polled_job_id}"
        endpoints = (
            Endpoint("bare", job_path, is_api=False),
            Endpoint("get_job", job_path, is_api=True),
            Endpoint("list_jobs", "/v1/fine_tuning/jobs", is_api=True),
            Endpoint("list_events", f"{job_path}/events", is_api=True),
        )
        auth = {"Authorization": f"Bearer {seeded.key}"}
        with (
            uvicorn_server("api.main:create_app", env, "/healthz", auth, folder / "api.log") as api,
            uvicorn_server(
                "bench.bare_app:create_app", env, "/healthz", auth, folder / "bare.log"
            ) as bare,
        ):
            servers = {True: api, False: bare}
            sizes = {
                e.name: response_bytes(servers[e.is_api].base_url + e.path, seeded.key)
                for e in endpoints
            }
            # Unreported: fills both servers' connection pools and warms their code paths.
            for server in (bare, api):
                url = server.base_url + job_path
                run_wrk(wrk, url, max(args.connections), args.warmup, seeded.key, server.pid)
            measured: dict[tuple[str, int], list[WrkResult]] = {}
            for _ in range(args.rounds):
                for connections in args.connections:
                    for endpoint in endpoints:
                        server = servers[endpoint.is_api]
                        result = run_wrk(
                            wrk,
                            server.base_url + endpoint.path,
                            connections,
                            args.duration,
                            seeded.key,
                            server.pid,
                        )
                        measured.setdefault((endpoint.name, connections), []).append(result)
            api_log = api.log_path.read_text(errors="replace")

    print_table(args, endpoints, measured, sizes)
    failed = sum(r.non_2xx for (name, _), rs in measured.items() for r in rs if name != "bare")
    if failed:
        print(f"{failed} API answers were not 2xx: the figures above are not valid")
        print(f"the API's log ends with:\n{api_log[-3000:]}")
        sys.exit(1)


def median_result(results: list[WrkResult]) -> WrkResult:
    """The round with the median requests/s (the lower middle one for an even count)."""
    ordered = sorted(results, key=lambda result: result.requests_per_s)
    return ordered[(len(ordered) - 1) // 2]


def target_verdict(endpoint: Endpoint, connections: int, ratio: float, p99_ms: float) -> str:
    """The target a row is held to and PASS/FAIL, or blanks when it has none."""
    if endpoint.name == "get_job" and connections == TARGET_RATIO_CONNECTIONS:
        verdict = "PASS" if ratio >= TARGET_RATIO else "FAIL"
        return f"{f'req/s>={TARGET_RATIO:.0%} bare':<18}{verdict}"
    if endpoint.is_api and connections == TARGET_P99_CONNECTIONS:
        verdict = "PASS" if p99_ms <= TARGET_P99_MS else "FAIL"
        return f"{f'p99<={TARGET_P99_MS:.0f}ms':<18}{verdict}"
    return ""


def print_table(
    args: argparse.Namespace,
    endpoints: tuple[Endpoint, ...],
    measured: dict[tuple[str, int], list[WrkResult]],
    sizes: dict[str, int],
) -> None:
    """The results table: one row per endpoint and connection count, with the targets.

    ``non-2xx`` and ``sock err`` are summed over the rounds; the other figures are the median
    round's. ``cpu ms/req`` is the CPU the server's processes spent per request.
    """
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(
        f"cpus={os.cpu_count()} load average={load} uvicorn workers={WORKERS} "
        f"wrk threads={WRK_THREADS} duration={args.duration}s rounds={args.rounds} "
        f"jobs per team={args.jobs} events on the polled job={args.events + 3}"
    )
    print(
        f"{'endpoint':<12}{'conns':>6}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'vs bare':>9}"
        f"{'cpu ms/req':>11}{'non-2xx':>9}{'sock err':>9}{'bytes':>7}  {'target':<18}met"
    )
    for connections in args.connections:
        bare_rate = median_result(measured[("bare", connections)]).requests_per_s
        for endpoint in endpoints:
            results = measured[(endpoint.name, connections)]
            shown = median_result(results)
            ratio = shown.requests_per_s / bare_rate
            cpu = "-" if shown.server_cpu_ms is None else f"{shown.server_cpu_ms:.3f}"
            verdict = target_verdict(endpoint, connections, ratio, shown.p99_ms)
            print(
                f"{endpoint.name:<12}{connections:>6}{shown.requests_per_s:>10.1f}"
                f"{shown.p50_ms:>9.2f}{shown.p99_ms:>9.2f}{ratio:>9.0%}{cpu:>11}"
                f"{sum(r.non_2xx for r in results):>9}{sum(r.socket_errors for r in results):>9}"
                f"{sizes[endpoint.name]:>7}  {verdict}".rstrip()
            )


if __name__ == "__main__":
    main()
