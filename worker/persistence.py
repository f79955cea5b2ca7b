"""The worker's database side: each function is one short transaction, retried while the
database is unreachable (``retry_database``), so a PostgreSQL restart pauses a running job
instead of failing it.

The database row, not the queue message, is the truth: statuses move with conditional
updates (``service.jobs.state``), so a message delivered twice never runs a job twice, and
checkpoints and metric events are keyed by (job, step), so a replay after a crash updates
rows in place instead of adding duplicates.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Concatenate, NamedTuple, ParamSpec, TypeVar

from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.exc import DBAPIError, OperationalError

from asft_core.spec import DataScan
from service.db.models import (
    Checkpoint,
    EvaluationReport,
    File,
    FineTunedModel,
    Job,
    JobEvent,
    ModelPair,
    Team,
    new_id,
    now,
)
from service.db.session import transaction
from service.db.upsert import upsert
from service.jobs.events import append_event
from service.jobs.state import TERMINAL, fine_tuned_name, transition
from service.scans import SCANNING, data_scan
from service.settings import Settings
from service.storage import ArtifactStore, adapter_archive, job_key

logger = logging.getLogger("asft.worker")


def worker_identity() -> str:
    """Who holds a lease: host and process."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class JobContext:
    """What a run needs besides the job row."""

    settings: Settings
    engine: Engine
    store: ArtifactStore
    # Puts a job id back on the queue (the Celery app's send); None: nothing to requeue with.
    requeue: Callable[[str], None] | None = None
    # Set when the worker is asked to stop (SIGTERM): checkpoint, requeue, return.
    preempt: threading.Event = field(default_factory=threading.Event)


P = ParamSpec("P")
R = TypeVar("R")
# The longest wait between two tries of a database operation (the waits double up to it).
DATABASE_RETRY_MAX_DELAY_S = 5.0


def database_unreachable(error: BaseException) -> bool:
    """Whether ``error`` says the database could not be reached (worth trying again)."""
    # OperationalError: refused, dropped or timed out (also SQLite's "database is locked"); a
    # statement on a connection the server closed during a restart is reported as a
    # DBAPIError whose connection was invalidated.
    return isinstance(error, OperationalError) or (
        isinstance(error, DBAPIError) and error.connection_invalidated
    )


def retry_database(
    function: Callable[Concatenate[JobContext, P], R],
) -> Callable[Concatenate[JobContext, P], R]:
    """Call ``function(context, ...)`` again, after doubling waits, while the database is
    unreachable, for up to ``context.settings.database_retry_s`` seconds.

    Every decorated function is one transaction that is safe to repeat (upserts keyed by
    step, conditional status changes), so a try whose commit was lost does no harm.
    """

    @functools.wraps(function)
    def retried(context: JobContext, *args: P.args, **kwargs: P.kwargs) -> R:
        deadline = time.monotonic() + context.settings.database_retry_s
        delay_s = 0.25
        while True:
            try:
                return function(context, *args, **kwargs)
            except DBAPIError as error:
                if not database_unreachable(error) or time.monotonic() + delay_s > deadline:
                    raise
                logger.warning(
                    "database unreachable in %s; trying again in %.2fs: %s",
                    function.__name__,
                    delay_s,
                    error.orig,
                )
                time.sleep(delay_s)
                delay_s = min(delay_s * 2, DATABASE_RETRY_MAX_DELAY_S)

    return retried


@retry_database
def add_event(
    context: JobContext, job_id: str, level: str, message: str, data: dict[str, Any] | None = None
) -> None:
    """Append a message event."""
    with transaction(context.engine) as session:
        append_event(session, job_id, level, message, data)


# What a replayed step (a resumed job) rewrites of its metrics event.
METRICS_EVENT_UPDATE = ("message", "data", "train_loss", "penalty", "learning_rate", "created_at")


def _metrics_event(job_id: str, metrics: Any) -> dict[str, Any]:
    """The metrics event row of one step (``StepMetrics``)."""
    message = f"Step {metrics.step}/{metrics.total_steps}: loss={metrics.train_loss:.4f}"
    if metrics.penalty:
        message += f", penalty={metrics.penalty:.3e}"
    return {
        "id": new_id("ftevent"),
        "job_id": job_id,
        "level": "info",
        "type": "metrics",
        "message": message,
        "data": {
            "step": metrics.step,
            "total_steps": metrics.total_steps,
            "train_loss": metrics.train_loss,
            "penalty": metrics.penalty,
            "loss": metrics.loss,
            "learning_rate": metrics.learning_rate,
            "tokens_per_s": metrics.tokens_per_s,
            "trained_tokens": metrics.trained_tokens,
        },
        "step": metrics.step,
        "train_loss": metrics.train_loss,
        "penalty": metrics.penalty,
        "learning_rate": metrics.learning_rate,
        "created_at": now(),
    }


def sync_job(context: JobContext, job_id: str, steps: list[Any], evaluation_s: float = 0.0) -> bool:
    """Write the buffered steps' metrics events and progress, renew the lease; one transaction.

    ``evaluation_s`` is the evaluation still to come after training, for
    ``estimated_finish``. Returns whether the owner asked to cancel the job.
    """
    with transaction(context.engine) as session:
        for metrics in steps:
            upsert(
                session,
                JobEvent,
                _metrics_event(job_id, metrics),
                conflict=("job_id", "type", "step"),
                update=METRICS_EVENT_UPDATE,
            )
        progress: dict[str, Any] = {"heartbeat_at": now()}
        if steps:
            progress["trained_tokens"] = steps[-1].trained_tokens
            progress["estimated_finish"] = now() + math.ceil(steps[-1].eta_s + evaluation_s)
        session.execute(
            update(Job).where(Job.id == job_id, Job.status == "running").values(**progress)
        )
        return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


@retry_database
def record_evaluation_progress(
    context: JobContext, job_id: str, done: int, total: int, remaining_s: float | None
) -> None:
    """An ``Evaluating: done/total prompts`` event, and ``estimated_finish`` from its rate."""
    with transaction(context.engine) as session:
        append_event(
            session,
            job_id,
            "info",
            f"Evaluating: {done}/{total} prompts",
            {"prompts_done": done, "prompts_total": total},
        )
        if remaining_s is not None:
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == "running")
                .values(estimated_finish=now() + math.ceil(remaining_s))
            )


@retry_database
def record_checkpoint(context: JobContext, job_id: str, info: Any, metrics: dict[str, Any]) -> None:
    """Upsert the checkpoint row of a step (its files are already in place)."""
    key = job_key(job_id, "checkpoints", info.path.name)
    with transaction(context.engine) as session:
        upsert(
            session,
            Checkpoint,
            {
                "id": new_id("ftckpt"),
                "job_id": job_id,
                "step": info.step,
                "metrics": metrics,
                "storage_key": key,
                "created_at": now(),
            },
            conflict=("job_id", "step"),
            update=("metrics", "storage_key"),
        )


@retry_database
def fail(
    context: JobContext, job_id: str, code: str, message: str, param: str | None = None
) -> None:
    """Move a job to ``failed`` from whatever live status it is in, with an error event."""
    with transaction(context.engine) as session:
        job = session.get(Job, job_id)
        if job is None or job.status in TERMINAL:
            return
        transition(
            session,
            job_id,
            job.status,
            "failed",
            error_code=code,
            error_message=message,
            error_param=param,
            lease_owner=None,
        )
    add_event(context, job_id, "error", f"{code}: {message}")


@retry_database
def latest_checkpoint(context: JobContext, job_id: str) -> Path | None:
    """The folder of the job's newest checkpoint whose files exist."""
    with transaction(context.engine) as session:
        rows = session.scalars(
            select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step.desc())
        ).all()
    for row in rows:
        folder = context.store.path(row.storage_key)
        if (folder / "trainer_state.json").exists():
            return folder
    return None


@retry_database
def clear_job_outputs(context: JobContext, job_id: str) -> None:
    """Remove rows a previous attempt left after its last checkpoint (nothing is duplicated)."""
    with transaction(context.engine) as session:
        session.execute(delete(EvaluationReport).where(EvaluationReport.job_id == job_id))
        session.execute(delete(FineTunedModel).where(FineTunedModel.job_id == job_id))


@retry_database
def load_job(context: JobContext, job_id: str) -> tuple[Job, ModelPair | None, Team | None] | None:
    """A job with its model pair and team (None when the job does not exist)."""
    with transaction(context.engine) as session:
        job = session.get(Job, job_id)
        if job is None:
            return None
        return job, session.get(ModelPair, job.model), session.get(Team, job.team_id)


@retry_database
def took_message(context: JobContext, job_id: str) -> None:
    """Record that this worker took the job's message: none is outstanding any more, so
    the reconciler sends another if the job is still waiting a period later."""
    with transaction(context.engine) as session:
        session.execute(update(Job).where(Job.id == job_id).values(sent_at=None, sent_epoch=None))


@retry_database
def training_scan(context: JobContext, file_id: str) -> DataScan | None:
    """The safety scan of a job's training file (None when the file is gone)."""
    with transaction(context.engine) as session:
        file = session.get(File, file_id)
        return data_scan(session, file) if file is not None else None


@retry_database
def end_validation(
    context: JobContext, job_id: str, target: str, validation: dict[str, Any]
) -> bool:
    """Move a validated job on to ``target``; False when it was no longer validating."""
    with transaction(context.engine) as session:
        return transition(session, job_id, "validating_files", target, validation=validation)


@retry_database
def claim(context: JobContext, job_id: str) -> tuple[bool, str]:
    """Take a queued job under this worker's lease: (taken, the job's status)."""
    with transaction(context.engine) as session:
        current = session.get(Job, job_id)
        assert current is not None
        if current.status != "queued" or not transition(
            session,
            job_id,
            "queued",
            "running",
            started_at=current.started_at or now(),
            attempt=current.attempt + 1,
            lease_owner=worker_identity(),
            heartbeat_at=now(),
        ):
            return False, current.status
        return True, "running"


@retry_database
def notify(context: JobContext, job_id: str) -> threading.Thread | None:
    """Send the team's webhook for a finished job, with retries, from a thread of its own.

    The outcome is recorded as a job event. Returns the thread (None without a webhook).
    """
    from service.jobs.objects import job_object
    from service.webhooks import deliver, payload

    with transaction(context.engine) as session:
        job = session.get(Job, job_id)
        team = session.get(Team, job.team_id) if job else None
        if job is None or team is None or not team.webhook_url or not team.webhook_secret:
            return None
        url, secret = team.webhook_url, team.webhook_secret
        body = payload(job_object(job).model_dump(mode="json"), new_id("evt"))
    settings = context.settings

    def send() -> None:
        delivered, attempts, outcome = deliver(
            url,
            secret,
            body,
            settings.webhook_allowlist,
            attempts=settings.webhook_attempts,
            backoff_s=settings.webhook_backoff_s,
        )
        verdict = "delivered" if delivered else "not delivered"
        add_event(
            context,
            job_id,
            "info" if delivered else "warn",
            f"Webhook {body['type']} {verdict} ({outcome}, {attempts} attempt(s))",
        )

    # Not a daemon: a worker shutting down finishes its deliveries first.
    thread = threading.Thread(target=send, name=f"webhook-{job_id}")
    thread.start()
    return thread


@retry_database
def record_alignment(
    context: JobContext, pair_id: str, path: Path, summary: dict[str, Any]
) -> None:
    """Remember a pair's cached alignment artifact (once per cache key)."""
    from service.db.models import AlignmentArtifactRow

    # Two workers may finish the same pair at once: the second insert does nothing.
    with transaction(context.engine) as session:
        upsert(
            session,
            AlignmentArtifactRow,
            {
                "id": new_id("align"),
                "model_pair": pair_id,
                "cache_key": path.stem,
                "path": str(path),
                "summary": summary,
                "created_at": now(),
            },
            conflict=("cache_key",),
        )


@retry_database
def requeue_preempted(context: JobContext, job_id: str) -> str:
    """The worker is stopping: the job (checkpointed by the trainer) goes back to the queue."""
    with transaction(context.engine) as session:
        moved = transition(session, job_id, "running", "queued", lease_owner=None)
    if moved:
        add_event(
            context, job_id, "warn", "The worker is shutting down; job checkpointed and requeued"
        )
        if context.requeue is not None:
            context.requeue(job_id)
    return "queued"


@retry_database
def finish(context: JobContext, job_id: str, team: Team, result: Any) -> str:
    """Record a ``RecipeResult``: cancelled, or the adapter, the report and the gate's verdict."""
    sha256 = None
    folder = context.store.path(job_key(job_id, "adapter"))
    if not result.cancelled and folder.is_dir():
        # The archive downloads serve, built now so the model can show its checksum; a
        # failure (a full disk) must not keep the result from being recorded.
        try:
            sha256 = adapter_archive(folder)[1]
        except OSError:
            logger.exception("could not build the adapter archive of %s", job_id)
    with transaction(context.engine) as session:
        job = session.get(Job, job_id)
        assert job is not None
        if job.status != "running" or job.lease_owner != worker_identity():
            # Recorded by an earlier try whose commit reply was lost, or the lease went to
            # another worker (the reconciler judged this one dead): record nothing twice.
            return job.status
        if result.cancelled:
            transition(session, job_id, "running", "cancelled", lease_owner=None)
            append_event(session, job_id, "info", "Job cancelled")
            return "cancelled"
        name = fine_tuned_name(job, team.name)
        report, verdict = result.report, result.report.gate
        safety = {
            "harmful_score_before": report.harmful_score("reference"),
            "harmful_score_after": report.harmful_score("fine_tuned"),
            "accuracy_before": report.task_accuracy("reference"),
            "accuracy_after": report.task_accuracy("fine_tuned"),
            "approved": verdict.approved,
            "failures": list(verdict.failures),
        }
        session.add(
            EvaluationReport(job_id=job_id, approved=verdict.approved, report=report.to_json())
        )
        session.add(
            FineTunedModel(
                id=name,
                team_id=job.team_id,
                job_id=job_id,
                model=job.model,
                storage_key=job_key(job_id, "adapter"),
                sha256=sha256,
                approved=verdict.approved,
            )
        )
        values: dict[str, Any] = {
            "fine_tuned_model": name,
            "trained_tokens": result.train.trained_tokens,
            "safety": safety,
            "estimated_finish": None,
            "lease_owner": None,
        }
        if verdict.approved:
            transition(session, job_id, "running", "succeeded", **values)
            message = f"The job has successfully completed: {name}"
        else:
            transition(
                session,
                job_id,
                "running",
                "failed",
                error_code="safety_gate_failed",
                error_message="the adapter failed the safety gate: " + "; ".join(verdict.failures),
                **values,
            )
            message = "Safety gate failed: " + "; ".join(verdict.failures)
        append_event(session, job_id, "info" if verdict.approved else "error", message)
    return "succeeded" if verdict.approved else "failed"


class JobSync:
    """A running job's link to its row, from a thread of its own.

    Every ``interval_s`` it writes the step metrics buffered since its last write, renews the
    lease and reads the cancel flag, in one transaction: a training step only appends to a
    list and reads a flag, so a slow or unreachable database never stalls training (the
    buffer waits for the next beat). Loading, alignment and evaluation have no steps, and the
    lease is renewed through them too.
    """

    def __init__(self, context: JobContext, job_id: str, interval_s: float) -> None:
        """Prepare (entering the context starts the thread)."""
        self.context, self.job_id, self.interval_s = context, job_id, interval_s
        self.cancel_requested = False
        self.evaluation_s = 0.0  # the evaluation expected after training (estimated_finish)
        self._pending: list[Any] = []
        self._lock = threading.Lock()  # one write at a time: the thread's, or flush()'s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sync-{job_id}", daemon=True)

    def add(self, metrics: Any) -> None:
        """Buffer one step's metrics (written at the next beat)."""
        self._pending.append(metrics)

    def _write(self) -> None:
        with self._lock:
            steps = list(self._pending)
            self.cancel_requested = sync_job(self.context, self.job_id, steps, self.evaluation_s)
            del self._pending[: len(steps)]

    def flush(self) -> None:
        """Write what is buffered now, retried while the database is unreachable."""
        retry_database(lambda context: self._write())(self.context)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._write()
            except Exception:  # a database blip must not kill the job; the next beat retries
                logger.exception(
                    "sync of %s failed; %d steps wait", self.job_id, len(self._pending)
                )

    def __enter__(self) -> JobSync:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=max(self.interval_s, 5.0))


class Reconciled(NamedTuple):
    """What a reconciler pass did: jobs whose worker died (requeued, or failed as poison
    after too many losses), and waiting jobs and pending scans (by file) whose message it sent
    again, with why."""

    requeued: list[str]
    resent: dict[str, str]
    lost: list[str]
    rescanned: dict[str, str]


def _worker_lost(session: Any, job: Job, max_losses: int) -> str | None:
    """Count a dead worker against ``job``: requeue it, or fail it once it killed
    ``max_losses`` workers (a poison job: most often out of memory).

    Returns ``"queued"`` or ``"failed"``, or None when the job had moved on meanwhile.
    """
    losses = job.worker_losses + 1
    last_step = session.scalar(
        select(func.max(JobEvent.step)).where(JobEvent.job_id == job.id, JobEvent.type == "metrics")
    )
    where = f"worker {job.lease_owner or 'unknown'}, after step {last_step or 0}"
    data = {"worker": job.lease_owner, "last_step": last_step, "loss": losses, "of": max_losses}
    if losses < max_losses:
        if transition(session, job.id, "running", "queued", lease_owner=None, worker_losses=losses):
            message = f"The worker running this job died ({where}; loss {losses} of {max_losses})"
            append_event(session, job.id, "warn", message + "; requeued", data)
            return "queued"
        return None
    message = (
        f"the job's worker died {losses} times (last: {where}); most often a job that outgrows "
        "the device's memory: try a smaller batch_size or max_seq_len"
    )
    if transition(
        session,
        job.id,
        "running",
        "failed",
        lease_owner=None,
        worker_losses=losses,
        error_code="worker_lost",
        error_message=message,
    ):
        append_event(session, job.id, "error", f"worker_lost: {message}", data)
        return "failed"
    return None


def reconcile(
    context: JobContext, queue: Any, stale_after_s: int = 60, requeue_running: bool = True
) -> Reconciled:
    """Re-enqueue what the broker may have lost; returns the jobs requeued and re-sent.

    Running jobs whose heartbeat is older than ``stale_after_s`` (their worker died) go back
    to ``queued`` and resume from their last checkpoint. A job waiting in ``queued`` or
    ``validating_files`` for longer than that gets a fresh message only when its last one can
    have been lost (see :func:`lost_message`); one that only waits for a busy worker does not,
    so a long queue puts no duplicates on the broker. A duplicate is harmless all the same: the
    conditional status changes let one worker run the job.

    ``requeue_running=False`` skips the stale leases: right after a database outage every
    heartbeat looks old, although the workers holding them are alive.
    """
    from service.queue import broker_epoch, send_job, send_scan

    epoch = broker_epoch(queue)  # read before sending: a message sent in a new epoch is safe
    cutoff = now() - stale_after_s
    requeued: list[str] = []
    lost: list[str] = []
    resent: dict[str, str] = {}
    with transaction(context.engine) as session:
        stale = (
            session.scalars(
                select(Job).where(
                    Job.status == "running",
                    (Job.heartbeat_at.is_(None)) | (Job.heartbeat_at < cutoff),
                )
            ).all()
            if requeue_running
            else []
        )
        for job in stale:
            outcome = _worker_lost(session, job, context.settings.max_worker_losses)
            if outcome is not None:
                (lost if outcome == "failed" else requeued).append(job.id)
        waiting = session.scalars(
            select(Job).where(
                Job.status.in_(("queued", "validating_files")),
                Job.updated_at < cutoff,
                Job.id.not_in(requeued),
            )
        ).all()
        for job in waiting:
            reason = lost_message(session, job, epoch, context.settings.visibility_timeout_s)
            if reason is not None:
                resent[job.id] = reason
        scans = _lost_scans(
            session, cutoff, requeue_running, epoch, context.settings.visibility_timeout_s
        )
    for job_id in [*requeued, *resent]:
        send_job(queue, context.engine, job_id, epoch)
    for file_id in scans:
        send_scan(queue, context.engine, file_id, epoch)
    for job_id in lost:
        context.store.remove_temporaries(job_key(job_id))  # no worker holds it any more
        notify(context, job_id)
    return Reconciled(requeued, resent, lost, scans)


def lost_message(session: Any, job: Job, epoch: str | None, visibility_s: int) -> str | None:
    """Why the message of waiting ``job`` can have been lost, or None while it is still on
    the broker (``epoch``: the broker's now, from ``service.queue.broker_epoch``)."""
    if job.sent_at is None:
        file = session.get(File, job.training_file) if job.status == "validating_files" else None
        if file is not None and file.scan_status in SCANNING:
            return None  # the scan sends it when it ends (and is itself reconciled)
    return _sent_message_lost(job.sent_at, job.sent_epoch, epoch, visibility_s)


def _sent_message_lost(
    sent_at: int | None, sent_epoch: str | None, epoch: str | None, visibility_s: int
) -> str | None:
    """Why a message recorded as sent at ``sent_at`` in ``sent_epoch`` (None: taken by a
    worker, or never sent) can have been lost, or None while it is on the broker."""
    if sent_at is None:
        return "no message is outstanding: the worker that took it may have died"
    if sent_epoch != epoch:
        return "the broker lost its messages (restarted or flushed)"
    if sent_at < now() - visibility_s:
        return "no worker took it within the visibility timeout"
    return None


def _lost_scans(
    session: Any, cutoff: int, requeue_running: bool, epoch: str | None, visibility_s: int
) -> dict[str, str]:
    """Scans whose worker died (running, no progress since ``cutoff``) go back to pending;
    returns the pending scans whose message can have been lost (by file, with why), touched.
    A scan that only waits for a busy worker is left alone: its message is on the broker."""
    if requeue_running:
        session.execute(
            update(File)
            .where(File.scan_status == "running", File.scan_updated_at < cutoff)
            .values(scan_status="pending")
        )
    pending = session.execute(
        select(File.id, File.scan_sent_at, File.scan_sent_epoch).where(
            File.scan_status == "pending", File.scan_updated_at < cutoff
        )
    ).all()
    lost = {}
    for file_id, sent_at, sent_epoch in pending:
        if (reason := _sent_message_lost(sent_at, sent_epoch, epoch, visibility_s)) is not None:
            lost[file_id] = reason
    if lost:
        session.execute(update(File).where(File.id.in_(lost)).values(scan_updated_at=now()))
    return lost
