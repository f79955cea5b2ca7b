"""Speedup of batched over one-prompt-at-a-time greedy generation on the tiny zoo model.

Both runs answer the same held-out prompts with the same code (``generate``), once with
``batch_size=1`` and once batched with left padding; they alternate, and the medians are
compared. The answers are checked equal, so the speedup is not bought with different output.
Target: >= 5x.

    python bench/eval.py [--prompts 128] [--batch-size 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from asft_core.evaluation.generation import generate
from asft_core.evaluation.harness import load_for_evaluation
from asft_core.zoo import build_zoo


def main() -> None:
    """Measure and print the ratio."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-dir", type=Path, default=Path("var/cache"))
    args = parser.parse_args()

    zoo = build_zoo(args.cache_dir / "zoo")
    model, tokenizer = load_for_evaluation(str(zoo.aligned))
    lines = (zoo.datasets / "harmful_eval.jsonl").read_text().splitlines()
    lines += (zoo.datasets / "sentiment_eval.jsonl").read_text().splitlines()
    prompts = [json.loads(line)["prompt"] for line in lines[::2][: args.prompts]]

    def timed(batch_size: int) -> tuple[float, list[str]]:
        started = time.perf_counter()
        answers = generate(model, tokenizer, prompts, args.max_new_tokens, batch_size)
        return time.perf_counter() - started, answers

    timed(args.batch_size)  # warm-up
    single, batched = [], []
    for _ in range(args.repeats):
        seconds, reference = timed(1)
        single.append(seconds)
        seconds, answers = timed(args.batch_size)
        batched.append(seconds)
    same = sum(a == b for a, b in zip(answers, reference, strict=True))
    one, many = statistics.median(single), statistics.median(batched)
    print(f"torch={torch.__version__} threads={torch.get_num_threads()} prompts={len(prompts)}")
    print(f"one at a time: {one:.2f}s ({len(prompts) / one:.1f} prompts/s)")
    print(f"batched x{args.batch_size}: {many:.2f}s ({len(prompts) / many:.1f} prompts/s)")
    print(f"identical answers: {same}/{len(prompts)}")
    print(f"speedup batched / one-at-a-time: {one / many:.1f}x (target >= 5x)")


if __name__ == "__main__":
    main()
