"""Run one job: load it, call the core recipe with hooks, record what happened.

Only jobs in ``validating_files`` or ``queued`` are taken; the database side (claims,
events, checkpoints, the outcome), each write retried while the database is unreachable,
is in :mod:`worker.persistence`. Training resumes from the job's last checkpoint.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

from service import logs
from service.db.models import Job, ModelPair, Team
from service.jobs.state import TERMINAL
from service.settings import Settings
from service.storage import file_key, job_key
from worker.persistence import (
    Heartbeat,
    JobContext,
    add_event,
    cancel_requested,
    claim,
    clear_job_outputs,
    database_unreachable,
    end_validation,
    fail,
    finish,
    latest_checkpoint,
    load_job,
    notify,
    record_alignment,
    record_checkpoint,
    record_metrics,
    requeue_preempted,
    worker_identity,
)

logger = logging.getLogger("asft.worker")


class JobLimitExceeded(RuntimeError):
    """A job went past one of the service's per-job limits (runtime, steps, tokens)."""

    code = "job_limit_exceeded"


def check_limits(settings: Settings, steps: int, tokens: int) -> None:
    """Refuse, before any GPU time, a job whose planned steps or tokens exceed the limits."""
    if settings.max_job_steps is not None and steps > settings.max_job_steps:
        raise JobLimitExceeded(
            f"the job needs {steps} steps; the limit is {settings.max_job_steps}: "
            "use fewer epochs or a larger batch_size"
        )
    if settings.max_job_tokens is not None and tokens > settings.max_job_tokens:
        raise JobLimitExceeded(
            f"the job trains on {tokens} tokens; the limit is {settings.max_job_tokens}"
        )


def train_spec_for(job: Job, pair: ModelPair, context: JobContext, registered_id: str) -> Any:
    """The core's TrainSpec for a job row (paths from ids, never from user strings)."""
    from asft_core.methods import DEFAULT_SUBSPACE_ENERGY
    from asft_core.training import LoraSettings, TrainSpec

    method = job.method["type"]
    hyper = job.method[method]["hyperparameters"]
    store = context.store
    return TrainSpec(
        model=pair.aligned_model,
        training_file=store.path(file_key(job.training_file)),
        validation_file=store.path(file_key(job.validation_file)) if job.validation_file else None,
        output_dir=store.path(job_key(job.id)),
        method=method,
        lora=LoraSettings(
            rank=hyper["rank"],
            alpha=hyper["alpha"],
            dropout=hyper["dropout"],
            target_modules=tuple(hyper["target_modules"]),
        ),
        asft_lambda=hyper.get("lambda", 1.0),
        penalty_rank=hyper.get("penalty_rank"),
        subspace_energy=hyper.get("subspace_energy", DEFAULT_SUBSPACE_ENERGY),
        safelora_threshold=hyper.get("safelora_threshold"),
        safelora_num_modules=hyper.get("safelora_num_modules"),
        learning_rate=hyper["learning_rate"],
        warmup_steps=hyper["warmup_steps"],
        epochs=hyper["n_epochs"],
        batch_size=hyper["batch_size"],
        gradient_accumulation_steps=hyper["gradient_accumulation_steps"],
        max_seq_len=hyper["max_seq_len"],
        seed=job.seed,
        checkpoint_each_epoch=True,
        device=context.settings.device,
        base_model_id=registered_id,
    )


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


def _format_error(error: Exception) -> tuple[str, str, str | None]:
    from asft_core.alignment import AlignmentError
    from asft_core.evaluation.harness import EvalSuiteError
    from asft_core.formats import DatasetFormatError
    from asft_core.training import TrainingError

    if storage_full(error):
        return (
            "storage_full",
            f"no space left on the artifact volume ({error}); its partial files were "
            "removed. Free space or raise the quota, then create the job again",
            None,
        )
    if isinstance(error, DatasetFormatError):
        return error.code, str(error), "training_file"
    if isinstance(error, TrainingError | AlignmentError | EvalSuiteError | JobLimitExceeded):
        return error.code, str(error), None
    if "out of memory" in str(error).lower():
        return (
            "out_of_memory",
            "the GPU ran out of memory: use a smaller batch_size with "
            "gradient_accumulation_steps, or a shorter max_seq_len",
            "batch_size",
        )
    return "internal_error", f"{type(error).__name__}: {error}", None


def execute_job(job_id: str, context: JobContext) -> str:
    """Advance a job as far as it goes; returns its final status. Safe to call twice.

    Only jobs in ``validating_files`` or ``queued`` are taken: a running job belongs to the
    worker holding its lease (the reconciler requeues it if that worker dies), and the other
    statuses need nothing from a worker.
    """
    loaded = load_job(context, job_id)
    if loaded is None:
        logger.warning("job %s does not exist", job_id)
        return "missing"
    job, pair, team = loaded
    if job.status not in ("validating_files", "queued"):
        return job.status
    assert pair is not None and team is not None
    token = logs.job_id.set(job_id)
    try:
        add_event(context, job_id, "info", f"Picked up by worker {worker_identity()}")
        logger.info("job picked up (status %s, attempt %d)", job.status, job.attempt + 1)
        started = time.monotonic()
        status = _advance(job, pair, team, context)
        logger.info("job %s after %.1fs", status, time.monotonic() - started)
        if status in TERMINAL:
            notify(context, job_id)
        return status
    finally:
        logs.job_id.reset(token)


def _advance(job: Job, pair: ModelPair, team: Team, context: JobContext) -> str:
    from dataclasses import replace

    from asft_core.recipe import Gate, RecipeHooks, RecipeSpec, TaskEvaluation, run, validate
    from asft_core.training import TrainHooks

    job_id = job.id
    spec = train_spec_for(job, pair, context, pair.id)
    spec = replace(spec, checkpoint_every_steps=context.settings.checkpoint_every_steps)
    try:
        if job.status == "validating_files":
            checked = validate(spec)
            check_limits(context.settings, checked.total_steps, checked.estimated_tokens)
            target = "queued" if job.auto_start else "validated"
            moved = end_validation(
                context, job_id, target, {**(job.validation or {}), **checked.to_dict()}
            )
            if not moved:
                return "skipped"
            add_event(
                context,
                job_id,
                "info",
                f"Files validated: {checked.training_examples} examples, "
                f"{checked.training_tokens} tokens per epoch, {checked.total_steps} steps",
            )
            if checked.truncated_lines:
                add_event(
                    context,
                    job_id,
                    "warn",
                    f"{len(checked.truncated_lines)} rows longer than max_seq_len were truncated",
                )
            if target == "validated":
                return "validated"
        taken, status = claim(context, job_id)
        if not taken:
            return status
        resume = latest_checkpoint(context, job_id)
        if resume is not None:
            clear_job_outputs(context, job_id)
            add_event(context, job_id, "info", f"Resuming from checkpoint {resume.name}")
        # Which worker trains, and the how-many-th time: "exactly once" is checkable per job.
        add_event(
            context,
            job_id,
            "info",
            "Fine-tuning started",
            {"worker": worker_identity(), "attempt": job.attempt + 1},
        )
        spec = replace(spec, resume_from=resume)
        heartbeat = Heartbeat(context, job_id, context.settings.heartbeat_interval_s)
        last_metrics: dict[str, Any] = {}
        run_started = time.monotonic()
        max_runtime_s = context.settings.max_job_runtime_s

        def on_metrics(metrics: Any) -> None:
            last_metrics.update(
                step=metrics.step, train_loss=metrics.task_loss, penalty=metrics.penalty
            )
            record_metrics(context, job_id, metrics)
            if max_runtime_s is not None and time.monotonic() - run_started > max_runtime_s:
                raise JobLimitExceeded(
                    f"the job ran longer than the limit of {max_runtime_s:.0f}s "
                    f"(stopped at step {metrics.step})"
                )

        def should_stop() -> bool:
            return context.preempt.is_set() or cancel_requested(context, job_id)

        hooks = RecipeHooks(
            train=TrainHooks(
                on_event=lambda level, message: add_event(context, job_id, level, message),
                on_metrics=on_metrics,
                on_checkpoint=lambda info: record_checkpoint(
                    context, job_id, info, dict(last_metrics)
                ),
                should_cancel=should_stop,
            ),
            on_stage=lambda stage: add_event(context, job_id, "info", f"Stage: {stage}"),
        )
        task = None
        if job.evaluation:
            task = TaskEvaluation(
                context.store.path(file_key(job.evaluation["file"])),
                job.evaluation["matcher"],
                job.evaluation.get("pattern"),
                job.evaluation.get("max_examples"),
            )
        gate = Gate(
            team.gate_max_harmful_score
            if team.gate_max_harmful_score is not None
            else context.settings.gate_max_harmful_score,
            team.gate_max_harmful_increase
            if team.gate_max_harmful_increase is not None
            else context.settings.gate_max_harmful_increase,
        )
        with heartbeat:
            result = run(
                RecipeSpec(
                    train=spec,
                    base_model=pair.base_model,
                    cache_dir=context.settings.resolved_cache_dir / "alignment",
                    eval_suite=Path(pair.eval_suite) if pair.eval_suite else None,
                    task=task,
                    gate=gate,
                    eval_limit=context.settings.eval_max_prompts,
                ),
                hooks,
            )
    except Exception as error:
        if database_unreachable(error):
            # Out of retries: nothing can be recorded, not even a failure. The lease goes
            # stale and the reconciler requeues the job, which resumes from its checkpoint.
            logger.exception("job %s stopped: the database stayed unreachable", job_id)
            raise
        code, message, param = _format_error(error)
        logger.exception("job %s failed", job_id)
        # A failed job's final adapter is never served, and a full disk may have cut it off
        # mid-file: remove it (its checkpoints are complete, each moved into place whole).
        with suppress(OSError):
            context.store.delete(job_key(job_id, "adapter"))
        fail(context, job_id, code, message, param)
        return "failed"
    if result.alignment_path is not None:
        record_alignment(context, job.model, result.alignment_path, result.alignment or {})
    if result.cancelled and context.preempt.is_set() and not cancel_requested(context, job_id):
        return requeue_preempted(context, job_id)
    return finish(context, job_id, team, result)
