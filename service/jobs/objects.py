"""A job as clients see it, in API answers and in webhook events alike."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.db.models import Job
from service.jobs.state import Status


class JobError(BaseModel):
    """Why a job failed."""

    code: str
    message: str
    param: str | None = None


class JobHyperparameters(BaseModel):
    """OpenAI's top-level hyperparameters echo."""

    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float


class FineTuningJob(BaseModel):
    """The ``fine_tuning.job`` object, plus ``evaluation``, ``safety`` and ``validation``."""

    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    id: str = Field(examples=["ftjob-Gq3kLx0sTfR1kq5mC3pZyA7d"])
    model: str
    created_at: int
    finished_at: int | None = None
    fine_tuned_model: str | None = None
    organization_id: str
    result_files: list[str] = Field(default_factory=list)
    status: Status
    validation_file: str | None = None
    training_file: str
    hyperparameters: JobHyperparameters
    trained_tokens: int | None = None
    error: JobError | None = None
    user_provided_suffix: str | None = None
    seed: int
    estimated_finish: int | None = None
    integrations: list[Any] = Field(default_factory=list)
    metadata: dict[str, str] | None = None
    method: dict[str, Any]
    evaluation: dict[str, Any] | None = None
    data_policy: dict[str, Any] | None = Field(
        None, description="What the job does with training rows the safety scan flagged."
    )
    safety: dict[str, Any] | None = Field(
        None, description="Harmful score before/after and the gate verdict, once evaluated."
    )
    validation: dict[str, Any] | None = Field(
        None, description="Dataset checks: example counts, token counts, warnings."
    )
    queue_position: int | None = Field(
        None,
        description="While the job waits for a worker: 1 + the jobs (of any team) waiting "
        "since before it; null once a worker runs it (and in webhook events).",
    )


# Statuses of a job that waits for a worker to take it.
WAITING: tuple[Status, ...] = ("validating_files", "queued")


def queue_positions(session: Session, jobs: list[Job]) -> dict[str, int]:
    """Where each of ``jobs`` that waits for a worker stands in the queue (1: next).

    The order is when each job last joined the queue, as the broker hands jobs out. One
    query ranks every waiting job, however many of ``jobs`` wait; none when none waits.
    """
    wanted = {job.id for job in jobs if job.status in WAITING and job.queued_ns is not None}
    if not wanted:
        return {}
    rank = func.row_number().over(order_by=(Job.queued_ns, Job.id)).label("rank")
    ranked = (
        select(Job.id, rank).where(Job.status.in_(WAITING), Job.queued_ns.is_not(None)).subquery()
    )
    rows = session.execute(select(ranked.c.id, ranked.c.rank).where(ranked.c.id.in_(wanted)))
    return {job_id: int(position) for job_id, position in rows}


def queue_position(session: Session, job: Job) -> int | None:
    """Where ``job`` waits for a worker (1: next), or None when it does not wait."""
    return queue_positions(session, [job]).get(job.id)


def job_object(job: Job, position: int | None = None) -> FineTuningJob:
    """The API shape of a job row (``position``: its :func:`queue_position`)."""
    hyper = job.method[job.method["type"]]["hyperparameters"]
    error = (
        JobError(code=job.error_code, message=job.error_message or "", param=job.error_param)
        if job.error_code
        else None
    )
    return FineTuningJob(
        id=job.id,
        model=job.model,
        created_at=job.created_at,
        finished_at=job.finished_at,
        fine_tuned_model=job.fine_tuned_model,
        organization_id=job.team_id,
        result_files=job.result_files or [],
        status=job.status,
        validation_file=job.validation_file,
        training_file=job.training_file,
        hyperparameters=JobHyperparameters(
            n_epochs=hyper["n_epochs"],
            batch_size=hyper["batch_size"],
            learning_rate_multiplier=hyper["learning_rate_multiplier"],
        ),
        trained_tokens=job.trained_tokens,
        error=error,
        user_provided_suffix=job.suffix,
        seed=job.seed,
        estimated_finish=job.estimated_finish,
        metadata=job.metadata_,
        method=job.method,
        evaluation=job.evaluation,
        data_policy=job.data_policy,
        safety=job.safety,
        validation=job.validation,
        queue_position=position,
    )
