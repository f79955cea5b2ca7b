"""What a low-rank AsFT job pays at start: the stored spectrum against an SVD of each V.

Writes an artifact of a few random 4096 x 4096 directions with slowly decaying spectra (so
the randomized SVD has work to do), once with the stored spectrum and once without (as
format-1 artifacts were), then times ``alignment_low_rank`` on each: the first reads each
module's top-k basis, the second reads V and runs an exact SVD, as every start and resume
did before. Also prints what the spectrum adds at cache time and how close the randomized
eigenvalues (randomized beyond 2048 wide) are to the exact ones. Figures: docs/benchmarks.md.

    python bench/low_rank_start.py [--modules 2] [--width 4096] [--rank 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

import asft_core.alignment as alignment
from asft_core.alignment import AlignmentArtifact, alignment_low_rank


def _direction(width: int, seed: int) -> torch.Tensor:
    """Random V with singular values falling off as 1 / sqrt(i + 1)."""
    generator = torch.Generator().manual_seed(seed)
    left = torch.linalg.qr(torch.randn(width, width, generator=generator))[0]
    right = torch.linalg.qr(torch.randn(width, width, generator=generator))[0]
    sigma = 1.0 / torch.arange(1, width + 1, dtype=torch.float32).sqrt()
    return (left * sigma) @ right.T


def main() -> None:
    """Print seconds side by side and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--modules", type=int, default=2)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=64)
    args = parser.parse_args()
    directions = {f"layers.{i}.q_proj": _direction(args.width, i) for i in range(args.modules)}
    like = AlignmentArtifact(
        path=Path("unused"),
        modules=[],
        shapes={},
        dtype="float32",
        target_modules=["q_proj"],
        base_model="bench-base",
        aligned_model="bench-aligned",
        base_fingerprint="-",
        aligned_fingerprint="-",
        stats={},
    )
    with tempfile.TemporaryDirectory() as folder:
        timings = {}
        paths = {}
        for label, rank in (("without spectrum", None), ("with spectrum", alignment.SPECTRUM_RANK)):
            template = replace(
                like,
                path=Path(folder) / f"{label.replace(' ', '-')}.safetensors",
                modules=list(directions),
                shapes={m: list(v.shape) for m, v in directions.items()},
                spectrum_rank=rank,
            )
            started = time.perf_counter()
            alignment._write_artifact(template, iter(directions.items()))
            timings[f"write {label}"] = time.perf_counter() - started
            paths[label] = template.path
        factors = {}
        for label, path in paths.items():
            started = time.perf_counter()
            factors[label] = alignment_low_rank(path, args.rank)
            timings[f"start {label}"] = time.perf_counter() - started
    error = max(
        float(
            (stored.eigenvalues - factors["without spectrum"][name].eigenvalues).abs().max()
            / factors["without spectrum"][name].eigenvalues[0]
        )
        for name, stored in factors["with spectrum"].items()
    )
    print(f"{args.modules} modules of {args.width} x {args.width}, penalty_rank {args.rank}")
    for name, seconds in timings.items():
        print(f"  {name:<26} {seconds:8.2f} s")
    start_ratio = timings["start without spectrum"] / timings["start with spectrum"]
    extra = timings["write with spectrum"] - timings["write without spectrum"]
    print(f"  start: SVD of V / stored spectrum = {start_ratio:.0f}x")
    print(f"  cache time added by the spectrum: {extra / args.modules:.2f} s per module")
    print(f"  stored eigenvalues vs an exact SVD: max error {error:.1e} of lambda_1")


if __name__ == "__main__":
    main()
