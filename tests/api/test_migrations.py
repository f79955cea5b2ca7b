"""Migrations on fresh SQLite and PostgreSQL databases, the ``asft`` commands that run them or
refuse an old schema, and SQLite's settings for sharing its file between processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from fastapi.testclient import TestClient
from sqlalchemy import MetaData, Table, inspect, text

from api.main import create_app
from service.db.migrate import alembic_config, current_revision, head_revision, upgrade_head
from service.db.models import Base
from service.db.session import SQLITE_BUSY_TIMEOUT_MS, engine_for, make_engine
from service.settings import Settings
from tests.api.conftest import auth
from tests.conftest import postgres_database

ASFT = Path(sys.executable).parent / "asft"
TABLES = set(Base.metadata.tables) | {"alembic_version"}


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of each kind, never migrated."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
        return
    yield from postgres_database()


def test_upgrade_head_creates_every_table(fresh_url: str, tmp_path: Path) -> None:
    engine = engine_for(fresh_url)
    assert current_revision(engine) is None
    assert upgrade_head(fresh_url, tmp_path) == head_revision()
    assert current_revision(engine) == head_revision()
    assert set(inspect(engine).get_table_names()) == TABLES


def test_migrations_match_the_models(fresh_url: str, tmp_path: Path) -> None:
    # A column added to service/db/models.py without a migration shows up here, not in production.
    upgrade_head(fresh_url, tmp_path)
    with engine_for(fresh_url).connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []


def test_upgrading_twice_is_a_noop(fresh_url: str, tmp_path: Path) -> None:
    upgrade_head(fresh_url, tmp_path)
    engine = engine_for(fresh_url)
    with engine.begin() as connection:
        connection.execute(
            text("INSERT INTO teams (id, name, created_at) VALUES ('team-1', 'kept', 1)")
        )
    assert upgrade_head(fresh_url, tmp_path) == head_revision()
    with engine.connect() as connection:
        assert connection.execute(text("SELECT name FROM teams")).scalars().all() == ["kept"]
        versions = connection.execute(text("SELECT version_num FROM alembic_version")).all()
    assert versions == [(head_revision(),)]


def test_a_job_from_before_0009_gets_its_queue_time(fresh_url: str, tmp_path: Path) -> None:
    # A backfill runs on real rows: in PostgreSQL, seconds * 10^9 must not be 32-bit.
    command.upgrade(alembic_config(fresh_url), "0008")
    engine = engine_for(fresh_url)
    jobs = Table("jobs", MetaData(), autoload_with=engine)
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO teams (id, name, created_at) VALUES ('t', 't', 1)"))
        connection.execute(
            text(
                "INSERT INTO model_pairs (id, aligned_model, base_model, created_at) "
                "VALUES ('m', 'a', 'b', 1)"
            )
        )
        connection.execute(
            jobs.insert().values(
                id="ftjob-old",
                team_id="t",
                model="m",
                training_file="file-x",
                status="queued",
                method={"type": "supervised"},
                seed=1,
                auto_start=True,
                result_files=[],
                cancel_requested=False,
                attempt=0,
                created_at=1_700_000_000,
                updated_at=1_700_000_005,
            )
        )
    assert upgrade_head(fresh_url, tmp_path) == head_revision()
    with engine.connect() as connection:
        queued_ns = connection.execute(text("SELECT queued_ns FROM jobs")).scalar_one()
    assert queued_ns == 1_700_000_005 * 10**9


def test_concurrent_upgrades_take_turns(fresh_url: str, tmp_path: Path) -> None:
    # Several processes upgrading at once (e.g. containers starting together): without the
    # lock, PostgreSQL answers "relation already exists" to all but one.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ASFT_")}
    env = {**clean, "ASFT_DATA_DIR": str(tmp_path), "ASFT_DATABASE_URL": fresh_url}
    processes = [
        subprocess.Popen(
            [str(ASFT), "db", "upgrade"],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = [process.communicate(timeout=120) for process in processes]
    assert [process.returncode for process in processes] == [0, 0, 0], outputs
    assert current_revision(engine_for(fresh_url)) == head_revision()
    assert set(inspect(engine_for(fresh_url)).get_table_names()) == TABLES


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'wal.db'}")
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == SQLITE_BUSY_TIMEOUT_MS
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    engine.dispose()


def test_a_sqlite_writer_waits_for_another_instead_of_failing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'busy.db'}"
    first, second = make_engine(url), make_engine(url)  # as the API and a worker would
    with first.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE counter (n INTEGER)")
    holder = first.raw_connection()
    holder.cursor().execute("BEGIN IMMEDIATE")
    holder.cursor().execute("INSERT INTO counter VALUES (1)")
    release = threading.Timer(0.5, holder.commit)
    release.start()
    started = time.monotonic()
    with second.begin() as connection:  # blocks on the write lock until the commit
        connection.exec_driver_sql("INSERT INTO counter VALUES (2)")
    waited = time.monotonic() - started
    release.join()
    holder.close()
    assert waited >= 0.3
    with second.connect() as connection:
        assert connection.exec_driver_sql("SELECT n FROM counter ORDER BY n").scalars().all() == [
            1,
            2,
        ]
    # Readers do not block writers: the WAL file beside the database is in use.
    assert (tmp_path / "busy.db-wal").exists()
    first.dispose()
    second.dispose()


def _asft(
    *args: str, data_dir: Path, timeout_s: float = 60, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run ``asft`` in a clean environment: only ASFT_DATA_DIR and ``env`` set, no ``.env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ASFT_")}
    return subprocess.run(
        [str(ASFT), *args],
        env={**clean, "ASFT_DATA_DIR": str(data_dir), **env},
        cwd=data_dir.parent,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def _printed_key(stdout: str) -> str:
    keys = [line.strip() for line in stdout.splitlines() if line.strip().startswith("asft-")]
    assert len(keys) == 1, stdout
    return keys[0]


def test_cli_db_upgrade(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"  # not there yet: the command creates it
    result = _asft("db", "upgrade", data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"database at revision {head_revision()}"
    url = f"sqlite:///{data_dir / 'asft.db'}"
    assert current_revision(engine_for(url)) == head_revision()
    again = _asft("db", "upgrade", data_dir=data_dir)
    assert again.returncode == 0 and again.stdout == result.stdout


@pytest.mark.parametrize("folder_exists", [True, False], ids=["empty-folder", "no-folder"])
def test_cli_api_refuses_an_unmigrated_database(tmp_path: Path, folder_exists: bool) -> None:
    data_dir = tmp_path / "data"
    if folder_exists:
        data_dir.mkdir()
    result = _asft("api", "--port", "1", data_dir=data_dir, timeout_s=30)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "`asft db upgrade`" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (data_dir / "api-key").exists()


def test_cli_api_refuses_an_unreachable_database(tmp_path: Path) -> None:
    result = _asft(
        "api",
        data_dir=tmp_path / "data",
        timeout_s=30,
        ASFT_DATABASE_URL="postgresql+psycopg://postgres@127.0.0.1:1/nowhere",
    )
    assert result.returncode == 2
    assert "database unreachable" in result.stderr
    assert "Traceback" not in result.stderr


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_cli_api_serves_and_bootstraps_the_default_team(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    assert _asft("db", "upgrade", data_dir=data_dir).returncode == 0
    port = _free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ASFT_")}
    server = subprocess.Popen(
        [str(ASFT), "api", "--port", str(port)],
        env={**clean, "ASFT_DATA_DIR": str(data_dir), "ASFT_LOG_LEVEL": "WARNING"},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert server.stdout is not None
        first = server.stdout.readline()
        assert first.startswith("created team 'default'"), first
        key = server.stdout.readline().strip()
        assert key == (data_dir / "api-key").read_text().strip()
        deadline = time.monotonic() + 30
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except httpx.TransportError:
                assert server.poll() is None, "the server exited"
                assert time.monotonic() < deadline, "the server did not start in 30 s"
                time.sleep(0.2)
        assert health.json() == {"status": "ok"}
        files = httpx.get(f"http://127.0.0.1:{port}/v1/files", headers=auth(key), timeout=5)
        assert files.status_code == 200, files.text
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10)
        assert ready.status_code == 200, ready.text
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_cli_create_team_prints_a_working_key(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    assert _asft("db", "upgrade", data_dir=data_dir).returncode == 0
    result = _asft("admin", "create-team", "research", data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    assert "(research)" in result.stdout
    key = _printed_key(result.stdout)

    settings = Settings(_env_file=None, data_dir=data_dir)
    with TestClient(create_app(settings)) as client:
        assert client.get("/v1/files", headers=auth(key)).status_code == 200
        assert client.get("/v1/files", headers=auth(key[:-1])).status_code == 401

    duplicate = _asft("admin", "create-team", "research", data_dir=data_dir)
    assert duplicate.returncode == 1
    assert "exists" in duplicate.stderr and "asft-" not in duplicate.stdout


@pytest.mark.parametrize("name", ["has space", "a:b", ""])
def test_cli_create_team_refuses_names_the_api_refuses(tmp_path: Path, name: str) -> None:
    data_dir = tmp_path / "data"
    result = _asft("admin", "create-team", name, data_dir=data_dir)
    assert result.returncode == 1
    assert "invalid team name" in result.stderr
    assert "asft-" not in result.stdout
    assert not data_dir.exists()  # refused before the database is opened


def test_cli_create_team_on_an_unmigrated_database(tmp_path: Path) -> None:
    result = _asft("admin", "create-team", "research", data_dir=tmp_path / "data")
    assert result.returncode == 2
    assert "`asft db upgrade`" in result.stderr
    assert "Traceback" not in result.stderr
