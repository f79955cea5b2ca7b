"""A job's log: message events, written by the API and the worker alike."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from service.db.models import JobEvent


def append_event(
    session: Session, job_id: str, level: str, message: str, data: dict[str, Any] | None = None
) -> None:
    """Add a message event (info, warn or error) to ``job_id``'s log in ``session``."""
    session.add(JobEvent(job_id=job_id, level=level, message=message, data=data))
