"""Shared fixtures. Expensive ones (the tiny zoo) are built once and cached on disk."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from asft_core.zoo import ZooPaths, build_zoo

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """A cache folder that survives between runs (the zoo is built once per checkout)."""
    folder = Path(os.environ.get("ASFT_TEST_CACHE", REPO_ROOT / "var" / "test-cache"))
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


def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database on the shared server, dropped afterwards (a generator)."""
    import psycopg

    name = f"asft_test_{uuid.uuid4().hex[:12]}"
    plain = PG_SERVER.replace("postgresql+psycopg://", "postgresql://")
    try:
        admin = psycopg.connect(f"{plain}/test", autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as error:
        require_service(f"PostgreSQL not reachable: {error}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_SERVER}/{name}"
    finally:
        from api.db.session import engine_for

        engine_for(f"{PG_SERVER}/{name}").dispose()
        with psycopg.connect(f"{plain}/test", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[str]:
    """A Redis server of the test's own, on a spare port in a temp folder (never the shared
    one, since tests flush and restart it); yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        require_service("redis-server is not installed")
    assert binary is not None
    port = free_port()
    folder = tmp_path / "redis"
    folder.mkdir()
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(folder),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)
