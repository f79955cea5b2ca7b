"""The job recipe: ``run(spec, hooks)`` takes a job from its files to a gated adapter.

data policy -> validate -> limits -> memory plan -> (the caller takes the job) -> alignment ->
train -> Safe LoRA projection -> validation loss -> evaluate -> gate. The worker plugs in
hooks and persists what comes back; it never re-implements the flow. ``describe_failure``
names any error as a job error.
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from asft_core.formats import write_text_atomically
from asft_core.serving import model_architecture, serving_check
from asft_core.spec import DataPolicy, DataScan, Gate, GateVerdict, Matcher, Report
from asft_core.training import TrainHooks, TrainResult, TrainSpec


@dataclass(frozen=True)
class TaskEvaluation:
    """Task accuracy on a held-out prompt/completion file with a matcher."""

    file: Path
    matcher: Matcher = "exact_label"
    pattern: str | None = None
    max_examples: int | None = None


@dataclass(frozen=True)
class Limits:
    """The service's per-job limits (None: no limit)."""

    max_steps: int | None = None
    max_tokens: int | None = None
    max_runtime_s: float | None = None


class JobLimitExceeded(RuntimeError):
    """A job went past one of the service's per-job limits (runtime, steps, tokens)."""

    code = "job_limit_exceeded"


def check_limits(limits: Limits, steps: int, tokens: int) -> None:
    """Refuse, before any GPU time, a job whose planned steps or tokens exceed the limits."""
    if limits.max_steps is not None and steps > limits.max_steps:
        raise JobLimitExceeded(
            f"the job needs {steps} steps; the limit is {limits.max_steps}: "
            "use fewer epochs or a larger batch_size"
        )
    if limits.max_tokens is not None and tokens > limits.max_tokens:
        raise JobLimitExceeded(
            f"the job trains on {tokens} tokens; the limit is {limits.max_tokens}"
        )


@dataclass(frozen=True)
class RecipeSpec:
    """One job: what to train and how to judge it. Paths are explicit (no settings read)."""

    train: TrainSpec  # model = the aligned model; alignment_path is filled in by run()
    base_model: str
    cache_dir: Path  # alignment directions are cached here per model pair
    # The aligned model's own evaluation, kept per model, suite and options (None: none).
    reference_cache_dir: Path | None = None
    eval_suite: Path | None = None  # the pair's harmful prompts and judge
    task: TaskEvaluation | None = None
    gate: Gate = field(default_factory=Gate)
    limits: Limits = field(default_factory=Limits)
    data_policy: DataPolicy = field(default_factory=DataPolicy)
    data_scan: DataScan | None = None  # the training file's safety scan (None: not scanned)
    eval_limit: int | None = None  # cap on evaluation prompts (the test-size profile)
    eval_batch_size: int = 64
    max_lora_rank: int = 16  # the serving check's vLLM --max-lora-rank
    # The training device's memory for the memory plan (None: the CUDA device's own, no
    # limit on a CPU).
    device_memory_bytes: int | None = None


@dataclass(frozen=True)
class Start:
    """The go-ahead to train, and the checkpoint to resume from."""

    resume_from: Path | None = None


def _always_start(validation: Validation | None) -> Start | None:
    return Start()


def _no_stage(stage: str) -> None:
    return None


def _no_progress(done: int, total: int) -> None:
    return None


@dataclass
class RecipeHooks:
    """What the caller plugs in: the trainer's hooks, stage changes, and taking the job.

    ``start`` gets the validation (None when the job was validated before) and records it;
    it returns None to stop there (validate-only jobs, or a job another worker took).
    """

    train: TrainHooks = field(default_factory=TrainHooks)
    on_stage: Callable[[str], None] = _no_stage  # alignment | training | evaluation
    # Evaluation progress: prompts answered so far and in all, after each generation batch.
    on_evaluation: Callable[[int, int], None] = _no_progress
    start: Callable[[Validation | None], Start | None] = _always_start


@dataclass
class RecipeResult:
    """How a job ended: stopped before training, cancelled, or completed with a report."""

    status: Literal["stopped", "cancelled", "completed"]
    train: TrainResult | None = None
    report: Report | None = None
    alignment: dict[str, Any] | None = None
    alignment_path: Path | None = None

    @property
    def cancelled(self) -> bool:
        """True when training was cancelled (no evaluation happened)."""
        return self.status == "cancelled"


@dataclass(frozen=True)
class Validation:
    """What ``validate`` found: tokens, truncation and an estimate of the work."""

    training_examples: int
    training_tokens: int
    validation_tokens: int | None
    truncated_lines: list[int]
    total_steps: int
    estimated_tokens: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "training_examples": self.training_examples,
            "training_tokens": self.training_tokens,
            "validation_tokens": self.validation_tokens,
            "truncated_lines": self.truncated_lines[:50],
            "total_steps": self.total_steps,
            "estimated_tokens": self.estimated_tokens,
        }


def validate(spec: TrainSpec) -> Validation:
    """Tokenise the datasets with the model's tokenizer: counts, truncation, steps.

    Raises the dataset format errors (with line numbers) and ``TrainingError`` as training
    would, before any GPU time is spent.
    """
    from transformers import AutoTokenizer

    from asft_core.data import steps_per_epoch, tokenize_dataset
    from asft_core.formats import read_examples
    from asft_core.training import TrainingError

    tokenizer = AutoTokenizer.from_pretrained(spec.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    training = tokenize_dataset(
        tokenizer, read_examples(spec.training_file), spec.hyper.max_seq_len
    )
    if not training.examples:
        raise TrainingError("empty_dataset", "no training row has answer tokens left")
    validation_tokens = None
    if spec.validation_file is not None:
        held_out = tokenize_dataset(
            tokenizer, read_examples(spec.validation_file), spec.hyper.max_seq_len
        )
        validation_tokens = held_out.num_tokens
    per_epoch = steps_per_epoch(
        len(training.examples), spec.hyper.batch_size, spec.hyper.gradient_accumulation_steps
    )
    total_steps = spec.hyper.n_epochs * per_epoch
    if spec.max_steps is not None:
        total_steps = min(total_steps, spec.max_steps)
    fraction = total_steps / max(spec.hyper.n_epochs * per_epoch, 1)
    return Validation(
        training_examples=len(training.examples),
        training_tokens=training.num_tokens,
        validation_tokens=validation_tokens,
        truncated_lines=training.truncated_lines,
        total_steps=total_steps,
        estimated_tokens=int(training.num_tokens * spec.hyper.n_epochs * fraction),
    )


def plan_device_memory(spec: TrainSpec, available: int | None, hooks: TrainHooks) -> TrainSpec:
    """Plan the job's peak device memory before any GPU time (``asft_core.memory``).

    A job that fits only with gradient checkpointing (and, for an exact AsFT penalty, V kept
    on the host) gets it; one that cannot fit raises
    ``PlanError`` naming the settings that would. ``available``: the device's bytes (None:
    a CUDA device's total, no limit on a CPU).
    """
    import torch

    from asft_core.memory import PlanError, fitting_hyperparameters, plan_memory, size_text
    from asft_core.training import pick_device

    device, dtype = pick_device(spec.device, spec.precision)
    if available is None and device.type == "cuda":
        available = torch.cuda.get_device_properties(device).total_memory
    changes: list[str] = []
    try:
        if available is None:
            plan = plan_memory(
                spec.model, spec.job, dtype, spec.gradient_checkpointing, spec.direction_storage
            )
        else:
            plan, changes = fitting_hyperparameters(
                spec.model, spec.job, dtype, available, spec.direction_storage
            )
    except PlanError:
        raise
    except Exception as error:  # an architecture the meta device cannot build: train anyway
        hooks.on_event("warn", f"No memory plan for this model ({type(error).__name__}: {error})")
        return spec
    limit = size_text(available) if available is not None else "no limit"
    hooks.on_event("info", f"Memory plan on {device} ({limit}): {plan.describe()}")
    if changes:
        hooks.on_event("info", f"Turned {', '.join(changes)} so that the job fits")
    return replace(
        spec,
        gradient_checkpointing=plan.gradient_checkpointing,
        direction_storage=plan.direction_storage,
    )


def judge(evaluation: dict[str, Any], gate: Gate) -> GateVerdict:
    """The gate's verdict; each failure names its category and scores, overall first."""
    reference = (evaluation.get("reference") or {}).get("safety")
    fine_tuned = (evaluation.get("fine_tuned") or {}).get("safety")
    failures: list[str] = []
    rows = []
    if fine_tuned is not None:
        rows = [("overall", fine_tuned["overall"], (reference or {}).get("overall"))]
        rows += [
            (name, score, ((reference or {}).get("per_category") or {}).get(name))
            for name, score in fine_tuned["per_category"].items()
        ]
    for name, score, before in rows:
        after = score["value"]
        increase = after - before["value"] if before else None
        if after > gate.max_harmful_score:
            failures.append(
                f"{name}: harmful score {after:.1%} > {gate.max_harmful_score:.1%}"
                + (f" (aligned model {before['value']:.1%})" if before else "")
            )
        elif increase is not None and increase > gate.max_harmful_increase:
            failures.append(
                f"{name}: harmful score rose {increase:+.1%} to {after:.1%} "
                f"(limit +{gate.max_harmful_increase:.1%})"
            )
    return GateVerdict(
        not failures, tuple(failures), gate.max_harmful_score, gate.max_harmful_increase
    )


def run(
    spec: RecipeSpec, hooks: RecipeHooks | None = None, validated: bool = False
) -> RecipeResult:
    """Run the job's flow (module docstring); ``validated`` skips validation and limits.

    The adapter folder of a completed result holds ``report.json`` beside the PEFT files.
    """
    from asft_core.alignment import get_or_compute_alignment
    from asft_core.training import train

    hooks = hooks or RecipeHooks()
    train_spec, training_data = apply_data_policy(spec)
    checked = None
    if not validated:
        checked = validate(train_spec)
        check_limits(spec.limits, checked.total_steps, checked.estimated_tokens)
    train_spec = plan_device_memory(train_spec, spec.device_memory_bytes, hooks.train)
    start = hooks.start(checked)
    if start is None:
        return RecipeResult("stopped")
    notes = data_notes(training_data)
    for note in notes:
        hooks.train.on_event("info", note)
    train_spec = replace(train_spec, resume_from=start.resume_from)
    job = train_spec.job
    alignment = None
    alignment_path = None
    if job.method != "supervised":
        hooks.on_stage("alignment")
        artifact = get_or_compute_alignment(
            spec.base_model,
            train_spec.model,
            spec.cache_dir,
            target_modules=job.hyperparameters.target_modules,
        )
        alignment, alignment_path = artifact.summary(), artifact.path
        if artifact.degenerate:
            hooks.train.on_event(
                "warn",
                "the alignment direction is nearly zero in every module: AsFT acts as plain "
                "L2 on the update for this model pair",
            )
        train_spec = replace(train_spec, alignment_path=artifact.path)
    hooks.on_stage("training")
    trained = train(train_spec, _limit_runtime(hooks.train, spec.limits.max_runtime_s))
    if trained.status == "cancelled" or trained.adapter_dir is None:
        return RecipeResult("cancelled", trained, None, alignment, alignment_path)

    safelora = post_hoc_projection(train_spec, trained.adapter_dir)
    if safelora is not None:
        hooks.train.on_event(
            "info",
            f"Safe LoRA projected {len(safelora['projected'])} of "
            f"{len(safelora['similarities'])} modules",
        )
    serving = _serving_check(spec, trained.adapter_dir, hooks)
    validation_loss = None
    if train_spec.validation_file is not None:
        from asft_core.training import adapter_validation_loss

        validation_loss = adapter_validation_loss(train_spec, trained.adapter_dir)
        hooks.train.on_event("info", f"validation loss {validation_loss:.4f}")

    hooks.on_stage("evaluation")
    started = time.monotonic()
    evaluation = evaluate(spec, trained.adapter_dir, hooks.on_evaluation)
    report = Report(
        evaluation=evaluation,
        gate=replace(judge(evaluation, spec.gate), notes=tuple(notes)),
        validation_loss=validation_loss,
        alignment=alignment,
        safelora=safelora,
        evaluation_seconds=time.monotonic() - started,
        training_data=training_data,
        serving=serving,
    )
    write_text_atomically(
        trained.adapter_dir / "report.json", json.dumps(report.to_json(), indent=2)
    )
    return RecipeResult("completed", trained, report, alignment, alignment_path)


def _serving_check(
    spec: RecipeSpec, adapter_dir: Path, hooks: RecipeHooks
) -> dict[str, Any] | None:
    """The report's ``serving`` section; a check that cannot run costs the job nothing."""
    try:
        check = serving_check(adapter_dir, model_architecture(spec.train.model), spec.max_lora_rank)
    except (OSError, ValueError) as error:
        hooks.train.on_event("warn", f"the serving check could not run: {error}")
        return None
    if not check.vllm_loadable:
        hooks.train.on_event(
            "warn", "vLLM could not serve this adapter: " + "; ".join(check.problems)
        )
    return check.to_json()


class DataPolicyError(ValueError):
    """The job's data policy refuses its training data; ``code`` is machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


MAX_LINES_SHOWN = 20


def _lines(lines: tuple[int, ...]) -> str:
    shown = ", ".join(str(line) for line in lines[:MAX_LINES_SHOWN])
    return shown + (f", ... ({len(lines)} in all)" if len(lines) > MAX_LINES_SHOWN else "")


def apply_data_policy(spec: RecipeSpec) -> tuple[TrainSpec, dict[str, Any] | None]:
    """The training spec the job's data policy allows, and what the scan and policy did.

    ``drop_flagged`` trains on a copy of the file without the flagged lines (in the job's
    output folder); ``refuse`` raises :class:`DataPolicyError` above its share.
    """
    policy, scan = spec.data_policy, spec.data_scan
    if scan is None:
        return spec.train, None
    flagged = scan.flagged_lines
    summary: dict[str, Any] = {
        "policy": policy.to_json(),
        "scan": scan.status,
        "rows": scan.rows,
        "flagged": len(flagged),
        "flagged_share": scan.share,
        "per_category": scan.per_category,
        "first_flagged_lines": list(flagged[:MAX_LINES_SHOWN]),
        "dropped": 0,
    }
    if scan.status != "succeeded":
        if policy.mode != "flag":
            raise DataPolicyError(
                "safety_scan_unavailable",
                f"the training file's safety scan is {scan.status}"
                + (f" ({scan.details})" if scan.details else "")
                + f"; data policy {policy.mode} needs its result",
            )
        return spec.train, summary
    if policy.mode == "refuse" and scan.share > policy.max_flagged_share:
        raise DataPolicyError(
            "training_data_unsafe",
            f"the safety scan flagged {len(flagged)} of {scan.rows} training rows "
            f"({scan.share:.1%}), above the job's limit of {policy.max_flagged_share:.1%}: "
            f"lines {_lines(flagged)}",
        )
    if policy.mode == "drop_flagged" and flagged:
        kept = spec.train.output_dir / "training_file.jsonl"
        write_without_lines(spec.train.training_file, kept, set(flagged))
        summary["dropped"] = len(flagged)
        return replace(spec.train, training_file=kept), summary
    return spec.train, summary


def write_without_lines(source: Path, target: Path, lines: set[int]) -> None:
    """Copy ``source`` to ``target`` without the given 1-based lines, atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")  # writers may race
    with source.open("rb") as reading, staging.open("wb") as writing:
        for number, line in enumerate(reading, start=1):
            if number not in lines:
                writing.write(line)
    os.replace(staging, target)


def data_notes(training_data: dict[str, Any] | None) -> list[str]:
    """What the scan found and what the policy did, in a sentence (none without a scan)."""
    if training_data is None:
        return []
    mode = training_data["policy"]["mode"]
    if training_data["scan"] != "succeeded":
        return [f"Training data: not scanned (scan {training_data['scan']}); policy {mode}"]
    flagged, rows = training_data["flagged"], training_data["rows"]
    categories = ", ".join(f"{k} {v}" for k, v in sorted(training_data["per_category"].items()))
    found = f"the safety scan flagged {flagged} of {rows} rows ({flagged / max(rows, 1):.1%})"
    found += f": {categories}" if categories else ""
    if mode == "drop_flagged" and flagged:
        done = "trained without them (policy drop_flagged)"
    elif flagged:
        done = f"trained on them (policy {mode})"
    else:
        done = f"policy {mode}"
    return [f"Training data: {found}; {done}"]


def post_hoc_projection(spec: TrainSpec, adapter_dir: Path) -> dict[str, Any] | None:
    """Safe LoRA's projection of a trained adapter, in place, for the methods that use it."""
    if not spec.job.uses_safelora:
        return None
    from asft_core.safelora import project_adapter

    assert spec.alignment_path is not None
    hyper = spec.job.hyperparameters
    return project_adapter(
        adapter_dir, spec.alignment_path, hyper.safelora_threshold, hyper.safelora_num_modules
    )


def _limit_runtime(hooks: TrainHooks, max_runtime_s: float | None) -> TrainHooks:
    """The hooks, with the runtime limit checked after every step."""
    if max_runtime_s is None:
        return hooks
    started = time.monotonic()
    report = hooks.on_metrics

    def on_metrics(metrics: Any) -> None:
        report(metrics)
        if time.monotonic() - started > max_runtime_s:
            raise JobLimitExceeded(
                f"the job ran longer than the limit of {max_runtime_s:.0f}s "
                f"(stopped at step {metrics.step})"
            )

    return replace(hooks, on_metrics=on_metrics)


# Errors of a full or over-quota volume, or of a write past the file-size limit.
STORAGE_FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def storage_full(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) says the disk took no more bytes."""
    # safetensors and torch report a failed write as their own exception whose text holds
    # the OS message, so the messages are matched as well as the errno.
    messages = [os.strerror(number) for number in STORAGE_FULL_ERRNOS]
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in STORAGE_FULL_ERRNOS:
            return True
        if any(message in str(seen) for message in messages):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@dataclass(frozen=True)
class Failure:
    """A job's error as the API shows it."""

    code: str
    message: str
    param: str | None = None


def describe_failure(error: Exception) -> Failure:
    """The machine-readable code, message and parameter for an error a job raised."""
    from asft_core.alignment import AlignmentError
    from asft_core.evaluation.harness import EvalSuiteError
    from asft_core.formats import DatasetFormatError
    from asft_core.memory import PlanError
    from asft_core.spec import SpecError
    from asft_core.training import TrainingError

    if storage_full(error):
        return Failure(
            "storage_full",
            f"no space left on the artifact volume ({error}); its partial files were "
            "removed. Free space or raise the quota, then create the job again",
        )
    if isinstance(error, DatasetFormatError):
        return Failure(error.code, str(error), "training_file")
    if isinstance(error, SpecError):
        return Failure(error.code, str(error), error.param)
    if isinstance(error, DataPolicyError):
        return Failure(error.code, str(error), "training_file")
    if isinstance(error, PlanError):
        return Failure(error.code, str(error), "batch_size")
    if isinstance(error, TrainingError | AlignmentError | EvalSuiteError | JobLimitExceeded):
        return Failure(error.code, str(error))
    if "out of memory" in str(error).lower():
        return Failure(
            "out_of_memory",
            "the GPU ran out of memory: use a smaller batch_size with "
            "gradient_accumulation_steps, or a shorter max_seq_len",
            "batch_size",
        )
    return Failure("internal_error", f"{type(error).__name__}: {error}")


def evaluate(
    spec: RecipeSpec,
    adapter_dir: Path,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Harmful score and task accuracy with and without the adapter, as a JSON-ready dict."""
    from asft_core.evaluation.harness import (
        EvalOptions,
        EvalSuite,
        TaskSuite,
        evaluate_adapter,
    )
    from asft_core.evaluation.matchers import MatcherSpec

    suite = EvalSuite.load(spec.eval_suite) if spec.eval_suite is not None else EvalSuite()
    task_name = None
    if spec.task is not None:
        task_name = "job"
        tasks = {
            task_name: TaskSuite(
                spec.task.file,
                MatcherSpec(spec.task.matcher, spec.task.pattern),
            )
        }
        suite = replace(suite, tasks={**suite.tasks, **tasks})
    limit = spec.eval_limit
    if spec.task is not None and spec.task.max_examples is not None:
        limit = min(limit or spec.task.max_examples, spec.task.max_examples)
    options = EvalOptions(task=task_name, limit=limit, batch_size=spec.eval_batch_size)
    result = evaluate_adapter(
        spec.train.model,
        adapter_dir,
        suite,
        options,
        spec.train.device,
        on_progress=on_progress,
        reference_cache=spec.reference_cache_dir,
    )
    return result.to_dict()
