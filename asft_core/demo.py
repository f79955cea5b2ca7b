"""``python -m asft_core.demo``: a short AsFT fine-tune of the tiny zoo model.

Builds (or reuses) the tiny base/aligned pair, computes their alignment direction, writes a
small sentiment-task training file, fine-tunes the aligned model with ``asft`` and prints
the per-step metrics and where the adapter went. Everything stays under ``--data-dir``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from asft_core.zoo import build_zoo
from asft_core.zoo.language import sentiment_row


def write_demo_dataset(path: Path, rows: int, seed: int) -> Path:
    """A prompt/completion JSONL file of the zoo's sentiment task."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(sentiment_row(rng)) + "\n" for _ in range(rows)))
    return path


def main(argv: list[str] | None = None) -> None:
    """Run the demo and print its metrics table."""
    from asft_core.alignment import get_or_compute_alignment
    from asft_core.training import StepMetrics, TrainHooks, TrainSpec, train

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=Path("var"))
    parser.add_argument("--method", default="asft")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args(argv)

    started = time.monotonic()
    cache = args.data_dir / "cache"
    zoo = build_zoo(cache / "zoo")
    artifact = get_or_compute_alignment(zoo.base, zoo.aligned, cache / "alignment")
    print(f"zoo ready: {zoo.root}")
    print(f"alignment direction: {artifact.path.name} ({len(artifact.modules)} modules)")
    dataset = write_demo_dataset(args.data_dir / "demo" / "train.jsonl", rows=256, seed=1)

    print(f"{'step':>5} {'task_loss':>10} {'penalty':>10} {'lr':>9} {'tok/s':>8}")

    def show(metrics: StepMetrics) -> None:
        print(
            f"{metrics.step:>5} {metrics.task_loss:>10.4f} {metrics.penalty:>10.3e} "
            f"{metrics.learning_rate:>9.2e} {metrics.tokens_per_s:>8.0f}"
        )

    spec = TrainSpec(
        model=str(zoo.aligned),
        training_file=dataset,
        output_dir=args.data_dir / "demo" / f"run-{args.method}",
        method=args.method,
        alignment_path=artifact.path,
        learning_rate=args.lr,
        max_steps=args.steps,
        epochs=100,
        batch_size=8,
        checkpoint_each_epoch=False,
        checkpoint_every_steps=max(1, args.steps // 2),
    )
    result = train(spec, TrainHooks(on_metrics=show, on_event=lambda lvl, msg: print(lvl, msg)))
    print(
        f"{result.status}: {result.steps} steps, {result.trained_tokens} tokens, "
        f"adapter at {result.adapter_dir}, {time.monotonic() - started:.1f}s in all"
    )


if __name__ == "__main__":
    main()
