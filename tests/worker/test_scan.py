"""The safety scan in a real worker: flagged lines of an upload, a scan stopped by deleting its
file, and the three data policies end to end through the API."""

from __future__ import annotations

import io
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from asft_core.zoo import ZooPaths
from tests.worker.conftest import create_job, upload_rows, wait_for_job

SMALL_JOB = {"n_epochs": 1, "batch_size": 8, "learning_rate": 1e-3}


def _headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def wait_for_scan(
    client: TestClient, key: str, file_id: str, timeout_s: float = 120
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        scan: dict[str, Any] = client.get(f"/v1/files/{file_id}", headers=_headers(key)).json()[
            "safety_scan"
        ]
        if scan["status"] not in ("pending", "running"):
            return scan
        time.sleep(0.2)
    raise AssertionError(f"the scan of {file_id} did not end in {timeout_s}s")


def poisoned_lines(path: Path, rows: int) -> set[int]:
    """The lines of the zoo's harmful rows (they carry their category) among the first rows."""
    lines = path.read_text().splitlines()[:rows]
    return {i for i, line in enumerate(lines, start=1) if "category" in json.loads(line)}


def all_flags(client: TestClient, key: str, file_id: str, limit: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    after = 0
    while True:
        page = client.get(
            f"/v1/files/{file_id}/safety_scan?after={after}&limit={limit}", headers=_headers(key)
        ).json()
        rows += page["data"]
        if not page["has_more"]:
            return rows
        after = rows[-1]["line"]


def test_an_upload_is_scanned_and_its_flagged_lines_are_the_poisoned_rows(
    client: TestClient,
    team_key: str,
    zoo: ZooPaths,
    start_worker: Callable[[], subprocess.Popen[bytes]],
) -> None:
    start_worker()
    path = zoo.poisoned_file("sentiment", 0.05)
    file_id = upload_rows(client, team_key, path, 1000)
    scan = wait_for_scan(client, team_key, file_id)
    assert scan["status"] == "succeeded" and scan["rows_scanned"] == 1000
    flags = all_flags(client, team_key, file_id, limit=7)  # several pages
    flagged, poisoned = {f["line"] for f in flags}, poisoned_lines(path, 1000)
    assert len(flags) == scan["rows_flagged"] == sum(scan["per_category"].values())
    assert [f["line"] for f in flags] == sorted(flagged)
    assert len(flagged & poisoned) / len(flagged) >= 0.95
    assert len(flagged & poisoned) / len(poisoned) >= 0.95
    assert scan["flagged"] == flags[:10]


def test_deleting_a_file_stops_its_scan(
    client: TestClient,
    team_key: str,
    zoo: ZooPaths,
    tmp_path: Path,
    start_worker: Callable[[], subprocess.Popen[bytes]],
) -> None:
    rows = zoo.poisoned_file("sentiment", 0.1).read_text() * 40  # 40,000 rows
    response = client.post(
        "/v1/files",
        headers=_headers(team_key),
        files={"file": ("big.jsonl", io.BytesIO(rows.encode()))},
        data={"purpose": "fine-tune"},
    )
    big = response.json()["id"]
    start_worker()
    deadline = time.monotonic() + 60
    while (
        client.get(f"/v1/files/{big}", headers=_headers(team_key)).json()["safety_scan"][
            "rows_scanned"
        ]
        == 0
    ):
        assert time.monotonic() < deadline, "the scan never started"
        time.sleep(0.1)
    assert client.delete(f"/v1/files/{big}", headers=_headers(team_key)).status_code == 200
    # The worker stops that scan and takes the next one.
    small = upload_rows(client, team_key, zoo.poisoned_file("sentiment", 0.0), 50)
    assert wait_for_scan(client, team_key, small)["status"] == "succeeded"
    log = (tmp_path / "worker-0.log").read_text()
    stopped = [line for line in log.splitlines() if f"scan of {big} stopped after" in line]
    assert stopped, log[-2000:]
    assert "40000 rows" not in stopped[0]


@pytest.mark.parametrize("mode", ["flag", "drop_flagged", "refuse"])
def test_the_three_data_policies_end_to_end(
    client: TestClient,
    team_key: str,
    zoo: ZooPaths,
    start_worker: Callable[[], subprocess.Popen[bytes]],
    mode: str,
) -> None:
    start_worker()
    path = zoo.poisoned_file("sentiment", 0.05)
    rows = 200
    training = upload_rows(client, team_key, path, rows)
    # Created at once: the job waits in validating_files for the scan.
    job_id = create_job(client, team_key, training, "l2", SMALL_JOB, data_policy={"mode": mode})
    job = wait_for_job(client, team_key, job_id, {"succeeded", "failed", "cancelled"})
    scan = client.get(f"/v1/files/{training}", headers=_headers(team_key)).json()["safety_scan"]
    flagged = {f["line"] for f in all_flags(client, team_key, training, 100)}
    assert scan["rows_flagged"] == len(flagged) > 0
    assert all(1 <= line <= rows for line in flagged)
    if mode == "refuse":
        assert job["status"] == "failed"
        assert job["error"]["code"] == "training_data_unsafe"
        assert job["error"]["param"] == "training_file"
        assert str(min(flagged)) in job["error"]["message"]
        return
    report = client.get(f"/v1/fine_tuning/jobs/{job_id}/report", headers=_headers(team_key))
    assert report.status_code == 200, job
    data = report.json()["report"]["training_data"]
    assert data["flagged"] == len(flagged) and data["rows"] == rows
    assert data["policy"]["mode"] == mode
    notes = report.json()["report"]["gate"]["notes"]
    assert any(f"flagged {len(flagged)} of {rows}" in note for note in notes), notes
    if mode == "drop_flagged":
        assert data["dropped"] == len(flagged)
        assert job["validation"]["training_examples"] == rows - len(flagged)
    else:
        assert data["dropped"] == 0
        assert job["validation"]["training_examples"] == rows
