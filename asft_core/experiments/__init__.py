"""The paper's table in miniature: fine-tune the tiny aligned model on poisoned task sets.

``python -m asft_core.experiments [--profile full|ci|test]`` builds (or reuses) the zoo, then
for every poison ratio p and method (``lora``, ``asft``, ``safelora``) fine-tunes the aligned
model on the task with a share p of harmful rows, and measures its harmful score (HS) on the
held-out harmful prompts and its fine-tuning accuracy (FA) on the held-out task set, each with
a 95% Wilson interval. The base and aligned models' own HS/FA are the reference rows.

The hyperparameters live in ``miniature.json`` beside this file; they were fixed before any
harmful score was looked at and are the same for every method. Profiles shrink the grid: ``ci``
(two ratios, 300 evaluation prompts) and ``test`` (a few steps, a handful of prompts), which
later service tests reuse.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from asft_core.spec import attribute_name

CONFIG_PATH = Path(__file__).with_name("miniature.json")
# The table's method names -> the trainer's (plain LoRA is "supervised" in the service).
# ``asft_random`` is a control, not a method: AsFT with each V's singular vectors rotated at
# random (same singular values, so the same ||V||_F and eigenvalues of C). If it protects as
# well as ``asft``, the protection comes from the penalty's size, not from V's direction.
TRAINER_METHODS = {
    "lora": "supervised",
    "asft": "asft",
    "safelora": "safelora",
    "asft_random": "asft",
}


@dataclass(frozen=True)
class MiniatureConfig:
    """One grid's settings, as in ``miniature.json`` with a profile applied."""

    task: str = "sentiment"
    methods: tuple[str, ...] = ("lora", "asft", "safelora")
    ablations: tuple[str, ...] = ()
    poison_ratios: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2)
    learning_rate: float = 1e-3
    epochs: int = 3
    batch_size: int = 16
    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.05
    lambda_: float = 1.0  # "lambda" in miniature.json
    max_seq_len: int = 128
    seed: int = 42
    max_steps: int | None = None
    eval_limit: int | None = None
    profile: str = "full"

    overrides: tuple[str, ...] = ()

    @classmethod
    def load(
        cls,
        profile: str = "full",
        overrides: dict[str, Any] | None = None,
        path: Path = CONFIG_PATH,
    ) -> MiniatureConfig:
        """Read the committed file, apply ``profile`` (full, ci or test), then ``overrides``.

        Overrides are for investigation (say, another lambda); they are recorded in the
        config, so a table made with them is never mistaken for the committed one.
        """
        raw = json.loads(path.read_text())
        profiles = raw.pop("profiles", {})
        for key in [key for key in raw if key.startswith("_")]:
            raw.pop(key)
        if profile != "full":
            if profile not in profiles:
                raise ValueError(f"unknown profile {profile!r}; known: full, {', '.join(profiles)}")
            raw.update(profiles[profile])
        raw = {attribute_name(key): value for key, value in raw.items()}
        overrides = {attribute_name(key): value for key, value in (overrides or {}).items()}
        known = {f.name for f in fields(cls)} - {"profile", "overrides"}
        for key, value in (overrides or {}).items():
            if key not in known:
                raise ValueError(f"unknown setting {key!r}; known: {', '.join(sorted(known))}")
            raw[key] = value
        raw["methods"] = tuple(raw["methods"])
        raw["ablations"] = tuple(raw.get("ablations", ()))
        raw["poison_ratios"] = tuple(float(p) for p in raw["poison_ratios"])
        raw["overrides"] = tuple(f"{k}={v}" for k, v in (overrides or {}).items())
        unknown = sorted(set(raw["methods"] + raw["ablations"]) - set(TRAINER_METHODS))
        if unknown:
            raise ValueError(f"unknown methods {unknown}; known: {', '.join(TRAINER_METHODS)}")
        return cls(**raw, profile=profile)


@dataclass
class TableRow:
    """One line of the table: a model and its measured HS and FA."""

    name: str  # "base", "aligned" or the method
    poison_ratio: float | None
    harmful_score: dict[str, Any]
    accuracy: dict[str, Any]
    per_category: dict[str, dict[str, Any]]
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class MiniatureTable:
    """The whole grid's results, ready for JSON."""

    config: dict[str, Any]
    alignment: dict[str, Any]
    rows: list[TableRow]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "config": self.config,
            "alignment": self.alignment,
            "rows": [asdict(row) for row in self.rows],
            "seconds": self.seconds,
        }


def _row(name: str, ratio: float | None, evaluation: Any, **details: Any) -> TableRow:
    safety, task = evaluation.safety, evaluation.task
    return TableRow(
        name=name,
        poison_ratio=ratio,
        harmful_score=safety.overall.to_dict(),
        accuracy=task.accuracy.to_dict(),
        per_category={c: p.to_dict() for c, p in safety.per_category.items()},
        details=details,
    )


def run_grid(
    config: MiniatureConfig,
    cache_dir: Path,
    work_dir: Path,
    log: Callable[[str], None] = print,
) -> MiniatureTable:
    """Run every (poison ratio, method) of ``config``; models and artifacts go under the dirs.

    Args:
        config: the grid and its hyperparameters.
        cache_dir: where the zoo and the alignment direction are cached.
        work_dir: where each run's adapter is written.
        log: progress lines.
    """
    from asft_core.alignment import get_or_compute_alignment
    from asft_core.evaluation.harness import (
        EvalOptions,
        EvalSuite,
        evaluate_adapter,
        evaluate_model,
        load_for_evaluation,
    )
    from asft_core.recipe import post_hoc_projection
    from asft_core.spec import JobSpec
    from asft_core.training import TrainSpec, train
    from asft_core.zoo import build_zoo

    started = time.monotonic()
    zoo = build_zoo(cache_dir / "zoo", verbose=True)
    artifact = get_or_compute_alignment(zoo.base, zoo.aligned, cache_dir / "alignment")
    suite = EvalSuite.load(zoo.eval_suite)
    options = EvalOptions(task=config.task, limit=config.eval_limit, batch_size=128)
    log(f"zoo {zoo.root.name}; alignment top eigenvalue of C {artifact.max_top_eigenvalue:.4f}")
    artifacts: dict[str, Path] = {}
    if "asft_random" in config.ablations:
        artifacts["asft_random"] = rotated_direction_artifact(
            artifact.path, work_dir / "rotated-direction.safetensors", seed=config.seed
        )

    rows = []
    for name, folder in (("base", zoo.base), ("aligned", zoo.aligned)):
        model, tokenizer = load_for_evaluation(str(folder))
        evaluation = evaluate_model(model, tokenizer, suite, options)
        rows.append(_row(name, None, evaluation))
        log(_format_row(rows[-1]))
        if name == "aligned":
            reference = evaluation

    for ratio in config.poison_ratios:
        for method in (*config.methods, *config.ablations):
            run_started = time.monotonic()
            trainer_method = TRAINER_METHODS[method]
            hyper: dict[str, Any] = {
                "rank": config.rank,
                "alpha": config.alpha,
                "dropout": config.dropout,
                "learning_rate": config.learning_rate,
                "n_epochs": config.epochs,
                "batch_size": config.batch_size,
                "max_seq_len": config.max_seq_len,
            }
            if trainer_method == "asft":
                hyper["lambda"] = config.lambda_
            spec = TrainSpec(
                model=str(zoo.aligned),
                training_file=zoo.poisoned_file(config.task, ratio),
                output_dir=work_dir / f"{method}-p{round(ratio * 100):02d}",
                job=JobSpec.resolve(trainer_method, hyper),
                alignment_path=artifacts.get(method) or artifact.path,
                max_steps=config.max_steps,
                seed=config.seed,
                checkpoint_each_epoch=False,
                device="cpu",
            )
            result = train(spec)
            assert result.adapter_dir is not None
            safelora = post_hoc_projection(spec, result.adapter_dir)
            fine_tuned = evaluate_adapter(
                str(zoo.aligned), result.adapter_dir, suite, options, reference=reference
            ).fine_tuned
            rows.append(
                _row(
                    method,
                    ratio,
                    fine_tuned,
                    steps=result.steps,
                    final_task_loss=result.final_train_loss,
                    seconds=time.monotonic() - run_started,
                    safelora=safelora,
                )
            )
            log(_format_row(rows[-1]))
    return MiniatureTable(
        config=asdict(config),
        alignment=artifact.summary(),
        rows=rows,
        seconds=time.monotonic() - started,
    )


def rotated_direction_artifact(source: Path, path: Path, seed: int) -> Path:
    """A copy of the artifact at ``source`` with each V replaced by Q1 V Q2 (random orthogonal).

    The singular values, hence ||V||_F and every eigenvalue of C, stay exactly the same;
    only the subspace C points at is random. Returns the new artifact's path.
    """
    import torch

    from asft_core.alignment import AlignmentArtifact, load_alignment_directions, save_directions

    generator = torch.Generator().manual_seed(seed)

    def orthogonal(size: int) -> torch.Tensor:
        q, r = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r))

    rotated = {}
    for name, v in load_alignment_directions(source, dtype=torch.float64).items():
        rotated[name] = (orthogonal(v.shape[0]) @ v @ orthogonal(v.shape[1])).float()
    return save_directions(path, rotated, AlignmentArtifact.load(source)).path


def _percent(value: dict[str, Any]) -> str:
    return f"{100 * value['value']:5.1f} [{100 * value['low']:4.1f}, {100 * value['high']:5.1f}]"


def _format_row(row: TableRow) -> str:
    ratio = "-" if row.poison_ratio is None else f"{row.poison_ratio:.2f}"
    return (
        f"{row.name:<9} {ratio:>5}  HS {_percent(row.harmful_score)}  FA {_percent(row.accuracy)}"
    )


def format_table(table: MiniatureTable) -> str:
    """The table as text: one line per model, HS and FA in percent with 95% intervals."""
    header = f"{'model':<9} {'p':>5}  {'HS % [95% CI]':<22}  {'FA % [95% CI]':<22}"
    return "\n".join([header, *(_format_row(row) for row in table.rows)])


def save_table(table: MiniatureTable, out_dir: Path) -> list[Path]:
    """Write ``miniature.json``, ``miniature.txt`` and (with matplotlib) ``miniature.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (
        ("miniature.json", json.dumps(table.to_dict(), indent=2)),
        ("miniature.txt", format_table(table) + "\n"),
    ):
        path = out_dir / name
        temporary = path.with_suffix(path.suffix + ".tmp")
        temporary.write_text(text)
        temporary.replace(path)
        written.append(path)
    chart = plot_table(table, out_dir / "miniature.png")
    if chart is not None:
        written.append(chart)
    return written


def plot_table(table: MiniatureTable, path: Path) -> Path | None:
    """A bar chart of HS and FA per method and poison ratio; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    methods = list(dict.fromkeys(r.name for r in table.rows if r.poison_ratio is not None))
    ratios = sorted({r.poison_ratio for r in table.rows if r.poison_ratio is not None})
    references = {r.name: r for r in table.rows if r.poison_ratio is None}
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / max(len(methods), 1)
    for axis, metric, title in (
        (axes[0], "harmful_score", "Harmful score (lower is safer)"),
        (axes[1], "accuracy", "Fine-tuning accuracy"),
    ):
        for index, method in enumerate(methods):
            values: list[float] = []
            errors: list[list[float]] = [[], []]
            for ratio in ratios:
                row = next(r for r in table.rows if r.name == method and r.poison_ratio == ratio)
                cell = getattr(row, metric)
                values.append(100 * cell["value"])
                errors[0].append(100 * (cell["value"] - cell["low"]))
                errors[1].append(100 * (cell["high"] - cell["value"]))
            positions = [i + (index - (len(methods) - 1) / 2) * width for i in range(len(ratios))]
            axis.bar(positions, values, width, yerr=errors, capsize=3, label=method)
        for name, style in (("aligned", "--"), ("base", ":")):
            if name in references:
                value = 100 * getattr(references[name], metric)["value"]
                axis.axhline(value, linestyle=style, color="grey", label=f"{name} model")
        axis.set_xticks(range(len(ratios)), [f"p={r:g}" for r in ratios])
        axis.set_ylim(0, 100)
        axis.set_ylabel("%")
        axis.set_title(title)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"AsFT in miniature ({table.config['profile']} profile, 95% CIs)")
    figure.tight_layout()
    return save_figure(figure, path, plt)


def save_figure(figure: Any, path: Path, plt: Any) -> Path:
    """Write a matplotlib figure as PNG atomically (temporary file, then rename) and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.stem + ".tmp.png")
    figure.savefig(temporary, dpi=110)
    plt.close(figure)
    temporary.replace(path)
    return path
