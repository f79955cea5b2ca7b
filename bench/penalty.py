"""AsFT penalty: the reference formula (C materialised) vs ours, forward + backward.

The reference precomputes C = V V^T / ||V||_F once per module (d x d) and evaluates
||(I - C) B A||_F^2 each step; ours never forms a d x d matrix. Both are timed in one run,
interleaved, on the same inputs (median of --reps). Peak memory of one forward + backward is
measured in a fresh subprocess per variant: the resident-set high-water mark is reset after
the inputs exist, so only the penalty's own allocations count. Target: >= 50x faster at
d = 4096, r = 8.

    python bench/penalty.py [--dims 1024 4096] [--rank 8] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from asft_core.penalty import asft_penalty, asft_penalty_low_rank, low_rank_direction

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def make_inputs(dim: int, rank: int) -> Inputs:
    """A: (r, d), B: (d, r) with gradients, and V: (d, d), all float32."""
    generator = torch.Generator().manual_seed(0)
    lora_a = torch.randn(rank, dim, generator=generator).requires_grad_()
    lora_b = torch.randn(dim, rank, generator=generator).requires_grad_()
    direction = torch.randn(dim, dim, generator=generator) / dim
    return lora_a, lora_b, direction


def variants(inputs: Inputs) -> dict[str, Callable[[], None]]:
    """Each variant runs one forward + backward; per-module setup happens here, untimed."""
    lora_a, lora_b, direction = inputs
    norm = torch.linalg.matrix_norm(direction)
    c = direction @ direction.T / norm
    identity_minus_c = torch.eye(c.shape[0]) - c

    def naive() -> None:
        penalty = torch.linalg.matrix_norm(identity_minus_c @ (lora_b @ lora_a)) ** 2
        penalty.backward()

    def ours() -> None:
        asft_penalty(lora_a, lora_b, direction, norm).backward()

    out: dict[str, Callable[[], None]] = {"naive": naive, "ours": ours}
    for k in (8, 64):
        low_rank = low_rank_direction(direction, k)

        def approx(low_rank: object = low_rank) -> None:
            asft_penalty_low_rank(lora_a, lora_b, low_rank).backward()  # type: ignore[arg-type]

        out[f"low-rank k={k}"] = approx
    return out


def peak_memory_child(dim: int, rank: int, variant: str) -> None:
    """Run in a subprocess: print the RSS growth of one forward + backward, in bytes."""
    inputs = make_inputs(dim, rank)
    run = variants(inputs)[variant]
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    run()
    print(json.dumps({"peak_bytes": (_status_kib("VmHWM") - before) * 1024}))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory(dim: int, rank: int, variant: str) -> int:
    """Peak extra resident memory of ``variant``, measured in a fresh subprocess."""
    result = subprocess.run(
        [sys.executable, __file__, "--child", variant, "--dims", str(dim), "--rank", str(rank)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"])


def time_variants(dim: int, rank: int, reps: int) -> dict[str, float]:
    """Median seconds per forward + backward of each variant, interleaved."""
    inputs = make_inputs(dim, rank)
    runs = variants(inputs)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():  # warm-up
        run()
    for _ in range(reps):
        for name, run in runs.items():
            inputs[0].grad = inputs[1].grad = None
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    """Print time and memory per variant and the ratios against the naive formula."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dims", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        peak_memory_child(args.dims[0], args.rank, args.child)
        return
    print(f"torch={torch.__version__} threads={torch.get_num_threads()} rank={args.rank}")
    print(f"{'d':>5} {'variant':<14} {'ms':>10} {'speedup':>9} {'peak MiB':>9} {'mem ratio':>10}")
    for dim in args.dims:
        times = time_variants(dim, args.rank, args.reps)
        memory = {name: peak_memory(dim, args.rank, name) for name in times}
        for name, seconds in times.items():
            speedup = times["naive"] / seconds
            mem_ratio = memory["naive"] / max(memory[name], 4096)
            print(
                f"{dim:>5} {name:<14} {seconds * 1e3:>10.3f} {speedup:>8.1f}x "
                f"{memory[name] / 2**20:>9.1f} {mem_ratio:>9.1f}x"
            )
    print("speedup and mem ratio: naive / variant (higher is better); target >= 50x at d=4096")


if __name__ == "__main__":
    main()
