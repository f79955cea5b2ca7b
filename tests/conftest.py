"""Shared fixtures. Expensive ones (the tiny zoo) are built once and cached on disk."""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

# Under pytest-xdist (make test runs 2 workers) each worker, and every process its tests start,
# gets its share of the cores: two workers each wanting every core slow each other down badly.
# Set before asft_core (below) sets the default from the cores alone.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    _workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // _workers))

from asft_core.zoo import ZooPaths, build_zoo

REPO_ROOT = Path(__file__).resolve().parent.parent
# Whole folders of the slow lane: real worker processes, load benches.
SLOW_FOLDERS = ("worker", "bench")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the PostgreSQL variants and the slow folders, so ``make test-fast`` can skip them."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        params = callspec.params.values() if callspec is not None else ()
        if any(isinstance(value, str) and value == "postgresql" for value in params):
            item.add_marker(pytest.mark.postgresql)
        parts = item.path.relative_to(REPO_ROOT).parts
        if len(parts) > 2 and parts[0] == "tests" and parts[1] in SLOW_FOLDERS:
            item.add_marker(pytest.mark.slow)
    # Slow tests first: under pytest-xdist the long ones then overlap the many short ones
    # instead of leaving one worker alone with them at the end.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """A cache folder that survives between runs: the demo's (the zoo is built once)."""
    folder = Path(os.environ.get("ASFT_TEST_CACHE", REPO_ROOT / "var" / "cache"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def zoo(cache_dir: Path) -> ZooPaths:
    """The tiny base/aligned pair and its datasets, built once per checkout."""
    return build_zoo(cache_dir / "zoo")


PG_SERVER = os.environ.get("ASFT_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")


def require_service(problem: str) -> None:
    """Fail under CI=true (the service must be there), skip on a developer machine."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"required under CI=true: {problem}")
    pytest.skip(problem)


def postgres_database(template: str | None = None) -> Iterator[str]:
    """A fresh PostgreSQL database on the shared server, dropped afterwards (a generator).

    With ``template`` (a database name) it starts as a copy of that database.
    """
    import psycopg

    name = f"asft_test_{uuid.uuid4().hex[:12]}"
    plain = PG_SERVER.replace("postgresql+psycopg://", "postgresql://")
    try:
        admin = psycopg.connect(f"{plain}/test", autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as error:
        require_service(f"PostgreSQL not reachable: {error}")
    with admin:
        copy_of = f' TEMPLATE "{template}"' if template else ""
        admin.execute(f'CREATE DATABASE "{name}"{copy_of}')
    try:
        yield f"{PG_SERVER}/{name}"
    finally:
        from service.db.session import engine_for

        engine_for(f"{PG_SERVER}/{name}").dispose()
        # Dropping takes about a second (PostgreSQL checkpoints): the next test need not wait.
        _DROPPER.submit(_drop_database, plain, name)


def _drop_database(plain_server: str, name: str) -> None:
    import psycopg

    with psycopg.connect(f"{plain_server}/test", autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# One thread drops the test databases in the background; the run waits for it at its end.
_DROPPER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drop-test-db")
atexit.register(_DROPPER.shutdown, wait=True)


@pytest.fixture(scope="session")
def migrated_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The name of a PostgreSQL database migrated once per run, which test databases copy
    (a copy takes milliseconds; running the migrations takes about a second)."""
    from service.db.migrate import upgrade_head
    from service.db.session import engine_for

    for url in postgres_database():
        upgrade_head(url, tmp_path_factory.mktemp("pg-template"))
        engine_for(url).dispose()  # a template must have no open connection to be copied
        yield url.rsplit("/", 1)[1]


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, migrated database of each kind (PostgreSQL's copied from a migrated one)."""
    from service.db.migrate import upgrade_head

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'asft.db'}"
        upgrade_head(url, tmp_path)
        yield url
        return
    yield from postgres_database(template=request.getfixturevalue("migrated_postgres"))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class PrivateRedis:
    """A Redis server of one test's own, without persistence: a restart loses every key."""

    binary: str
    folder: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Its URL (database 0)."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.folder),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server (its data is gone)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


@pytest.fixture
def private_redis_server(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A Redis server of the test's own, on a spare port in a temp folder (never the shared
    one, since tests flush and restart it)."""
    binary = shutil.which("redis-server")
    if binary is None:
        require_service("redis-server is not installed")
    assert binary is not None
    folder = tmp_path / "redis"
    folder.mkdir()
    server = PrivateRedis(binary, folder, free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def private_redis(private_redis_server: PrivateRedis) -> str:
    """The URL of a Redis server of the test's own."""
    return private_redis_server.url


@dataclass
class PrivatePostgres:
    """A PostgreSQL cluster of one test's own, which the test may stop and start at will."""

    bin_dir: Path
    data_dir: Path
    port: int
    # ``runuser -u postgres --`` when the tests run as root (PostgreSQL refuses root).
    run_as: list[str]

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the cluster's ``asft`` database."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/asft"

    def _pg_ctl(self, *arguments: str) -> None:
        subprocess.run(
            [*self.run_as, str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), *arguments],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        # Durability is not under test: fsync off keeps a restart quick on a busy machine.
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1"
            f" -c unix_socket_directories={self.data_dir}"
            " -c fsync=off -c full_page_writes=off -c max_connections=60"
        )
        self._pg_ctl("-l", str(self.data_dir / "server.log"), "-o", options, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: open connections are cut, as in a restart)."""
        self._pg_ctl("-m", mode, "-w", "stop")


def _postgres_bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    """A fresh PostgreSQL cluster on a spare port in a temp folder, with a database ``asft``.

    Never the shared server: tests stop and restart it. As root, the cluster runs as the
    ``postgres`` OS user, in a folder of its own under the system temp folder (pytest's
    temp folders are private to root).
    """
    bin_dir = _postgres_bin_dir()
    if bin_dir is None:
        require_service("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    assert bin_dir is not None
    run_as: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="asft-pg-"))
    if os.geteuid() == 0:
        runuser = shutil.which("runuser")
        try:
            import pwd

            owner = pwd.getpwnam("postgres")
        except KeyError:
            owner = None
        if runuser is None or owner is None:
            shutil.rmtree(folder)
            require_service("running as root without a postgres user and runuser")
        assert runuser is not None and owner is not None
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        run_as = [runuser, "-u", "postgres", "--"]
    cluster = PrivatePostgres(bin_dir, folder / "data", free_port(), run_as)
    try:
        subprocess.run(
            [
                *run_as,
                str(bin_dir / "initdb"),
                "-D",
                str(cluster.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        cluster.start()
    except (OSError, subprocess.SubprocessError) as error:
        shutil.rmtree(folder, ignore_errors=True)
        require_service(f"could not start a private PostgreSQL: {error}")
    try:
        import psycopg

        with psycopg.connect(
            f"postgresql://postgres@127.0.0.1:{cluster.port}/postgres", autocommit=True
        ) as admin:
            admin.execute("CREATE DATABASE asft")
        yield cluster
    finally:
        from service.db.session import engine_for

        engine_for(cluster.url).dispose()
        # "immediate": the test is over, nothing needs a clean shutdown.
        with suppress(subprocess.SubprocessError):
            cluster.stop("immediate")
        shutil.rmtree(folder, ignore_errors=True)


def wait_until_answering(
    url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float
) -> None:
    """Poll ``url`` until it answers 200; fail with ``log`` if ``process`` exits first."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert process.poll() is None, log.read_text()
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{url} did not answer in {timeout_s:.0f} s"
        time.sleep(0.2)


@pytest.fixture(scope="session")
def inference_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``asft infer`` on a spare port, one torch thread; stopped at the end."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("infer") / "infer.log"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("ASFT_")},
        "ASFT_INFERENCE_URL": url,
        "ASFT_DEVICE": "cpu",
        "ASFT_LOG_LEVEL": "WARNING",
        "OMP_NUM_THREADS": "1",
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "asft.cli", "infer"],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    wait_until_answering(f"{url}/health", process, log_path, timeout_s=60)
    try:
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
