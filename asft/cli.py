"""``asft``: run the service, and use it from a laptop or a pipeline.

Server side:

    asft db upgrade                 bring the database to the current schema (under a lock)
    asft api [--host H --port P]    serve the REST API (refuses an out-of-date schema)
    asft worker [--queues gpu]      run a Celery worker (GPU jobs)
    asft serve [--port P --workers N]
                                    one machine: migrate, then the API, N workers (1) and
                                    the inference server together
    asft infer                      the embedded inference server alone (chat completions)
    asft admin create-team NAME     create a team and print its first API key
    asft alignment inspect MODEL    a registered pair's alignment direction, per module, and
                                    what AsFT does on it (or --base PATH --aligned PATH)
    asft zoo                        build (or reuse) the tiny model pair; print its folder

The client commands (``asft files|jobs|models ...``) are ``asft_client.cli``'s; they talk to
a running service over HTTP.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from asft_client.cli import add_client_commands, run_client_command
from asft_core.spec import DIRECTION_STORAGES
from service.settings import Settings, get_settings

if TYPE_CHECKING:
    from sqlalchemy import Engine

CLIENT_COMMANDS = frozenset({"files", "jobs", "models", "chat"})


def _db_upgrade(_: argparse.Namespace) -> int:
    from service.db.migrate import upgrade_head

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    revision = upgrade_head(settings.resolved_database_url, settings.data_dir)
    print(f"database at revision {revision}")
    return 0


def _open_database(settings: Settings) -> tuple[Engine, str | None]:
    """The database's engine, and why it cannot be used as it is (None when it can)."""
    from sqlalchemy.exc import SQLAlchemyError

    from service.db.migrate import schema_status
    from service.db.session import engine_for

    if settings.database_url is None:
        # A first start of the embedded default has no folder yet: without it SQLite answers
        # "unable to open database file" instead of the schema check naming `asft db upgrade`.
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = engine_for(settings.resolved_database_url)
    try:
        status = schema_status(engine)
    except SQLAlchemyError as error:
        return engine, f"database unreachable: {error}"
    return engine, None if status.ok else status.message


def _api(args: argparse.Namespace) -> int:
    import uvicorn

    from service.bootstrap import bootstrap_embedded
    from service.logs import configure_logging

    settings = get_settings()
    engine, problem = _open_database(settings)
    if problem is not None:
        print(f"asft api: {problem}", file=sys.stderr)
        return 2
    key = bootstrap_embedded(settings, engine)
    if key is not None:
        print(f"created team 'default'; its API key (also in {settings.data_dir / 'api-key'}):")
        print(f"  {key}")
    configure_logging(settings.log_level)
    uvicorn.run(
        "api.main:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=settings.log_level.lower(),
        log_config=None,  # keep our JSON lines
        # h11, not httptools: httptools buffers a request head of any size (a 32 MiB header
        # was accepted), h11 stops at this bound; HeaderLimitMiddleware answers the 431.
        http="h11",
        h11_max_incomplete_event_size=settings.max_header_bytes,
    )
    return 0


def _worker_command(queues: str, concurrency: int, node: str | None = None) -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "-Q",
        queues,
        "--concurrency",
        str(concurrency),
        "--pool",
        "solo" if concurrency == 1 else "prefork",
        "--loglevel",
        get_settings().log_level,
        "--without-gossip",
        "--without-mingle",
        *(["--hostname", node] if node else []),
    ]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _serve_workers(count: int) -> dict[str, tuple[list[str], dict[str, str] | None]]:
    """``asft serve``'s worker processes: one, or ``count`` sharing this process's threads.

    Each of several workers gets its share of OMP_NUM_THREADS (set by ``asft_core`` to the
    cores this process may use, or by the operator), so they do not fight over the cores.
    """
    import os

    if count == 1:
        return {"worker": (_worker_command("gpu", 1), None)}
    threads = max(1, int(os.environ.get("OMP_NUM_THREADS", "1")) // count)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return {
        f"worker-{i}": (_worker_command("gpu", 1, f"worker{i}@%h"), env)
        for i in range(1, count + 1)
    }


def _worker(args: argparse.Namespace) -> int:
    import os

    # Celery is started as a program (not imported) so the API package never loads torch.
    command = _worker_command(args.queues, args.concurrency)
    os.execv(command[0], command)
    return 0  # not reached


def _inference_address(url: str) -> tuple[str, int]:
    """Host and port of an ``http://host:port`` inference URL."""
    parsed = urlsplit(url)
    return parsed.hostname or "127.0.0.1", parsed.port or 80


def _infer(args: argparse.Namespace) -> int:
    """Run the embedded inference server until stopped."""
    import torch
    import uvicorn

    from asft_core.serving import Engine
    from inference.app import create_app
    from service.logs import configure_logging

    settings = get_settings()
    host, port = _inference_address(settings.inference_url)
    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    engine = Engine(
        device=device,
        max_adapters=settings.engine_max_adapters,
        max_batch=settings.engine_max_batch,
    )
    for model in args.model or []:
        engine.load_base(model, str(Path(model).expanduser().resolve()))
    configure_logging(settings.log_level)
    uvicorn.run(
        create_app(engine),
        host=args.host or host,
        port=args.port or port,
        log_level=settings.log_level.lower(),
        log_config=None,
    )
    engine.close()
    return 0


# A child that exits with an error within this long of its first start has a problem a
# restart will not fix (a port in use, a bad setting): asft serve stops and says so.
FIRST_START_S = 10.0
# Restart delays double from 1 s up to this; a child that ran this long starts over at 1 s.
MAX_BACKOFF_S = 30.0


def _serve(args: argparse.Namespace) -> int:
    """Migrate, then run the API, the workers and the inference server until Ctrl-C.

    Each is supervised: one that dies (a job that ran out of memory takes its worker down) is
    restarted with backoff and a line saying why, while the others go on; ``/readyz`` says
    which is down meanwhile (``service.supervision``). One that exits with an error right at
    its first start stops everything, with its exit code.
    """
    import signal
    import subprocess
    import time

    from service.supervision import describe_exit, status_path, write_status

    if _db_upgrade(args) != 0:
        return 1
    api = [sys.executable, "-m", "asft.cli", "api", "--host", args.host, "--port", str(args.port)]
    commands = {**_serve_workers(args.workers), "api": (api, None)}
    if not args.no_engine:
        commands["inference"] = ([sys.executable, "-m", "asft.cli", "infer"], None)
    status_file = status_path(get_settings().data_dir)
    processes: dict[str, subprocess.Popen[bytes] | None] = {}
    started: dict[str, float] = {}
    restart_at: dict[str, float] = {}
    state: dict[str, dict[str, Any]] = {name: {"restarts": -1} for name in commands}
    backoff = dict.fromkeys(commands, 1.0)

    def start(name: str) -> None:
        command, env = commands[name]
        process = subprocess.Popen(command, env=env)
        processes[name], started[name] = process, time.monotonic()
        state[name].update(up=True, pid=process.pid, restarts=state[name]["restarts"] + 1)

    for name in commands:
        start(name)
    write_status(status_file, state)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = 0
    try:
        while not stopping:
            now = time.monotonic()
            for name, process in processes.items():
                if stopping or (process is not None and process.poll() is None):
                    continue
                if process is not None:  # it just died
                    why = describe_exit(process.returncode)
                    first = state[name]["restarts"] == 0 and now - started[name] < FIRST_START_S
                    if first and process.returncode > 0:  # an error exit, not a kill
                        print(f"asft serve: {name} exited at start ({why})", flush=True)
                        code, stopping = process.returncode or 1, True
                        break
                    ran = now - started[name]
                    doubled = min(2 * backoff[name], MAX_BACKOFF_S)
                    backoff[name] = 1.0 if ran >= MAX_BACKOFF_S else doubled
                    wait = backoff[name]
                    print(
                        f"asft serve: {name} exited ({why}); restarting in {wait:.0f}s", flush=True
                    )
                    state[name].update(up=False, last_exit=why)
                    write_status(status_file, state)
                    processes[name] = None
                    restart_at[name] = now + backoff[name]
                elif now >= restart_at[name]:
                    start(name)
                    write_status(status_file, state)
            time.sleep(0.2)
    finally:
        running = [p for p in processes.values() if p is not None and p.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        for process in running:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        status_file.unlink(missing_ok=True)
    print("asft serve: stopped")
    return code


def _create_team(args: argparse.Namespace) -> int:
    from pydantic import ValidationError
    from sqlalchemy import select

    from api.schemas.admin import TeamCreate
    from service.db.models import Team
    from service.db.session import transaction
    from service.teams import create_team_with_key

    try:
        # The API's rule: team names appear in fine-tuned model names (ft:model:team:...).
        TeamCreate(name=args.name)
    except ValidationError as error:
        print(f"asft: invalid team name {args.name!r}: {error.errors()[0]['msg']}", file=sys.stderr)
        return 1
    settings = get_settings()
    engine, problem = _open_database(settings)
    if problem is not None:
        print(f"asft: {problem}", file=sys.stderr)
        return 2
    with transaction(engine) as session:
        if session.scalar(select(Team).where(Team.name == args.name)) is not None:
            print(f"asft: a team named {args.name!r} exists", file=sys.stderr)
            return 1
        team, secret = create_team_with_key(session, args.name)
    print(f"team {team.id} ({args.name}); API key, shown once:")
    print(f"  {secret}")
    return 0


def _registered_pair(model_id: str) -> tuple[str, str] | int:
    """A registered model's (base, aligned) references, or the exit code after saying why
    there are none."""
    from service.db.models import ModelPair
    from service.db.session import transaction

    engine, problem = _open_database(get_settings())
    if problem is not None:
        print(f"asft: {problem}", file=sys.stderr)
        return 2
    with transaction(engine) as session:
        pair = session.get(ModelPair, model_id)
        if pair is None:
            print(f"asft: no registered model {model_id!r}", file=sys.stderr)
            return 1
        return pair.base_model, pair.aligned_model


def _alignment_inspect(args: argparse.Namespace) -> int:
    """Resolve the pair, then run ``asft_core.alignment_inspect`` in a subprocess (torch)."""
    import subprocess

    by_path = (args.base is not None, args.aligned is not None)
    if by_path != ((False, False) if args.model is not None else (True, True)):
        print("asft: give a registered model id, or --base and --aligned", file=sys.stderr)
        return 2
    settings = get_settings()
    if args.model is not None:
        pair = _registered_pair(args.model)
        if isinstance(pair, int):
            return pair
        base, aligned = pair
    else:
        base, aligned = args.base, args.aligned
    # The worker's cache folder, so the artifact a job computed is the one inspected.
    cache_dir = args.cache_dir or settings.resolved_cache_dir / "alignment"
    command = [sys.executable, "-m", "asft_core.alignment_inspect", "--base", base]
    command += ["--aligned", aligned, "--cache-dir", str(cache_dir)]
    if args.target_modules is not None:
        command += ["--target-modules", args.target_modules]
    if args.tau is not None:
        command += ["--tau", str(args.tau)]
    if args.json:
        command.append("--json")
    return subprocess.run(command, check=False).returncode


def _plan(args: argparse.Namespace) -> int:
    """Resolve the pair, then run ``asft_core.memory`` in a subprocess (torch)."""
    import subprocess

    model = args.aligned
    if (args.model is None) == (model is None):
        print("asft: give a registered model id, or --aligned", file=sys.stderr)
        return 2
    if args.model is not None:
        pair = _registered_pair(args.model)
        if isinstance(pair, int):
            return pair
        model = pair[1]
    command = [sys.executable, "-m", "asft_core.memory", model, "--method", args.method]
    for item in args.hyperparameter:
        command += ["--hyperparameter", item]
    command += ["--precision", args.precision]
    command += ["--direction-storage", args.direction_storage or get_settings().direction_storage]
    memory = args.device_memory_gb or get_settings().device_memory_gb
    if memory is not None:
        command += ["--device-memory-gb", str(memory)]
    if args.json:
        command.append("--json")
    return subprocess.run(command, check=False).returncode


def _zoo(args: argparse.Namespace) -> int:
    """Build (or reuse) the tiny model pair in the cache; print its folder (or every path)."""
    import json
    import subprocess

    cache_dir = args.cache_dir or get_settings().resolved_cache_dir
    # A subprocess, as for `alignment inspect`: this command never imports torch itself.
    built = subprocess.run(
        [sys.executable, "-m", "asft_core.zoo", "--cache-dir", str(cache_dir)],
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    )
    if built.returncode != 0:
        return built.returncode
    paths = json.loads(built.stdout.strip().splitlines()[-1])
    print(json.dumps(paths, indent=2) if args.json else paths["root"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command-line grammar."""
    parser = argparse.ArgumentParser(prog="asft", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    db = commands.add_parser("db", help="database schema").add_subparsers(
        dest="db_command", required=True
    )
    db.add_parser("upgrade", help="upgrade to the current schema").set_defaults(run=_db_upgrade)
    api = commands.add_parser("api", help="serve the REST API")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--workers", type=int, default=1)
    api.set_defaults(run=_api)
    worker = commands.add_parser("worker", help="run a Celery worker")
    worker.add_argument("--queues", default="gpu")
    worker.add_argument("--concurrency", type=int, default=1)
    worker.set_defaults(run=_worker)
    serve = commands.add_parser(
        "serve", help="migrate, then run the API, the workers and the inference server"
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--no-engine",
        action="store_true",
        help="start no inference server (chat goes to ASFT_INFERENCE_URL, e.g. vLLM)",
    )
    serve.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="worker processes, each running one job with its share of the CPU threads "
        "(on one GPU keep 1)",
    )
    serve.set_defaults(run=_serve)
    infer = commands.add_parser(
        "infer", help="run the embedded inference server (at ASFT_INFERENCE_URL's port)"
    )
    infer.add_argument("--host", help="default: ASFT_INFERENCE_URL's host")
    infer.add_argument("--port", type=int, help="default: ASFT_INFERENCE_URL's port")
    infer.add_argument(
        "--model", action="append", help="a model folder to load at start (others load on use)"
    )
    infer.set_defaults(run=_infer)
    admin = commands.add_parser("admin", help="administration").add_subparsers(
        dest="admin_command", required=True
    )
    create = admin.add_parser("create-team", help="create a team and print its key")
    create.add_argument("name")
    create.set_defaults(run=_create_team)
    alignment = commands.add_parser("alignment", help="alignment directions").add_subparsers(
        dest="alignment_command", required=True
    )
    inspect = alignment.add_parser(
        "inspect", help="per-module facts of a pair's alignment direction, and its regime"
    )
    inspect.add_argument("model", nargs="?", help="a registered model id")
    inspect.add_argument("--base", help="base model folder or hub id (instead of a model id)")
    inspect.add_argument("--aligned", help="aligned model folder or hub id")
    inspect.add_argument(
        "--cache-dir", type=Path, help="alignment cache (default: the service's, ASFT_CACHE_DIR)"
    )
    inspect.add_argument("--target-modules", help="comma-separated, default q_proj,v_proj")
    inspect.add_argument("--tau", type=float, help="energy share for k (default 0.5)")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(run=_alignment_inspect)
    plan = commands.add_parser(
        "plan", help="a job's peak device memory, planned before any GPU time"
    )
    plan.add_argument("model", nargs="?", help="a registered model id")
    plan.add_argument("--aligned", help="a model folder (instead of a model id)")
    plan.add_argument("--method", default="asft")
    plan.add_argument(
        "--hyperparameter",
        "-p",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="as in a job's request: -p batch_size=4 -p max_seq_len=1024",
    )
    plan.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    plan.add_argument(
        "--device-memory-gb", type=float, help="default: ASFT_DEVICE_MEMORY_GB, if set"
    )
    plan.add_argument(
        "--direction-storage",
        choices=DIRECTION_STORAGES,
        help="where an exact AsFT penalty keeps V; default: ASFT_DIRECTION_STORAGE (fp32)",
    )
    plan.add_argument("--json", action="store_true", help="print JSON")
    plan.set_defaults(run=_plan)
    zoo = commands.add_parser(
        "zoo", help="build (or reuse) the tiny model pair and print its folder"
    )
    zoo.add_argument("--cache-dir", type=Path, help="default: ASFT_CACHE_DIR (var/cache)")
    zoo.add_argument("--json", action="store_true", help="print every path as JSON")
    zoo.set_defaults(run=_zoo)
    add_client_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code."""
    from pydantic import ValidationError

    args = build_parser().parse_args(argv)
    if args.command in CLIENT_COMMANDS:
        return run_client_command(args)
    try:
        code: int = args.run(args)
    except ValidationError as error:  # a bad ASFT_* setting: one line each, no traceback
        for problem in error.errors():
            name = "ASFT_" + "_".join(str(part) for part in problem["loc"]).upper()
            print(f"asft: {name}={problem.get('input')!r}: {problem['msg']}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
