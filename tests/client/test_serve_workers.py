"""``asft serve --workers N``: N worker processes, each with its share of the CPU threads,
running N jobs at the same time (what ``make demo`` uses to run its jobs two at a time)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from asft_core.zoo import ZooPaths
from service.supervision import status_path
from tests.client.conftest import run_service
from tests.client.embedded import Service, create_job, first_rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, zoo: ZooPaths
) -> Iterator[Service]:
    """Two workers sharing two threads."""
    folder = tmp_path_factory.mktemp("two-workers")
    yield from run_service(folder, cache_dir, ("--workers", "2"), OMP_NUM_THREADS="2")


def _environment(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().partition("=")[::2] for item in raw if item)


def test_two_workers_each_take_a_job_at_once_with_one_thread_each(
    service: Service, registered: str, zoo: ZooPaths, tmp_path: Path
) -> None:
    children = json.loads(status_path(service.data_dir).read_text())["children"]
    workers = {name: child for name, child in children.items() if name.startswith("worker")}
    assert sorted(workers) == ["worker-1", "worker-2"]
    assert all(child["up"] for child in workers.values())
    assert [_environment(w["pid"])["OMP_NUM_THREADS"] for w in workers.values()] == ["1", "1"]

    training = first_rows(zoo.task_file("sentiment", "train"), tmp_path / "train.jsonl", 300)
    jobs = [
        create_job(service, registered, training, "--epochs", "1", "--batch-size", "4")
        for _ in range(2)
    ]
    headers = {"Authorization": f"Bearer {service.team_key}"}

    def statuses() -> list[str]:
        return [
            httpx.get(f"{service.url}/v1/fine_tuning/jobs/{job}", headers=headers).json()["status"]
            for job in jobs
        ]

    seen_together = False
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        now = statuses()
        seen_together |= now == ["running", "running"]
        if all(status in ("succeeded", "failed", "cancelled") for status in now):
            break
        time.sleep(0.2)
    assert seen_together, "the two jobs never ran at the same time"
    pickers = set()
    for job in jobs:
        events = httpx.get(
            f"{service.url}/v1/fine_tuning/jobs/{job}/events?limit=1000", headers=headers
        ).json()["data"]
        pickers |= {e["message"] for e in events if e["message"].startswith("Picked up by")}
    worker_pids = {str(w["pid"]) for w in workers.values()}
    assert {picker.rsplit(":", 1)[1] for picker in pickers} == worker_pids, pickers
