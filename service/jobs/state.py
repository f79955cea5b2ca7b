"""The job state machine: every allowed status change, in one place.

validating_files -> validated (dry run) | queued -> running -> succeeded | failed | cancelled,
and running -> queued when a job is requeued (its attempt count raised). A change is a
conditional ``UPDATE ... WHERE status = <expected>``, so a task delivered twice cannot move a
job twice; an illegal change raises instead of silently overwriting.
"""

from __future__ import annotations

import time
from typing import Any, Literal, get_args

from sqlalchemy import update
from sqlalchemy.orm import Session

from service.db.models import Job, now

Status = Literal[
    "validating_files", "validated", "queued", "running", "succeeded", "failed", "cancelled"
]
STATUSES: tuple[Status, ...] = get_args(Status)
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
# Jobs that count against a team's limit: they hold or wait for a GPU.
ACTIVE = frozenset({"validating_files", "queued", "running"})
TRANSITIONS: dict[str, frozenset[str]] = {
    "validating_files": frozenset({"validated", "queued", "failed", "cancelled"}),
    "validated": frozenset({"queued", "failed", "cancelled"}),
    "queued": frozenset({"running", "failed", "cancelled"}),
    "running": frozenset({"succeeded", "failed", "cancelled", "queued"}),
    "succeeded": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
}


class IllegalTransition(RuntimeError):
    """A status change the state machine does not allow."""


def check_transition(current: str, target: str) -> None:
    """Raise :class:`IllegalTransition` unless ``current -> target`` is allowed."""
    if target not in TRANSITIONS.get(current, frozenset()):
        raise IllegalTransition(f"a job cannot go from {current} to {target}")


def transition(session: Session, job_id: str, current: str, target: str, **values: Any) -> bool:
    """Move ``job_id`` from ``current`` to ``target`` (with other column ``values``).

    Returns False when the job was no longer in ``current`` (someone else moved it first).
    """
    check_transition(current, target)
    if target in TERMINAL:
        values.setdefault("finished_at", now())
    if target == "queued":  # sent to the broker again: it waits behind what is there
        values.setdefault("queued_ns", time.time_ns())
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == current)
        .values(status=target, updated_at=now(), **values)
        .execution_options(synchronize_session="fetch")
    )
    return bool(getattr(result, "rowcount", 0) == 1)


def fine_tuned_name(job: Job, team_name: str) -> str:
    """``ft:{model}:{team}:{suffix}:{id}``, the name a job's adapter is served under."""
    return f"ft:{job.model}:{team_name}:{job.suffix or ''}:{job.id.removeprefix('ftjob-')}"
