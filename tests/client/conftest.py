"""The embedded service the client-side tests share, one per test module."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from asft_core.zoo import ZooPaths
from tests.client.embedded import Service, asft
from tests.conftest import REPO_ROOT, free_port, wait_until_answering


def run_service(
    folder: Path, cache_dir: Path, serve_args: Sequence[str] = (), **settings: str
) -> Iterator[Service]:
    """``asft serve`` (with ``serve_args``) on a spare port with its data in ``folder``,
    ``settings`` (ASFT_*) added; stopped when the generator closes."""
    data_dir = folder / "data"
    admin_key = secrets.token_urlsafe(16)
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("ASFT_")},
        "ASFT_DATA_DIR": str(data_dir),
        "ASFT_CACHE_DIR": str(cache_dir / "service"),
        "ASFT_ADMIN_KEY": admin_key,
        "ASFT_DEVICE": "cpu",
        "ASFT_EVAL_MAX_PROMPTS": "8",
        "ASFT_CHECKPOINT_EVERY_STEPS": "2",
        "ASFT_LOG_LEVEL": "WARNING",
        "ASFT_INFERENCE_URL": f"http://127.0.0.1:{free_port()}",
        "OMP_NUM_THREADS": "1",
        **settings,
    }
    log = (folder / "serve.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "asft.cli", "serve", "--port", str(port), *serve_args],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    wait_until_answering(f"{url}/readyz", process, folder / "serve.log", timeout_s=120)
    team_key = (data_dir / "api-key").read_text().strip()
    try:
        yield Service(url, data_dir, admin_key, team_key, env["ASFT_INFERENCE_URL"])
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, zoo: ZooPaths
) -> Iterator[Service]:
    """``asft serve`` on a spare port with a data folder of its own; stopped at the end."""
    yield from run_service(tmp_path_factory.mktemp("embedded"), cache_dir)


@pytest.fixture(scope="module")
def registered(service: Service, zoo: ZooPaths) -> str:
    """The zoo pair registered through ``asft models register`` with the admin key."""
    result = asft(
        service,
        "models",
        "register",
        "--aligned",
        str(zoo.aligned),
        "--base",
        str(zoo.base),
        "--id",
        "tiny-chat",
        "--eval-suite",
        str(zoo.eval_suite),
        env=service.env(ASFT_ADMIN_KEY=service.admin_key),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("tiny-chat")
    return "tiny-chat"
