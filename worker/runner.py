"""Run one job: load it, run the core recipe with hooks, record what happened.

Only jobs in ``validating_files`` or ``queued`` are taken. The flow is ``asft_core.recipe``'s;
the database side (claims, events, checkpoints, the outcome), each write retried while the
database is unreachable, is :mod:`worker.persistence`. Training resumes from the job's last
checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from asft_core.spec import DataScan
from service import logs
from service.db.models import Job, ModelPair, Team
from service.db.session import transaction
from service.jobs.state import TERMINAL
from service.scans import SCANNING
from service.storage import file_key, forget_adapter_archive, job_key
from service.teams import team_gate
from worker.persistence import (
    JobContext,
    JobSync,
    add_event,
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
    record_evaluation_progress,
    requeue_preempted,
    took_message,
    training_scan,
    worker_identity,
)

logger = logging.getLogger("asft.worker")


def execute_job(job_id: str, context: JobContext) -> str:
    """Advance a job as far as it goes; returns its final status. Safe to call twice.

    A running job belongs to the worker holding its lease (the reconciler requeues it if that
    worker dies), and the other statuses need nothing from a worker.
    """
    loaded = load_job(context, job_id)
    if loaded is None:
        logger.warning("job %s does not exist", job_id)
        return "missing"
    job, pair, team = loaded
    if job.status not in ("validating_files", "queued"):
        return job.status
    assert pair is not None and team is not None
    took_message(context, job_id)
    token = logs.job_id.set(job_id)
    try:
        add_event(context, job_id, "info", f"Picked up by worker {worker_identity()}")
        logger.info("job picked up (status %s, attempt %d)", job.status, job.attempt + 1)
        started = time.monotonic()
        status = run_job(job, pair, team, context)
        logger.info("job %s after %.1fs", status, time.monotonic() - started)
        if status in TERMINAL:
            notify(context, job_id)
        return status
    finally:
        logs.job_id.reset(token)


def recipe_spec(
    job: Job, pair: ModelPair, team: Team, context: JobContext, scan: DataScan | None
) -> Any:
    """The core's RecipeSpec for a job row (paths from ids, never from user strings)."""
    from asft_core.recipe import Limits, RecipeSpec, TaskEvaluation
    from asft_core.spec import DataPolicy, JobSpec
    from asft_core.training import TrainSpec

    store, settings = context.store, context.settings
    train = TrainSpec(
        model=pair.aligned_model,
        training_file=store.path(file_key(job.training_file)),
        validation_file=store.path(file_key(job.validation_file)) if job.validation_file else None,
        output_dir=store.path(job_key(job.id)),
        job=JobSpec.from_json(job.method),
        seed=job.seed,
        checkpoint_every_steps=settings.checkpoint_every_steps,
        checkpoint_each_epoch=True,
        device=settings.device,
        base_model_id=pair.id,
        direction_storage=settings.direction_storage,
    )
    task = None
    if job.evaluation:
        task = TaskEvaluation(
            store.path(file_key(job.evaluation["file"])),
            job.evaluation["matcher"],
            job.evaluation.get("pattern"),
            job.evaluation.get("max_examples"),
        )
    return RecipeSpec(
        train=train,
        base_model=pair.base_model,
        cache_dir=settings.resolved_cache_dir / "alignment",
        reference_cache_dir=settings.resolved_cache_dir / "references",
        eval_suite=Path(pair.eval_suite) if pair.eval_suite else None,
        task=task,
        gate=team_gate(team, settings),
        limits=Limits(settings.max_job_steps, settings.max_job_tokens, settings.max_job_runtime_s),
        data_policy=DataPolicy.from_json(job.data_policy),
        data_scan=scan,
        eval_limit=settings.eval_max_prompts,
        max_lora_rank=settings.max_lora_rank,
        device_memory_bytes=(
            int(settings.device_memory_gb * 1024**3) if settings.device_memory_gb else None
        ),
    )


# Seconds the last evaluation of a pair took in this process, by (pair, prompt cap): the
# next job's estimated_finish adds it to training (the first job learns it as it evaluates).
EVALUATION_SECONDS: dict[tuple[str, int | None], float] = {}
# Evaluation progress events per job: one at the first batch, then every tenth of the prompts.
EVALUATION_EVENTS = 10


class JobHooks:
    """The recipe's hooks for one job: every callback writes through ``worker.persistence``."""

    def __init__(self, job: Job, context: JobContext, resources: ExitStack) -> None:
        """Nothing is written until the recipe calls in."""
        self.job, self.context, self.resources = job, context, resources
        self.status = job.status  # where the job stands when the recipe stops early
        self.sync: JobSync | None = None
        self.last_metrics: dict[str, Any] = {}
        self.evaluation_started: float | None = None
        self.evaluation_shown = -1  # the last tenth of the prompts reported

    def event(self, level: str, message: str, data: dict[str, Any] | None = None) -> None:
        """Append a message event to the job."""
        add_event(self.context, self.job.id, level, message, data)

    def start(self, checked: Any) -> Any:
        """Record the validation, take the job, and say where training resumes from."""
        from asft_core.recipe import Start

        context, job_id = self.context, self.job.id
        if checked is not None:
            target = "queued" if self.job.auto_start else "validated"
            if not end_validation(
                context, job_id, target, {**(self.job.validation or {}), **checked.to_dict()}
            ):
                self.status = "skipped"
                return None
            self.event(
                "info",
                f"Files validated: {checked.training_examples} examples, "
                f"{checked.training_tokens} tokens per epoch, {checked.total_steps} steps",
            )
            if checked.truncated_lines:
                lines = len(checked.truncated_lines)
                self.event("warn", f"{lines} rows longer than max_seq_len were truncated")
            if target == "validated":
                self.status = "validated"
                return None
        taken, self.status = claim(context, job_id)
        if not taken:
            return None
        # A worker killed mid-write leaves a temporary file, and one killed after archiving
        # its adapter an archive this attempt's adapter replaces; the lease is ours now.
        leftovers = context.store.remove_temporaries(job_key(job_id))
        if leftovers:
            self.event("info", f"Removed {leftovers} temporary files a killed worker left")
        forget_adapter_archive(context.store.path(job_key(job_id, "adapter")))
        resume = latest_checkpoint(context, job_id)
        if resume is not None:
            clear_job_outputs(context, job_id)
            self.event("info", f"Resuming from checkpoint {resume.name}")
        # Which worker trains, and the how-many-th time: "exactly once" is checkable per job.
        self.event(
            "info",
            "Fine-tuning started",
            {"worker": worker_identity(), "attempt": self.job.attempt + 1},
        )
        settings = context.settings
        interval = min(settings.metrics_interval_s or math.inf, settings.heartbeat_interval_s)
        self.sync = self.resources.enter_context(JobSync(context, job_id, interval))
        self.sync.evaluation_s = EVALUATION_SECONDS.get(evaluation_key(self.job, settings), 0.0)
        return Start(resume_from=resume)

    def on_evaluation(self, done: int, total: int) -> None:
        """Report evaluation progress now and then, with the finish time its rate implies."""
        clock = time.monotonic()
        if self.evaluation_started is None:
            self.evaluation_started = clock
        tenth = done * EVALUATION_EVENTS // max(total, 1)
        if tenth == self.evaluation_shown and done < total:
            return
        self.evaluation_shown = tenth
        elapsed = clock - self.evaluation_started
        remaining = elapsed / done * (total - done) if elapsed > 0 else None
        try:
            record_evaluation_progress(self.context, self.job.id, done, total, remaining)
        except Exception:  # progress is news, not the job: a lost write must not fail it
            logger.warning("job %s: evaluation progress not recorded", self.job.id, exc_info=True)

    def on_metrics(self, metrics: Any) -> None:
        """Buffer a step's metrics for the next sync."""
        assert self.sync is not None
        self.last_metrics = {
            "step": metrics.step,
            "train_loss": metrics.train_loss,
            "penalty": metrics.penalty,
        }
        self.sync.add(metrics)
        if self.context.settings.metrics_interval_s == 0:  # exact progress, at a write per step
            self.sync.flush()

    def on_checkpoint(self, info: Any) -> None:
        """Record a checkpoint whose files are in place, after the steps before it."""
        assert self.sync is not None
        self.sync.flush()
        metrics = dict(self.last_metrics)
        if info.full_valid_loss is not None:
            metrics["full_valid_loss"] = info.full_valid_loss
        record_checkpoint(self.context, self.job.id, info, metrics)

    def should_cancel(self) -> bool:
        """Stop at the next step: the worker is stopping, or the owner asked (last sync)."""
        return self.context.preempt.is_set() or bool(self.sync and self.sync.cancel_requested)

    def recipe_hooks(self) -> Any:
        """As the recipe takes them."""
        from asft_core.recipe import RecipeHooks
        from asft_core.training import TrainHooks

        return RecipeHooks(
            train=TrainHooks(
                on_event=self.event,
                on_metrics=self.on_metrics,
                on_checkpoint=self.on_checkpoint,
                should_cancel=self.should_cancel,
            ),
            on_stage=lambda stage: self.event("info", f"Stage: {stage}"),
            on_evaluation=self.on_evaluation,
            start=self.start,
        )


def evaluation_key(job: Job, settings: Any) -> tuple[str, int | None]:
    """What makes two jobs' evaluations take about as long: the pair and the prompt cap."""
    return job.model, settings.eval_max_prompts


def run_job(job: Job, pair: ModelPair, team: Team, context: JobContext) -> str:
    """Run the recipe on a job and record its outcome; returns the job's status."""
    from asft_core.recipe import describe_failure, run

    scan = training_scan(context, job.training_file)
    if job.status == "validating_files" and scan is not None and scan.status in SCANNING:
        # The scan task enqueues the job again when it ends.
        add_event(context, job.id, "info", "Waiting for the safety scan of the training file")
        return job.status
    with ExitStack() as resources:
        hooks = JobHooks(job, context, resources)
        try:
            spec = recipe_spec(job, pair, team, context, scan)
            result = run(spec, hooks.recipe_hooks(), validated=job.status == "queued")
            if hooks.sync is not None:
                hooks.sync.flush()
        except Exception as error:
            if database_unreachable(error):
                # Out of retries: nothing can be recorded, not even a failure. The lease goes
                # stale and the reconciler requeues the job, which resumes from its checkpoint.
                logger.exception("job %s stopped: the database stayed unreachable", job.id)
                raise
            failure = describe_failure(error)
            logger.exception("job %s failed", job.id)
            if hooks.sync is not None:
                with suppress(Exception):  # the steps before the error, if the database allows
                    hooks.sync.flush()
            # A failed job's final adapter is never served, and a full disk may have cut it
            # off mid-file: remove it (its checkpoints are complete, each moved into place).
            with suppress(OSError):
                context.store.delete(job_key(job.id, "adapter"))
            fail(context, job.id, failure.code, failure.message, failure.param)
            return "failed"
    if result.status == "stopped":
        return hooks.status
    if result.alignment_path is not None:
        record_alignment(context, job.model, result.alignment_path, result.alignment or {})
    if result.report is not None:
        key = evaluation_key(job, context.settings)
        EVALUATION_SECONDS[key] = result.report.evaluation_seconds
    assert hooks.sync is not None
    if result.cancelled and context.preempt.is_set() and not hooks.sync.cancel_requested:
        return requeue_preempted(context, job.id)
    status = finish(context, job.id, team, result)
    if status == "succeeded":
        register_served_adapter(context, job.id, team)
    return status


def register_served_adapter(context: JobContext, job_id: str, team: Team) -> None:
    """Give an approved adapter to its pair's inference server now (best effort: the first
    chat loads it otherwise)."""
    from service.inference import chat_target, register_adapter
    from service.jobs.create import Refused

    try:
        with transaction(context.engine) as session:
            job = session.get(Job, job_id)
            model = job.fine_tuned_model if job is not None else None
            if model is None:
                return
            target = chat_target(session, team, model, context.store, context.settings)
        if register_adapter(target, timeout_s=10):
            add_event(context, job_id, "info", f"Serving {model} for chat")
    except (Refused, SQLAlchemyError) as error:  # the job is done; serving is a courtesy
        logger.warning("job %s: adapter not registered for chat: %s", job_id, error)
