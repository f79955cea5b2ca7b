"""AsFT core: the pure fine-tuning library behind AsFT Service.

This package imports nothing heavy at import time, so that its stdlib-only modules
(``asft_core.formats``) can be shared by the API, the CLI and the worker. Import the
submodules you need: ``asft_core.alignment``, ``asft_core.penalty``, ``asft_core.training``...
"""

import os
from pathlib import Path

__version__ = "0.1.0"


def _cpu_budget() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota."""
    affinity = getattr(os, "sched_getaffinity", None)  # Linux only
    cores = len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cores


# Set before torch loads OpenMP (its submodules import torch after this runs): the pool is
# the cores this process may use (a container's quota), not the host's. A value already in
# the environment wins. OpenMP's wait policy is left alone: sleeping idle threads
# (OMP_WAIT_POLICY=PASSIVE) keep two torch processes on the same cores from spinning
# against each other, but cost a process alone 1.8x on the zoo's models (bench/threads.py).
os.environ.setdefault("OMP_NUM_THREADS", str(_cpu_budget()))
