"""Torch's thread settings: every process importing ``asft_core`` shares the cores politely."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = (
    "import os, asft_core, torch; "
    "print(os.environ['OMP_WAIT_POLICY'], os.environ['OMP_NUM_THREADS'], torch.get_num_threads())"
)


def _probe(**env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    result = subprocess.run(
        [sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_defaults_are_the_cores_this_process_may_use_and_passive_waits() -> None:
    cores = len(os.sched_getaffinity(0))
    # Under the cgroup quota, if the machine sets one; never more than the affinity.
    policy, threads, torch_threads = _probe()
    assert policy == "PASSIVE"
    assert 1 <= int(threads) <= cores
    assert int(torch_threads) == int(threads)  # torch read it when it loaded


def test_settings_already_in_the_environment_win() -> None:
    assert _probe(OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="1") == ["ACTIVE", "1", "1"]
