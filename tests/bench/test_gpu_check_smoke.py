"""bench/gpu_check.py runs its whole path on a CPU at small shapes, so it cannot rot before a
GPU is available; its figures there are not GPU figures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT


@pytest.mark.slow
def test_the_gpu_check_runs_end_to_end_on_a_cpu(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    out = tmp_path / "figures.json"
    argv = ["--device", "cpu", "--hidden", "256", "--layers", "1", "--steps", "1"]
    assert gpu_check.main([*argv, "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    resume = figures["train_and_resume"]
    assert resume["device_event"] == "Training on cpu, base weights in bfloat16"
    assert resume["bit_identical"], resume
    shapes = figures["seven_b_shapes"]
    assert shapes["step_s_asft"] > 0 and shapes["plan_bytes"] > 0
    assert "plan_error" not in shapes  # no allocator statistics on a CPU
    assert gpu_check.main(["--device", "cuda"]) == 2  # none here: said, not faked
