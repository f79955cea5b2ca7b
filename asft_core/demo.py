"""``python -m asft_core.demo``: one AsFT fine-tune of the tiny zoo model, measured.

Builds (or reuses) the tiny base/aligned pair and its datasets, computes their alignment
direction, fine-tunes the aligned model with ``asft`` on the sentiment set poisoned with 10%
harmful rows, prints the per-step metrics, then evaluates the adapter against the aligned
model (harmful score and task accuracy, 95% intervals). Everything stays under ``--data-dir``.
The whole grid of methods and poison ratios is ``python -m asft_core.experiments``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from asft_core.zoo import build_zoo


def main(argv: list[str] | None = None) -> None:
    """Run the demo and print its metrics and evaluation."""
    from asft_core.alignment import get_or_compute_alignment
    from asft_core.evaluation.harness import EvalOptions, EvalSuite, evaluate_adapter
    from asft_core.recipe import post_hoc_projection
    from asft_core.spec import METHODS, JobSpec
    from asft_core.training import StepMetrics, TrainHooks, TrainSpec, train

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=Path("var"))
    parser.add_argument("--method", default="asft", choices=METHODS)
    parser.add_argument("--poison-ratio", type=float, default=0.1, choices=(0.0, 0.05, 0.1, 0.2))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-prompts", type=int, default=300)
    args = parser.parse_args(argv)

    started = time.monotonic()
    cache = args.data_dir / "cache"
    print("building the tiny zoo (first run only, about 2.5 minutes)...", flush=True)
    zoo = build_zoo(cache / "zoo", verbose=True)
    artifact = get_or_compute_alignment(zoo.base, zoo.aligned, cache / "alignment")
    print(f"zoo ready: {zoo.root}")
    print(
        f"alignment direction: {len(artifact.modules)} modules, top eigenvalue of C "
        f"{artifact.max_top_eigenvalue:.3f}{' (degenerate)' if artifact.degenerate else ''}"
    )
    dataset = zoo.poisoned_file("sentiment", args.poison_ratio)
    print(f"fine-tuning {args.method} on {dataset.name} ({args.poison_ratio:.0%} harmful rows)")
    print(f"{'step':>5} {'train_loss':>10} {'penalty':>10} {'lr':>9} {'tok/s':>8}")

    def show(metrics: StepMetrics) -> None:
        if metrics.step % 5 == 0 or metrics.step == metrics.total_steps:
            print(
                f"{metrics.step:>5} {metrics.train_loss:>10.4f} {metrics.penalty:>10.3e} "
                f"{metrics.learning_rate:>9.2e} {metrics.tokens_per_s:>8.0f}"
            )

    spec = TrainSpec(
        model=str(zoo.aligned),
        training_file=dataset,
        output_dir=args.data_dir / "demo" / f"run-{args.method}",
        job=JobSpec.resolve(
            args.method, {"learning_rate": args.lr, "n_epochs": 50, "batch_size": 16}
        ),
        alignment_path=artifact.path,
        max_steps=args.steps,
        checkpoint_each_epoch=False,
        checkpoint_every_steps=max(1, args.steps // 2),
    )
    result = train(spec, TrainHooks(on_metrics=show, on_event=lambda lvl, msg: print(lvl, msg)))
    print(f"{result.status}: {result.steps} steps, {result.trained_tokens} tokens")
    assert result.adapter_dir is not None
    projected = post_hoc_projection(spec, result.adapter_dir)
    if projected is not None:
        print(f"Safe LoRA projected {len(projected['projected'])} modules")

    suite = EvalSuite.load(zoo.eval_suite)
    report = evaluate_adapter(
        str(zoo.aligned),
        result.adapter_dir,
        suite,
        EvalOptions(task="sentiment", limit=args.eval_prompts, batch_size=128),
    )
    for name, evaluation in (("aligned", report.reference), ("fine-tuned", report.fine_tuned)):
        assert evaluation.safety is not None and evaluation.task is not None
        hs, fa = evaluation.safety.overall, evaluation.task.accuracy
        print(
            f"{name:>10}: harmful score {hs.value:6.1%} [{hs.low:.1%}, {hs.high:.1%}]   "
            f"sentiment accuracy {fa.value:6.1%} [{fa.low:.1%}, {fa.high:.1%}]"
        )
    print(f"adapter at {result.adapter_dir}; {time.monotonic() - started:.1f}s in all")
    print("the paper's whole table in miniature: make miniature")


if __name__ == "__main__":
    main()
