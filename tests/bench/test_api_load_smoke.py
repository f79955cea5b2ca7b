"""``bench/api_load.py`` end to end, bounded: one-second wrk runs at few connections.

It asserts that the bench completes, prints a row for every endpoint at every connection
count, and that the API answered every request with a 2xx (a load bench whose requests fail
measures nothing). No timing is asserted: figures on a shared CI machine mean nothing.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.conftest import PG_SERVER, REPO_ROOT, require_service

ENDPOINTS = ("bare", "get_job", "list_jobs", "list_events")
CONNECTIONS = (2, 8)
# Columns of a row: endpoint, conns, req/s, p50, p99, vs bare, cpu ms/req, non-2xx, sock err.
NON_2XX_COLUMN = 7


def _require_postgres() -> None:
    import psycopg

    plain = PG_SERVER.replace("postgresql+psycopg://", "postgresql://")
    try:
        psycopg.connect(f"{plain}/postgres", connect_timeout=3).close()
    except psycopg.OperationalError as error:
        require_service(f"PostgreSQL not reachable: {error}")


@pytest.mark.slow
def test_api_load_bench_completes_and_the_api_answers_2xx() -> None:
    if shutil.which("wrk") is None:
        require_service("wrk is not installed (Debian/Ubuntu: apt-get install -y wrk)")
    _require_postgres()
    command = [sys.executable, "bench/api_load.py", "--duration", "1", "--warmup", "1"]
    command += ["--connections", *map(str, CONNECTIONS), "--jobs", "12", "--events", "10"]
    command += ["--pg-server", PG_SERVER]
    completed = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=280, check=False
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output

    rows = {
        (fields[0], int(fields[1])): fields
        for fields in (line.split() for line in completed.stdout.splitlines())
        if len(fields) > NON_2XX_COLUMN and fields[0] in ENDPOINTS and fields[1].isdigit()
    }
    assert set(rows) == {(name, count) for name in ENDPOINTS for count in CONNECTIONS}, output
    for (name, count), fields in rows.items():
        assert float(fields[2]) > 0, f"{name} at {count} connections served nothing:\n{output}"
        if name != "bare":
            assert int(fields[NON_2XX_COLUMN]) == 0, f"{name} answered non-2xx:\n{output}"
