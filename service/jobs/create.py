"""Creating a job: the rules a request must meet, and the row it becomes.

The API parses the request into a :class:`NewJob`; :func:`create_job` checks the model, the
files and the team's limit, stores the job with its typed spec and first events, and refuses
with :class:`Refused`, whose ``kind`` the API turns into a status.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from asft_core.formats import iter_examples
from asft_core.spec import DataPolicy, JobSpec
from service.db.models import File, Job, ModelPair, Team, new_id
from service.jobs.events import append_event
from service.jobs.state import ACTIVE
from service.settings import Settings
from service.storage import ArtifactStore, is_id

MAX_OVERLAP_REPORTED = 20


class Refused(Exception):
    """A request the service will not carry out: ``kind`` is why, ``code`` the detail."""

    def __init__(
        self,
        kind: Literal["not_found", "invalid", "limit", "forbidden"],
        code: str,
        message: str,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.kind, self.code, self.message, self.param = kind, code, message, param


@dataclass(frozen=True)
class NewJob:
    """A parsed job request; ``evaluation`` is the matcher's settings (its file id optional)."""

    model: str
    training_file: str
    spec: JobSpec
    validation_file: str | None = None
    evaluation: dict[str, Any] | None = None
    seed: int | None = None
    suffix: str | None = None
    metadata: dict[str, str] | None = None
    auto_start: bool = True
    idempotency_key: str | None = None
    data_policy: DataPolicy | None = None  # None: the team's default


def check_active_limit(session: Session, team: Team, settings: Settings) -> None:
    """Refuse (``too_many_active_jobs``) when the team already has its limit of active jobs."""
    limit = team.max_active_jobs or settings.max_active_jobs_per_team
    active = session.scalar(
        select(func.count()).select_from(Job).where(Job.team_id == team.id, Job.status.in_(ACTIVE))
    )
    if (active or 0) >= limit:
        raise Refused(
            "limit",
            "too_many_active_jobs",
            f"team {team.name} has {active} queued or running jobs, its limit is {limit}; "
            "wait for one to finish or cancel one",
        )


def _usable_file(
    session: Session, team_id: str, file_id: str, param: str, min_examples: int
) -> File:
    row = session.get(File, file_id) if is_id(file_id) else None
    if row is None or row.team_id != team_id:  # another team's file looks missing
        raise Refused("not_found", "file_not_found", f"{param}: no file {file_id!r}", param)
    if row.status == "error":
        raise Refused(
            "invalid", row.error_code or "invalid_file", f"{param}: {row.status_details}", param
        )
    if (row.num_examples or 0) < min_examples:
        raise Refused(
            "invalid",
            "invalid_n_examples",
            f"{param} has {row.num_examples} examples; at least {min_examples} are needed",
            param,
        )
    return row


def _example_keys(path: Path) -> dict[str, int]:
    """A digest of each example's messages -> its line, for the train/validation overlap."""
    keys: dict[str, int] = {}
    with path.open("rb") as handle:
        for example in iter_examples(handle):
            text = json.dumps([[m.role, m.content.strip()] for m in example.messages])
            keys.setdefault(hashlib.sha256(text.encode()).hexdigest(), example.line)
    return keys


def overlap_lines(training: Path, validation: Path) -> list[int]:
    """The validation lines whose example also appears in the training file."""
    train_keys = _example_keys(training)
    return sorted(line for key, line in _example_keys(validation).items() if key in train_keys)


def _evaluation(session: Session, team_id: str, new: NewJob) -> dict[str, Any] | None:
    if new.evaluation is None:
        return None
    file_id = new.evaluation.get("file") or new.validation_file
    if file_id is None:
        raise Refused(
            "invalid",
            "missing_evaluation_file",
            "evaluation needs a held-out file: set evaluation.file or validation_file",
            "evaluation.file",
        )
    held_out = _usable_file(session, team_id, file_id, "evaluation.file", 1)
    if held_out.row_format != "prompt_completion":
        raise Refused(
            "invalid",
            "invalid_evaluation_file",
            "the evaluation file must hold prompt/completion rows (the completion, or a "
            "'label' field, is the reference answer)",
            "evaluation.file",
        )
    return {**new.evaluation, "file": file_id}


def _by_idempotency_key(session: Session, team_id: str, key: str | None) -> Job | None:
    if not key:
        return None
    return session.scalar(select(Job).where(Job.team_id == team_id, Job.idempotency_key == key))


def create_job(
    session: Session, team: Team, settings: Settings, store: ArtifactStore, new: NewJob
) -> tuple[Job, bool]:
    """Check and store a job in ``validating_files``; returns (the job, whether it is new).

    A request repeating an earlier one's idempotency key gets that job back, not a new one.
    """
    existing = _by_idempotency_key(session, team.id, new.idempotency_key)
    if existing is not None:
        return existing, False
    if session.get(ModelPair, new.model) is None:
        raise Refused(
            "not_found",
            "model_not_found",
            f"no registered model {new.model!r} (GET /v1/models lists them)",
            "model",
        )
    training = _usable_file(
        session, team.id, new.training_file, "training_file", settings.min_training_examples
    )
    validation = None
    if new.validation_file is not None:
        validation = _usable_file(session, team.id, new.validation_file, "validation_file", 1)
    evaluation = _evaluation(session, team.id, new)
    check_active_limit(session, team, settings)
    warnings = []
    if validation is not None:
        overlap = overlap_lines(
            store.path(training.storage_key), store.path(validation.storage_key)
        )
        if overlap:
            shown = ", ".join(str(line) for line in overlap[:MAX_OVERLAP_REPORTED])
            more = ", ..." if len(overlap) > MAX_OVERLAP_REPORTED else ""
            warnings.append(
                f"{len(overlap)} validation examples also appear in the training file "
                f"(validation lines {shown}{more})"
            )
    job = Job(
        id=new_id("ftjob"),
        team_id=team.id,
        model=new.model,
        training_file=new.training_file,
        validation_file=new.validation_file,
        status="validating_files",
        method=new.spec.to_json(),
        evaluation=evaluation,
        data_policy=(new.data_policy or DataPolicy.from_json(team.data_policy)).to_json(),
        validation={
            "training_examples": training.num_examples,
            "validation_examples": validation.num_examples if validation else None,
            "warnings": warnings,
        },
        seed=new.seed if new.seed is not None else secrets.randbelow(2**31),
        suffix=new.suffix,
        metadata_=new.metadata,
        auto_start=new.auto_start,
        # An empty header is no key: storing "" would make every later keyless retry collide.
        idempotency_key=new.idempotency_key or None,
    )
    session.add(job)
    append_event(session, job.id, "info", f"Created fine-tuning job: {job.id}")
    for warning in warnings:
        append_event(session, job.id, "warn", warning)
    try:
        session.commit()
    except IntegrityError:
        # A concurrent retry with the same idempotency key won the race: answer with its job.
        session.rollback()
        existing = _by_idempotency_key(session, team.id, new.idempotency_key)
        if existing is None:
            raise
        return existing, False
    return job, True
