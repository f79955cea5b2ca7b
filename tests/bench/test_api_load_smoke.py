"""``bench/api_load.py`` end to end, bounded: one-second wrk runs on two training jobs.

It asserts that the bench completes and prints a row for every endpoint, mode and connection
count; that no answer was other than 2xx or 304 (a load bench whose requests fail measures
nothing); that the conditional rows really get 304s while the plain ones never do (so the lua
script sends back the ETags it got); and that the writer trained the polled jobs meanwhile.
No timing is asserted: figures on a shared CI machine mean nothing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import PG_SERVER, REPO_ROOT, require_service

ROWS = {
    ("bare", "plain"),
    ("get_job", "plain"),
    ("get_job", "if-none-match"),
    ("list_events", "plain"),
    ("list_events", "if-none-match"),
    ("list_jobs", "plain"),
}
CONNECTIONS = (2, 64)
# Columns of a row: endpoint, mode, conns, req/s, p50, p99, 304s, cpu ms/req, db ms/req,
# jobs@1Hz/proc, bad, sock err, bytes.
REQUESTS_PER_S, SHARE_304, BAD = 3, 6, 10


def _require_postgres() -> None:
    import psycopg

    plain = PG_SERVER.replace("postgresql+psycopg://", "postgresql://")
    try:
        psycopg.connect(f"{plain}/postgres", connect_timeout=3).close()
    except psycopg.OperationalError as error:
        require_service(f"PostgreSQL not reachable: {error}")


@pytest.mark.slow
def test_api_load_bench_polls_training_jobs_and_gets_304s_only_when_conditional() -> None:
    if shutil.which("wrk") is None:
        require_service("wrk is not installed (make setup-tools, or apt-get install -y wrk)")
    _require_postgres()
    command = [sys.executable, "bench/api_load.py", "--duration", "1", "--warmup", "1"]
    command += ["--connections", *map(str, CONNECTIONS), "--jobs", "10", "--events", "10"]
    command += ["--training-jobs", "2", "--step-s", "0.5", "--pg-server", PG_SERVER]
    completed = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=280, check=False
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output

    rows = {
        (fields[0], fields[1], int(fields[2])): fields
        for fields in (line.split() for line in completed.stdout.splitlines())
        if len(fields) > BAD and (fields[0], fields[1]) in ROWS and fields[2].isdigit()
    }
    assert set(rows) == {(*row, count) for row in ROWS for count in CONNECTIONS}, output
    for (name, mode, count), fields in rows.items():
        where = f"{name} {mode} at {count} connections"
        assert float(fields[REQUESTS_PER_S]) > 0, f"{where} served nothing:\n{output}"
        assert int(fields[BAD]) == 0, f"{where} answered neither 2xx nor 304:\n{output}"
        share_304 = int(fields[SHARE_304].rstrip("%"))
        if mode == "plain":
            assert share_304 == 0, f"{where} got 304s without If-None-Match:\n{output}"
        else:
            assert share_304 > 0, f"{where} never got a 304:\n{output}"

    writer = re.search(r"^writer: (\d+) steps", completed.stdout, re.MULTILINE)
    assert writer is not None and int(writer[1]) > 0, f"the writer trained nothing:\n{output}"
    assert "target 0 answers neither 2xx nor 304: 0: MET" in completed.stdout, output
    assert re.search(r"^target get_job p99 <= 50 ms at 64 connections: ", completed.stdout, re.M)
