"""A worker that cannot use its device stops at start with one line saying why."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ASFT = Path(sys.executable).parent / "asft"


def _start_worker(tmp_path: Path, device: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASFT_")}
    env.update(ASFT_DATA_DIR=str(tmp_path), ASFT_DEVICE=device)
    return subprocess.run(
        [str(ASFT), "worker"], env=env, capture_output=True, text=True, timeout=120
    )


def test_a_gpu_this_host_lacks_stops_the_worker(tmp_path: Path) -> None:
    missing = f"cuda:{torch.cuda.device_count()}"
    result = _start_worker(tmp_path, missing)
    assert result.returncode != 0
    assert f"asft worker: ASFT_DEVICE={missing}:" in result.stderr
    assert "usable CUDA devices" in result.stderr


@pytest.mark.parametrize("device", ["gpu", "cuda:x", ""])
def test_a_malformed_device_is_one_line(tmp_path: Path, device: str) -> None:
    result = _start_worker(tmp_path, device)
    assert result.returncode == 2
    assert result.stderr.startswith(f"asft: ASFT_DEVICE={device!r}:"), result.stderr
    assert "Traceback" not in result.stderr
