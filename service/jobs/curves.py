"""A job's training curves at a chosen resolution, reduced in the database.

A job writes one metrics event per step, so a long job holds 100k of them; a chart needs a
few hundred points. Steps are grouped into equal buckets and each bucket is averaged by the
database over the events' figure columns (``train_loss``, ``penalty``, ``learning_rate``,
copies of their JSON kept for this), so neither the rows nor their JSON reach Python; the
bucket's lowest and highest train loss keep spikes visible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.db.models import Checkpoint, JobEvent

# The per-step figures averaged per bucket: columns of the metrics events.
CURVE_FIELDS = ("train_loss", "penalty", "learning_rate")


@dataclass(frozen=True)
class Curves:
    """What ``job_curves`` found: the points, oldest step first, and how they were made."""

    steps_recorded: int
    last_step: int | None
    total_steps: int | None
    bucket_steps: int
    points: list[dict[str, Any]]
    validation: list[dict[str, Any]]


def job_curves(session: Session, job_id: str, resolution: int) -> Curves:
    """At most ``resolution`` points of the job's metrics, plus its checkpoints' validation
    loss (``full_valid_loss``, written when the job has a validation file)."""
    metrics = (JobEvent.job_id == job_id, JobEvent.type == "metrics")
    count, last = session.execute(
        select(func.count(), func.max(JobEvent.step)).where(*metrics)
    ).one()
    validation = [
        {"step": step, "full_valid_loss": float(loss)}
        for step, loss in session.execute(
            select(Checkpoint.step, Checkpoint.metrics["full_valid_loss"].as_float())
            .where(Checkpoint.job_id == job_id)
            .order_by(Checkpoint.step)
        ).all()
        if loss is not None
    ]
    if not count or last is None:
        return Curves(0, None, None, 1, [], validation)
    bucket = max(1, math.ceil(last / resolution))
    group = (JobEvent.step - 1) // bucket
    rows = session.execute(
        select(
            func.max(JobEvent.step),
            func.count(),
            func.min(JobEvent.train_loss),
            func.max(JobEvent.train_loss),
            *(func.avg(getattr(JobEvent, name)) for name in CURVE_FIELDS),
        )
        .where(*metrics)
        .group_by(group)
        .order_by(group)
    ).all()
    points = [
        {
            "step": row[0],
            "steps": row[1],
            "train_loss_min": row[2],
            "train_loss_max": row[3],
            **{name: _number(value) for name, value in zip(CURVE_FIELDS, row[4:], strict=True)},
        }
        for row in rows
    ]
    total = session.scalar(
        select(JobEvent.data["total_steps"].as_integer()).where(*metrics, JobEvent.step == last)
    )
    return Curves(count, last, total, bucket, points, validation)


def _number(value: Any) -> float | None:
    # PostgreSQL's avg() of floats is a float, SQLite's too; Decimal would not serialise.
    return None if value is None else float(value)
