"""Safety-scan throughput: rows/s of the guard in batches vs one row at a time, as a ratio.

Both scan the same rows of the tiny zoo's poisoned set with the zoo's guard through
``asft_core.scan.scan_examples`` (the worker's path), one after the other, alternating which
goes first over ``--rounds``; the medians are compared. Target: batched / single >= 5 on CPU.

    python bench/scan.py [--rows 512] [--batch-size 64] [--rounds 3] [--cache-dir var/cache]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from asft_core.formats import Example, read_examples
from asft_core.scan import Guard, scan_examples
from asft_core.zoo import build_zoo


def rows_per_second(guard: Guard, examples: list[Example], batch_size: int) -> float:
    """Scan ``examples`` once; the rows scanned per second."""
    started = time.perf_counter()
    scanned = sum(batch.rows for batch in scan_examples(guard, examples, batch_size))
    return scanned / (time.perf_counter() - started)


def main() -> None:
    """Print rows/s of both ways and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache-dir", type=Path, default=Path("var/cache"))
    args = parser.parse_args()
    zoo = build_zoo(args.cache_dir / "zoo", verbose=True)
    guard = Guard(zoo.guard)
    examples = read_examples(zoo.poisoned_file("sentiment", 0.1))[: args.rows]
    rows_per_second(guard, examples[:32], args.batch_size)  # warm-up
    batched: list[float] = []
    single: list[float] = []
    for round_ in range(args.rounds):
        order = (args.batch_size, 1) if round_ % 2 == 0 else (1, args.batch_size)
        for size in order:
            (batched if size > 1 else single).append(rows_per_second(guard, examples, size))
    fast, slow = statistics.median(batched), statistics.median(single)
    print(f"device=cpu torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"rows={len(examples)} rounds={args.rounds}")
    print(f"batched ({args.batch_size}): {fast:9.1f} rows/s")
    print(f"one at a time:  {slow:9.1f} rows/s")
    print(f"ratio: {fast / slow:.1f}x (target >= 5x)")


if __name__ == "__main__":
    main()
