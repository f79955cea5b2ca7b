"""Torch's thread count: the cores a process importing ``asft_core`` may use, not the host's."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = "import os, asft_core, torch; print(os.environ['OMP_NUM_THREADS'], torch.get_num_threads())"


def _probe(**env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    result = subprocess.run(
        [sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_the_default_is_the_cores_this_process_may_use() -> None:
    cores = len(os.sched_getaffinity(0))
    # Under the cgroup quota, if the machine sets one; never more than the affinity.
    threads, torch_threads = _probe()
    assert 1 <= int(threads) <= cores
    assert int(torch_threads) == int(threads)  # torch read it when it loaded


def test_a_setting_already_in_the_environment_wins() -> None:
    assert _probe(OMP_NUM_THREADS="1") == ["1", "1"]
