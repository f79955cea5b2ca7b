"""A running ``asft serve`` for tests that drive it as users do (the CLI, the dashboard):
its environment, and the CLI run as its own process."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import REPO_ROOT


@dataclass
class Service:
    """A running ``asft serve`` and the environment its CLI users need."""

    url: str
    data_dir: Path
    admin_key: str
    team_key: str
    inference_url: str

    def env(self, **extra: str) -> dict[str, str]:
        """A user's environment: the service's URL and the team key (no server settings)."""
        clean = {k: v for k, v in os.environ.items() if not k.startswith("ASFT_")}
        return {**clean, "ASFT_API_URL": self.url, "ASFT_API_KEY": self.team_key, **extra}


def asft(
    service: Service, *args: str, env: dict[str, str] | None = None, timeout_s: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``asft ARGS`` as its own process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "asft.cli", *args],
        cwd=REPO_ROOT,
        env=env or service.env(),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def create_job(service: Service, model: str, training: Path, *options: str) -> str:
    """``asft jobs create`` of a plain LoRA job on a local file; returns the job's id."""
    command = ["jobs", "create", "--model", model, "--training-file", str(training)]
    created = asft(service, *command, "--method", "supervised", *options, "-q")
    assert created.returncode == 0, created.stderr
    # -q prints the id alone: what JOB=$(asft jobs create ... -q) captures.
    assert created.stdout.count("\n") == 1 and created.stdout.startswith("ftjob-"), created.stdout
    return created.stdout.strip()


def first_rows(source: Path, target: Path, rows: int) -> Path:
    """The first ``rows`` lines of a zoo dataset as a file of its own."""
    target.write_text("".join(source.read_text().splitlines(keepends=True)[:rows]))
    return target


def allow_unapproved_chat(service: Service) -> None:
    """Let the default team chat with adapters the gate refused (the admin's switch)."""
    admin = {"Authorization": f"Bearer {service.admin_key}"}
    teams = httpx.get(f"{service.url}/v1/admin/teams", headers=admin).json()["data"]
    team = next(t for t in teams if t["name"] == "default")
    patched = httpx.patch(
        f"{service.url}/v1/admin/teams/{team['id']}",
        json={"allow_unapproved_chat": True},
        headers=admin,
    )
    assert patched.status_code == 200, patched.text
