"""The README's walk-through, run as written: the newcomer's script (``make try``).

The block after ``<!-- walkthrough -->`` runs in bash (``-euo pipefail``) in a fresh folder,
where ``.venv`` is this checkout's and ``var/`` starts empty; only ``ASFT_CACHE_DIR`` points at
the tests' zoo cache, so the pair is not built again. Any command that fails fails the test.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

WALKTHROUGH = re.compile(r"<!-- walkthrough -->\n```bash\n(.*?)```", re.DOTALL)
PORT = 8000  # the README's: the walk-through names no other


def walkthrough(readme: Path = REPO_ROOT / "README.md") -> str:
    """The walk-through's commands, as the README shows them."""
    found = WALKTHROUGH.search(readme.read_text())
    assert found is not None, "README.md has no <!-- walkthrough --> bash block"
    return found.group(1)


def test_the_readme_names_its_walkthrough() -> None:
    script = walkthrough()
    assert "asft serve" in script and 'kill "$SERVE"' in script
    # Ids are captured, never pasted: no placeholder of an id is left in the commands.
    assert not re.search(r"(file|ftjob)-\.\.\.", script)


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        # As a server binds: connections closed a moment ago (TIME_WAIT) do not hold the port.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.mark.timeout(900)  # a whole job: training, then 3,600 evaluation prompts
def test_the_walkthrough_runs_as_written(tmp_path: Path, cache_dir: Path) -> None:
    if not _port_free(PORT):
        pytest.fail(f"port {PORT} is taken: the walk-through serves there")
    (tmp_path / ".venv").symlink_to(REPO_ROOT / ".venv")
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("ASFT_") and key != "VIRTUAL_ENV"
    }
    env["ASFT_CACHE_DIR"] = str(cache_dir)
    process = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", walkthrough()],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # so whatever it leaves running is stopped below
    )
    try:
        output, _ = process.communicate(timeout=840)
        assert process.returncode == 0, output
        # The last command asked asft serve to stop: it stops its children, then says so.
        log = tmp_path / "var" / "serve.log"
        deadline = time.monotonic() + 60
        while "asft serve: stopped" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "asft serve: stopped" in log.read_text(), "asft serve did not stop"
        assert _port_free(PORT)
    finally:
        with contextlib.suppress(ProcessLookupError):  # nothing of it left: nothing to stop
            os.killpg(process.pid, signal.SIGKILL)
    # The scan's summary, the watched job's verdict, the chat's answer, the adapter.
    assert "safety scan: 50 of 1000 rows flagged" in output, output
    assert "safety gate: approved" in output, output
    adapter = tmp_path / "var" / "adapter" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert (tmp_path / "var" / "api-key").is_file()
