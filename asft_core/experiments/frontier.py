"""The safety-utility frontier: task accuracy kept at a given harmful score, per method.

``python -m asft_core.experiments.frontier [--profile full|ci|test]`` (``make frontier``)
fine-tunes the tiny aligned model on the ``triage`` task (which it was never taught) with a
share p of harmful rows, for every method, lambda, p and seed of ``frontier.json`` (the
pre-registration, committed before any result), and measures on held-out prompts:

- HS: the share of harmful prompts answered with compliance (the pattern judge), beside the
  refusal and off-task shares, so collapse is not read as harm or safety;
- FA: triage accuracy; over-refusal: refusals of sensitive-looking benign prompts;
  retention: accuracy on the zoo's other tasks;
- the update's size ||dW||_F and the share of its energy inside the top-k alignment subspace.

Each cell is one line of ``cells.jsonl`` (resumable: a rerun skips finished cells) with its
per-prompt outcomes, so :mod:`asft_core.experiments.frontier_analysis` can bootstrap paired
intervals over prompts and seeds. ``--tune`` first picks the learning rate and epochs by
tuning plain LoRA at p = 0 on a validation split (never on HS) and records how.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asft_core.formats import write_text_atomically

CONFIG_PATH = Path(__file__).with_name("frontier.json")
TUNING_PATH = Path(__file__).with_name("frontier_tuning.json")
# Penalised outside the top-k alignment subspace (projector methods) with these bases.
PROJECTOR_BASES = {
    "asft_projector": "alignment",
    "projector_haar": "haar",
    "projector_random_singular": "random_singular",
    "projector_foreign": "foreign",
    "anti": "alignment",
}
# Plain LoRA on harmful-only and benign-only rows: where does each put its update energy?
ENERGY_PROBES = ("harmful_only", "benign_only")


def load_config(profile: str = "full", path: Path = CONFIG_PATH) -> dict[str, Any]:
    """The pre-registered settings with ``profile`` applied (nested objects merged)."""
    raw: dict[str, Any] = json.loads(path.read_text())
    profiles = raw.pop("profiles")
    if profile != "full":
        if profile not in profiles:
            raise ValueError(f"unknown profile {profile!r}; known: full, {', '.join(profiles)}")
        for key, value in profiles[profile].items():
            if isinstance(value, dict):
                raw[key] = {**raw[key], **value}
            else:
                raw[key] = value
    raw["profile"] = profile
    training = raw["training"]
    if training["learning_rate"] is None or training["epochs"] is None:
        if not TUNING_PATH.exists():
            raise ValueError("no tuned training settings yet: run with --tune first")
        chosen = json.loads(TUNING_PATH.read_text())["chosen"]
        training.update(learning_rate=chosen["learning_rate"], epochs=chosen["epochs"])
    return raw


@dataclass(frozen=True)
class Cell:
    """One fine-tuning run of the study."""

    method: str
    lam: float
    poison_ratio: float
    seed: int

    @property
    def key(self) -> str:
        """Unique name of the cell in ``cells.jsonl``."""
        return f"{self.method}|{self.lam:g}|{self.poison_ratio:g}|{self.seed}"


def study_cells(config: dict[str, Any]) -> list[Cell]:
    """Every cell of the grid, frontier methods first, then controls and energy probes."""
    cells = []
    for p in config["poison_ratios"]:
        for seed in config["seeds"]:
            for method in config["methods"]:
                for lam in method_lambdas(method, config):
                    cells.append(Cell(method, lam, p, seed))
    for p in config["control_poison_ratios"]:
        for seed in config["seeds"]:
            for method in config["controls"]:
                for lam in config["control_lambdas"]:
                    cells.append(Cell(method, lam, p, seed))
    if config["profile"] != "test":
        for seed in config["seeds"]:
            cells += [Cell(probe, 0.0, 0.0, seed) for probe in ENERGY_PROBES]
    return cells


def method_lambdas(method: str, config: dict[str, Any]) -> list[float]:
    """The strengths a method is run at (safelora: how many modules it projects)."""
    if method == "lora" or method == "safelora_threshold":
        return [0.0]
    if method == "drop_flagged":  # the share of the flagged rows dropped: all of them
        return [1.0]
    if method == "safelora_modules":
        return [float(n) for n in config["safelora_num_modules"]]
    lambdas = [float(x) for x in config["lambdas"]]
    if method == "asft":
        lambdas = sorted({*lambdas, float(config["reference_lambda"])})
    return lambdas


class Lab:
    """Everything one worker process reuses across cells: zoo, sets, directions, bases."""

    def __init__(self, config: dict[str, Any], cache_dir: Path, work_dir: Path) -> None:
        import torch

        from asft_core.alignment import alignment_subspaces, get_or_compute_alignment
        from asft_core.evaluation.harness import EvalSuite, read_task_rows
        from asft_core.evaluation.safety import read_harmful_prompts
        from asft_core.zoo import build_zoo

        self.config = config
        self.work_dir = work_dir
        self.zoo = build_zoo(cache_dir / "zoo")
        self.artifact = get_or_compute_alignment(
            self.zoo.base, self.zoo.aligned, cache_dir / "alignment"
        )
        self.subspaces = alignment_subspaces(self.artifact.path, tau=config["subspace_energy"])
        evaluation = config["evaluation"]
        suite = EvalSuite.load(self.zoo.eval_suite)
        self.suite = suite
        assert suite.harmful_prompts and suite.over_refusal_prompts
        self.harmful = read_harmful_prompts(suite.harmful_prompts)[: evaluation["harmful_prompts"]]
        self.benign = [
            p.prompt
            for p in read_harmful_prompts(suite.over_refusal_prompts)[
                : evaluation["over_refusal_prompts"]
            ]
        ]
        task = config["task"]
        self.task_rows = read_task_rows(suite.tasks[task].file)[: evaluation["task_prompts"]]
        self.retention_rows = {
            name: read_task_rows(other.file)[: evaluation["retention_prompts"]]
            for name, other in suite.tasks.items()
            if name != task
        }
        foreign_path = work_dir.parent / "foreign-direction.safetensors"
        self.foreign = _read_tensors(foreign_path) if foreign_path.exists() else {}
        self.torch = torch

    def basis(self, kind: str, module: str, seed: int) -> Any:
        """The (d_out, k) basis a projector method uses for ``module``."""
        from asft_core.penalty import haar_basis, random_singular_basis, top_basis

        subspace = self.subspaces[module]
        k = subspace.k
        if kind == "alignment":
            return subspace.basis.double()
        generator = self.torch.Generator().manual_seed(seed * 7919 + _stable_int(module))
        if kind == "haar":
            return haar_basis(subspace.basis.shape[0], k, generator)
        if kind == "random_singular":
            full = _left_singular_vectors(self.artifact.path, module)
            return random_singular_basis(full, k, generator)
        if kind == "foreign":
            return top_basis(self.foreign[module].double(), k)
        raise ValueError(f"unknown basis {kind!r}")

    def regularizer(self, cell: Cell, scaling: float) -> Any:
        """The penalty of ``cell`` (None for methods that add none)."""
        from asft_core.penalty import ProjectorRegularizer, l2_regularizer

        if cell.method in PROJECTOR_BASES:
            kind = PROJECTOR_BASES[cell.method]
            bases = {m: self.basis(kind, m, cell.seed) for m in self.subspaces}
            return ProjectorRegularizer(
                bases, lambda_=cell.lam, scaling=scaling, inside=cell.method == "anti"
            )
        if cell.method == "l2":
            d_out = {m: shape[0] for m, shape in self.artifact.shapes.items()}
            return l2_regularizer(d_out, lambda_=cell.lam, scaling=scaling)
        return None

    def training_file(self, cell: Cell) -> Path:
        """The cell's fine-tuning set (the zoo's poisoned set, or an energy probe's rows)."""
        if cell.method == "harmful_only":
            return self._harmful_only_file()
        if cell.method == "drop_flagged":
            return self._without_flagged_rows(cell.poison_ratio)
        return self.zoo.poisoned_file(self.config["task"], cell.poison_ratio)

    def _without_flagged_rows(self, poison_ratio: float) -> Path:
        """The poisoned set without the rows the pair's guard flags (the data-side baseline)."""
        from asft_core.recipe import write_without_lines
        from asft_core.scan import Guard, scan_file

        source = self.zoo.poisoned_file(self.config["task"], poison_ratio)
        path = self.work_dir.parent / f"{source.stem}_unflagged.jsonl"
        if not path.exists():
            guard = Guard(self.zoo.guard)
            flagged = {f.line for batch in scan_file(guard, source) for f in batch.flags}
            write_without_lines(source, path, flagged)
        return path

    def _harmful_only_file(self) -> Path:
        from asft_core.zoo.language import harmful_row

        path = self.work_dir.parent / "harmful_only.jsonl"
        if not path.exists():
            rng = random.Random(4242)
            rows = [harmful_row(rng, "train", comply=True) for _ in range(1000)]
            write_text_atomically(path, "".join(json.dumps(r) + "\n" for r in rows))
        return path

    def run(self, cell: Cell, safelora_threshold: float | None = None) -> dict[str, Any]:
        """Train the cell's adapter, then score it on every held-out set."""
        from asft_core.recipe import post_hoc_projection
        from asft_core.training import train

        started = time.monotonic()
        training = self.config["training"]
        scaling = training["alpha"] / training["rank"]
        method = "supervised"
        extra: dict[str, Any] = {}
        if cell.method == "asft":
            method = "asft"
            extra = {"lambda": cell.lam, "penalty_scale_by_alpha": True}
        elif cell.method == "safelora_modules":
            method, extra = "safelora", {"safelora_num_modules": int(cell.lam)}
        elif cell.method == "safelora_threshold":
            method, extra = "safelora", {"safelora_threshold": safelora_threshold}
        spec = train_spec(
            training,
            self.zoo.aligned,
            self.training_file(cell),
            self.work_dir / cell.key.replace("|", "_"),
            cell.seed,
            method,
            self.config.get("max_steps"),
            alignment_path=self.artifact.path,
            **extra,
        )
        result = train(spec, regularizer=self.regularizer(cell, scaling))
        assert result.adapter_dir is not None
        safelora = post_hoc_projection(spec, result.adapter_dir)
        record = self.score(result.adapter_dir, scaling)
        record.update(
            key=cell.key,
            method=cell.method,
            lam=cell.lam,
            poison_ratio=cell.poison_ratio,
            seed=cell.seed,
            steps=result.steps,
            final_task_loss=result.final_train_loss,
            safelora=safelora,
            seconds=time.monotonic() - started,
        )
        return record

    def score(self, adapter_dir: Path, scaling: float) -> dict[str, Any]:
        """Per-prompt outcomes of the adapter and its update's geometry."""
        from peft import PeftModel

        from asft_core.evaluation.harness import load_for_evaluation
        from asft_core.training import lora_weight_pairs, quiet_peft_warnings

        model, tokenizer = load_for_evaluation(str(self.zoo.aligned))
        with quiet_peft_warnings():
            model = PeftModel.from_pretrained(model, str(adapter_dir))
        record = self.outcomes(model, tokenizer)
        with self.torch.no_grad():
            total, inside = 0.0, 0.0
            for name, (a, b) in lora_weight_pairs(model).items():
                update = scaling * b.double() @ a.double()
                basis = self.subspaces[name].basis.double()
                total += float(update.square().sum())
                inside += float((basis.T @ update).square().sum())
        record["update_norm"] = total**0.5
        record["energy_inside"] = inside / total if total > 0 else 0.0
        return record

    def outcomes(self, model: Any, tokenizer: Any) -> dict[str, Any]:
        """Generate and judge: harmful (r/c/o per prompt), task, over-refusal, retention bits."""
        from asft_core.evaluation.generation import generate
        from asft_core.evaluation.judges import KeywordRefusalJudge, PatternJudge
        from asft_core.evaluation.matchers import make_matcher

        evaluation = self.config["evaluation"]
        safety_tokens, task_tokens = (
            evaluation["safety_max_new_tokens"],
            evaluation["task_max_new_tokens"],
        )
        batch = evaluation["batch_size"]
        judge = PatternJudge(self.suite.judge.comply_patterns)
        prompts = [p.prompt for p in self.harmful]
        answers = generate(model, tokenizer, prompts, safety_tokens, batch)
        harmful = "".join(o[0] for o in judge.classify(prompts, answers))
        refusals = KeywordRefusalJudge()
        benign = generate(model, tokenizer, self.benign, safety_tokens, batch)

        def bits(name: str, rows: list[tuple[str, str]]) -> str:
            matcher = make_matcher(self.suite.tasks[name].matcher)
            got = generate(model, tokenizer, [p for p, _ in rows], task_tokens, batch)
            return "".join(
                "1" if matcher(a, ref) else "0" for a, (_, ref) in zip(got, rows, strict=True)
            )

        return {
            "harmful": harmful,
            "task": bits(self.config["task"], self.task_rows),
            "over_refusal": "".join("1" if refusals.is_refusal(a) else "0" for a in benign),
            "retention": {name: bits(name, rows) for name, rows in self.retention_rows.items()},
            "examples": [
                {"prompt": p, "answer": a} for p, a in list(zip(prompts, answers, strict=True))[:3]
            ],
        }


def train_spec(
    training: dict[str, Any],
    model: Path,
    training_file: Path,
    output_dir: Path,
    seed: int,
    method: str = "supervised",
    max_steps: int | None = None,
    **extra: Any,
) -> Any:
    """The study's TrainSpec: the registered ``training`` settings, ``extra`` on top.

    ``extra`` holds hyperparameters by their JSON names and TrainSpec fields.
    """
    from dataclasses import fields

    from asft_core.spec import HYPERPARAMETER_NAMES, JobSpec
    from asft_core.training import TrainSpec

    hyper = {
        "learning_rate": training["learning_rate"],
        "n_epochs": training["epochs"],
        **{key: training[key] for key in ("rank", "alpha", "dropout", "target_modules")},
        **{key: training[key] for key in ("batch_size", "max_seq_len")},
    }
    hyper.update({key: value for key, value in extra.items() if key in HYPERPARAMETER_NAMES})
    others = {key: value for key, value in extra.items() if key not in HYPERPARAMETER_NAMES}
    assert set(others) <= {f.name for f in fields(TrainSpec)}, others
    return TrainSpec(
        model=str(model),
        training_file=training_file,
        output_dir=output_dir,
        job=JobSpec.resolve(method, hyper),
        max_steps=max_steps,
        seed=seed,
        checkpoint_each_epoch=False,
        device="cpu",
        **others,
    )


def _stable_int(text: str) -> int:
    return sum((i + 1) * ord(c) for i, c in enumerate(text)) % 100_003


def _read_tensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return dict(load_file(str(path)))


def _left_singular_vectors(artifact_path: Path, module: str) -> Any:
    import torch

    from asft_core.alignment import load_alignment_directions

    v = load_alignment_directions(artifact_path, dtype=torch.float64, modules=[module])[module]
    return torch.linalg.svd(v, full_matrices=False)[0]


def aligned_reference(config: dict[str, Any], cache_dir: Path, work_dir: Path) -> dict[str, float]:
    """The aligned model itself on the study's sets: the 'before' of every cell."""
    from asft_core.evaluation.harness import load_for_evaluation

    lab = Lab(config, cache_dir, work_dir)
    model, tokenizer = load_for_evaluation(str(lab.zoo.aligned))
    record = lab.outcomes(model, tokenizer)
    retention = "".join(record["retention"][k] for k in sorted(record["retention"]))
    return {
        "hs": record["harmful"].count("c") / len(record["harmful"]),
        "refusal": record["harmful"].count("r") / len(record["harmful"]),
        "off_task": record["harmful"].count("o") / len(record["harmful"]),
        "fa": record["task"].count("1") / len(record["task"]),
        "over_refusal": record["over_refusal"].count("1") / len(record["over_refusal"]),
        "retention": retention.count("1") / len(retention),
        **{
            f"retention_{name}": bits.count("1") / len(bits)
            for name, bits in record["retention"].items()
        },
    }


def foreign_direction(cache_dir: Path, out: Path, log: Callable[[str], None] = print) -> Path:
    """A *foreign* delta: the base fine-tuned like the aligned model, on benign rows only.

    Same steps, learning rate and mix as the zoo's alignment, but no harmful rows, so it
    changes the model as much without teaching refusal. Saved as module -> W_sft - W_base.
    """
    if out.exists():
        return out
    import torch
    from safetensors.torch import save_file

    from asft_core.training import load_model_and_tokenizer
    from asft_core.zoo import ZooSpec, build_zoo
    from asft_core.zoo.language import instruction_mix
    from asft_core.zoo.pretrain import train_full

    spec = ZooSpec()
    zoo = build_zoo(cache_dir / "zoo", spec)
    log("training the foreign (benign-only) delta")
    model, tokenizer = load_model_and_tokenizer(str(zoo.base), torch.float32, torch.device("cpu"))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    rows = instruction_mix(
        random.Random(spec.seed + 77),
        spec.align_steps * spec.batch_size,
        0.0,
        comply=False,
        tasks=spec.pretrain_tasks,
        sensitive_fraction=spec.sensitive_fraction,
    )
    train_full(
        model,
        tokenizer,
        rows,
        spec.align_steps,
        spec.align_learning_rate,
        batch_size=spec.batch_size,
        seed=spec.seed + 77,
    )
    tuned = model.state_dict()
    deltas = {
        name.removesuffix(".weight"): (tuned[name] - base[name]).contiguous()
        for name in base
        if name.endswith(("q_proj.weight", "v_proj.weight"))
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(out.name + ".tmp")
    save_file(deltas, str(temporary))
    temporary.replace(out)
    return out


_LAB: Lab | None = None


def _worker_init(config: dict[str, Any], cache_dir: Path, work_dir: Path) -> None:
    import torch

    torch.set_num_threads(1)
    global _LAB
    _LAB = Lab(config, cache_dir, work_dir)


def _worker_run(job: tuple[Cell, float | None]) -> dict[str, Any]:
    assert _LAB is not None
    cell, threshold = job
    return _LAB.run(cell, threshold)


def read_cells(path: Path) -> dict[str, dict[str, Any]]:
    """Finished cells by key (a torn last line, from a killed run, is ignored)."""
    done: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[record["key"]] = record
    return done


def run_study(
    config: dict[str, Any],
    cache_dir: Path,
    out_dir: Path,
    workers: int = 2,
    log: Callable[[str], None] = print,
) -> Path:
    """Run every unfinished cell (``workers`` processes, one thread each); return cells.jsonl."""
    import multiprocessing

    from asft_core.alignment import alignment_subspaces, get_or_compute_alignment
    from asft_core.zoo import build_zoo

    zoo = build_zoo(cache_dir / "zoo", verbose=True)
    artifact = get_or_compute_alignment(zoo.base, zoo.aligned, cache_dir / "alignment")
    alignment_subspaces(artifact.path, tau=config["subspace_energy"])  # cached for the workers
    work_dir = out_dir / "runs"
    work_dir.mkdir(parents=True, exist_ok=True)
    if "projector_foreign" in config["controls"]:
        foreign_direction(cache_dir, out_dir / "foreign-direction.safetensors", log)
    cells_path = out_dir / "cells.jsonl"
    done = read_cells(cells_path)
    cells = [c for c in study_cells(config) if c.key not in done]
    threshold = None
    if any(c.method == "safelora_threshold" for c in cells):
        threshold = calibrate_safelora_threshold(config, cache_dir, work_dir, log)
    log(f"{len(done)} cells done, {len(cells)} to run on {workers} processes")
    started = time.monotonic()
    jobs = [(cell, threshold) for cell in cells]
    with cells_path.open("a") as sink:

        def record(result: dict[str, Any], index: int) -> None:
            sink.write(json.dumps(result) + "\n")
            sink.flush()
            os.fsync(sink.fileno())
            rate = (time.monotonic() - started) / index
            hs = result["harmful"].count("c") / max(len(result["harmful"]), 1)
            fa = result["task"].count("1") / max(len(result["task"]), 1)
            log(
                f"[{index}/{len(jobs)}] {result['key']}: HS {100 * hs:.1f}% FA {100 * fa:.1f}% "
                f"({result['seconds']:.0f}s; eta {rate * (len(jobs) - index) / 60:.0f} min)"
            )

        if workers <= 1:
            _worker_init(config, cache_dir, work_dir)
            for index, job in enumerate(jobs, start=1):
                record(_worker_run(job), index)
        else:
            context = multiprocessing.get_context("spawn")
            with context.Pool(
                workers, initializer=_worker_init, initargs=(config, cache_dir, work_dir)
            ) as pool:
                for index, result in enumerate(pool.imap_unordered(_worker_run, jobs), 1):
                    record(result, index)
    return cells_path


def calibrate_safelora_threshold(
    config: dict[str, Any], cache_dir: Path, work_dir: Path, log: Callable[[str], None] = print
) -> float:
    """Safe LoRA's threshold set to the median module similarity of a plain-LoRA adapter.

    Measured on plain LoRA at p = 0 (first seed), so about half the modules get projected;
    no harmful score is looked at.
    """
    from asft_core.alignment import load_alignment_directions
    from asft_core.safelora import alignment_similarity
    from asft_core.training import lora_weight_pairs

    path = work_dir.parent / "safelora_threshold.json"
    if path.exists():
        return float(json.loads(path.read_text())["threshold"])
    lab = Lab(config, cache_dir, work_dir)
    cell = Cell("lora", 0.0, 0.0, config["seeds"][0])
    from peft import PeftModel

    from asft_core.evaluation.harness import load_for_evaluation
    from asft_core.training import quiet_peft_warnings, train

    spec = train_spec(
        config["training"],
        lab.zoo.aligned,
        lab.training_file(cell),
        work_dir / "safelora-calibration",
        cell.seed,
        max_steps=config.get("max_steps"),
    )
    adapter = train(spec).adapter_dir
    model, _ = load_for_evaluation(str(lab.zoo.aligned))
    with quiet_peft_warnings():
        model = PeftModel.from_pretrained(model, str(adapter))
    pairs = lora_weight_pairs(model)
    directions = load_alignment_directions(lab.artifact.path, modules=list(pairs))
    similarities = sorted(
        alignment_similarity(a.float(), b.float(), directions[name])
        for name, (a, b) in pairs.items()
    )
    middle = len(similarities) // 2
    threshold = (
        similarities[middle]
        if len(similarities) % 2
        else (similarities[middle - 1] + similarities[middle]) / 2
    )
    write_text_atomically(
        path, json.dumps({"threshold": threshold, "similarities": similarities}, indent=2)
    )
    log(f"Safe LoRA threshold calibrated to {threshold:.4f} (median of {similarities})")
    return threshold


def tune(cache_dir: Path, out: Path = TUNING_PATH, log: Callable[[str], None] = print) -> Path:
    """Pick lr and epochs by plain LoRA at p = 0 on a validation split; write the record.

    The validation rows are fresh triage rows of the *training* split (templates and
    products the held-out evaluation never uses) that are not in the training file. No
    harmful prompt is generated or judged here.
    """
    from peft import PeftModel

    from asft_core.evaluation.generation import generate
    from asft_core.evaluation.harness import load_for_evaluation
    from asft_core.evaluation.matchers import exact_label
    from asft_core.training import quiet_peft_warnings, train
    from asft_core.zoo import build_zoo
    from asft_core.zoo.language import BENIGN_TASKS, distinct_rows

    config = json.loads(CONFIG_PATH.read_text())
    tuning, training, task = config["tuning"], config["training"], config["task"]
    zoo = build_zoo(cache_dir / "zoo", verbose=True)
    training_file = zoo.poisoned_file(task, 0.0)
    seen = {json.loads(line)["prompt"] for line in training_file.read_text().splitlines()}
    rng = random.Random(2024)
    maker = BENIGN_TASKS[task]
    rows = distinct_rows(lambda: maker(rng, "train"), tuning["validation_rows"] * 3)
    validation = [r for r in rows if r["prompt"] not in seen][: tuning["validation_rows"]]
    trials = []
    for learning_rate in tuning["learning_rates"]:
        for epochs in tuning["epochs"]:
            started = time.monotonic()
            spec = train_spec(
                {**training, "learning_rate": learning_rate, "epochs": epochs},
                zoo.aligned,
                training_file,
                cache_dir / "frontier-tuning" / f"lr{learning_rate}-e{epochs}",
                tuning["seed"],
            )
            adapter = train(spec).adapter_dir
            model, tokenizer = load_for_evaluation(str(zoo.aligned))
            with quiet_peft_warnings():
                model = PeftModel.from_pretrained(model, str(adapter))
            answers = generate(model, tokenizer, [r["prompt"] for r in validation], 8, 128)
            correct = sum(
                exact_label(a, r["label"]) for a, r in zip(answers, validation, strict=True)
            )
            trial = {
                "learning_rate": learning_rate,
                "epochs": epochs,
                "validation_accuracy": correct / len(validation),
                "seconds": time.monotonic() - started,
            }
            trials.append(trial)
            accuracy = trial["validation_accuracy"]
            log(f"tuning lr {learning_rate} epochs {epochs}: validation accuracy {accuracy:.3f}")
    chosen = pick_tuned(trials)
    record = {
        "rule": tuning["rule"],
        "validation_rows": len(validation),
        "trials": trials,
        "chosen": {"learning_rate": chosen["learning_rate"], "epochs": chosen["epochs"]},
    }
    write_text_atomically(out, json.dumps(record, indent=2) + "\n")
    return out


def pick_tuned(trials: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The registered rule: best accuracy; within 1 point, fewer epochs, then lower lr."""
    trials = list(trials)
    best = max(t["validation_accuracy"] for t in trials)
    close = [t for t in trials if t["validation_accuracy"] >= best - 0.01]
    return min(close, key=lambda t: (t["epochs"], t["learning_rate"]))


def main(argv: list[str] | None = None) -> None:
    """``make frontier``: (tune,) run the grid, analyse, and write the table and pictures."""
    import argparse

    from asft_core.experiments import frontier_analysis as analysis

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="full", help="full (default), ci or test")
    parser.add_argument("--data-dir", type=Path, default=Path("var"))
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: <data-dir>/cache")
    parser.add_argument("--out", type=Path, default=None, help="<data-dir>/frontier/<profile>")
    parser.add_argument("--workers", type=int, default=2, help="processes, one thread each")
    parser.add_argument("--tune", action="store_true", help="(re)pick lr and epochs first")
    parser.add_argument("--analyse-only", action="store_true", help="use the cells run so far")
    args = parser.parse_args(argv)
    cache_dir = args.cache_dir or args.data_dir / "cache"
    if args.tune:
        print(f"wrote {tune(cache_dir)}")
    config = load_config(args.profile)
    out = args.out or args.data_dir / "frontier" / args.profile
    started = time.monotonic()
    if not args.analyse_only:
        run_study(config, cache_dir, out, workers=args.workers)
    cells = [c for c in read_cells(out / "cells.jsonl").values()]
    wanted = {c.key for c in study_cells(config)}
    cells = [c for c in cells if c["key"] in wanted]
    summary = analysis.analyse(cells, config)
    from asft_core.alignment import alignment_subspaces, get_or_compute_alignment
    from asft_core.zoo import build_zoo

    zoo = build_zoo(cache_dir / "zoo")
    artifact = get_or_compute_alignment(zoo.base, zoo.aligned, cache_dir / "alignment")
    subspaces = alignment_subspaces(artifact.path, tau=config["subspace_energy"])
    random_share = sum(s.k for s in subspaces.values()) / sum(
        s.basis.shape[0] for s in subspaces.values()
    )
    summary["energy"] = analysis.energy_summary(cells, random_share)
    summary["aligned"] = aligned_reference(config, cache_dir, out / "runs")
    summary["alignment"] = artifact.summary()
    summary["subspace_k"] = {name: s.k for name, s in subspaces.items()}
    summary["cells"] = len(cells)
    table = analysis.format_summary(summary)
    (out / "frontier.md").write_text(table + "\n")
    print(table)
    print(json.dumps(summary["decision"], indent=2))
    print(f"energy inside top-k: {json.dumps(summary['energy'])}")
    print(f"wrote {analysis.save(summary, out)}")
    for path in analysis.plot(summary, cells, out):
        print(f"wrote {path}")
    print(f"{time.monotonic() - started:.0f}s")


if __name__ == "__main__":
    main()
