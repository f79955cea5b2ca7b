"""``/v1/fine_tuning/jobs``: create, list, read, cancel and start jobs; events, checkpoints,
reports and adapters.

Creation checks everything that needs no model before any GPU time is spent (files exist and
belong to the team, their rows follow the format rules, enough examples, the model is
registered, the team is under its limit), commits the job, and only then enqueues its id.
Token counts need the model's tokenizer, so the worker adds them while the job is
``validating_files``.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from api.conditional import NOT_MODIFIED, conditional_json
from api.deps import (
    CurrentTeam,
    CurrentTeamId,
    QueueDep,
    SessionDep,
    SettingsDep,
    StoreDep,
    read_in_session,
)
from api.errors import Conflict, NotFound, Unprocessable, refused
from api.lookup import owned_row
from api.pagination import descending_by, newest_first, team_rows
from api.schemas.common import Page, errors, json_page, page_of
from api.schemas.jobs import (
    METADATA_MAX_KEYS,
    JobCheckpoint,
    JobCreate,
    JobMetrics,
    JobReport,
    MetricPoint,
    ValidationPoint,
    check_metadata_pair,
    job_spec,
)
from api.schemas.jobs import JobEvent as JobEventObject
from api.schemas.models import PAIR_ID_PATTERN
from asft_core.spec import Method as MethodName
from asft_core.spec import SpecError
from service.db.models import (
    Checkpoint,
    EvaluationReport,
    FineTunedModel,
    Job,
    JobEvent,
    Team,
)
from service.jobs import create as creation
from service.jobs.create import NewJob, Refused, check_active_limit
from service.jobs.curves import job_curves
from service.jobs.events import append_event
from service.jobs.objects import FineTuningJob, job_object, queue_position, queue_positions
from service.jobs.state import TERMINAL, Status, fine_tuned_name, transition
from service.queue import send_job
from service.storage import ID_PATTERN, adapter_archive

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning jobs"])
logger = logging.getLogger("asft.api")
MAX_OVERLAP_REPORTED = 20


def get_team_job(session: SessionDep, team_id: str, job_id: str) -> Job:
    """The team's job ``job_id``; another team's answers 404 like a missing one."""
    missing = NotFound("job_not_found", f"no fine-tuning job {job_id!r}", "fine_tuning_job_id")
    return owned_row(session, Job, job_id, team_id, missing)


@router.post(
    "",
    response_model=FineTuningJob,
    responses=errors(404, 409, 413, 429),
    summary="Create a fine-tuning job",
)
def create_job(
    team: CurrentTeam,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    queue: QueueDep,
    body: JobCreate,
    idempotency_key: Annotated[
        str | None,
        Header(
            max_length=255,
            # Printable ASCII, as in any header: a NUL could not be stored on PostgreSQL.
            pattern=r"^[\x20-\x7e]*$",
            description="A retry with the same key returns the same job.",
        ),
    ] = None,
) -> FineTuningJob:
    """Validate the request and the datasets, create the job, then enqueue it.

    A plain ``def``: everything here blocks (queries, reading both datasets for their
    overlap, the broker), so FastAPI runs it in its thread pool, off the event loop.
    """
    try:
        new = NewJob(
            model=body.model,
            training_file=body.training_file,
            spec=job_spec(body),
            validation_file=body.validation_file,
            evaluation=body.evaluation.model_dump() if body.evaluation else None,
            seed=body.seed,
            suffix=body.suffix,
            metadata=body.metadata,
            auto_start=body.auto_start,
            idempotency_key=idempotency_key,
            data_policy=body.data_policy.policy() if body.data_policy else None,
        )
        job, created = creation.create_job(session, team, settings, store, new)
    except SpecError as error:  # the schema checks the same rules; this is the last word
        raise Unprocessable(error.code, str(error), error.param) from None
    except Refused as error:
        raise refused(error) from None
    if created:
        try:
            send_job(queue, session.get_bind(), job.id)
        except Exception:  # the broker is down: the reconciler re-enqueues jobs it never got
            logger.exception("could not enqueue job %s", job.id)
    return job_object(job, queue_position(session, job))


def _metadata_filters(request: Request) -> list[tuple[str, str]]:
    """The query's ``metadata[key]=value`` pairs, held to the rules of stored metadata (422
    ``invalid_metadata_filter``): a filter no job could match is a mistake, not an empty list.
    """
    pairs: list[tuple[str, str]] = []
    for name, value in request.query_params.multi_items():
        if name.startswith("metadata[") and name.endswith("]"):
            key = name[len("metadata[") : -1]
            try:
                check_metadata_pair(key, value)
            except ValueError as error:
                raise Unprocessable("invalid_metadata_filter", f"{name}: {error}", name) from None
            pairs.append((key, value))
    if len(pairs) > METADATA_MAX_KEYS:
        raise Unprocessable(
            "invalid_metadata_filter", f"at most {METADATA_MAX_KEYS} metadata filters", "metadata"
        )
    return pairs


def _metadata_equals(session: SessionDep, key: str, value: str) -> ColumnElement[bool]:
    """``metadata[key] == value``, on either database."""
    if session.get_bind().dialect.name == "sqlite":
        # SQLite matches a JSON path against the key as stored, escapes and all ("é" is
        # stored as "\u00e9"), so a path never finds a key with a quote, a backslash or a
        # non-ASCII letter; json_each compares the decoded keys.
        entries = func.json_each(Job.metadata_).table_valued("key", "value")
        return select(entries.c.key).where(entries.c.key == key, entries.c.value == value).exists()
    return Job.metadata_[key].as_string() == value


@router.get("", response_model=Page[FineTuningJob], responses={**errors(404), **NOT_MODIFIED})
def list_jobs(
    request: Request,
    team_id: CurrentTeamId,
    session: SessionDep,
    after: Annotated[str | None, Query(max_length=64, pattern=ID_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    status: Status | None = None,
    model: Annotated[str | None, Query(max_length=64, pattern=PAIR_ID_PATTERN)] = None,
    method: MethodName | None = None,
) -> Response:
    """The team's jobs, newest first; filter by ``status``, ``model`` (the pair), ``method``
    and ``metadata[key]=value``. The page has an ``ETag`` for conditional polling."""
    statement = team_rows(Job, team_id)
    if status is not None:
        statement = statement.where(Job.status == status)
    if model is not None:
        statement = statement.where(Job.model == model)
    if method is not None:
        statement = statement.where(Job.method["type"].as_string() == method)
    for key, value in _metadata_filters(request):
        statement = statement.where(_metadata_equals(session, key, value))
    # The cursor is looked up among all the team's jobs: the last job of a page may have
    # changed status since, and must not end the listing with invalid_cursor.
    jobs, has_more = newest_first(
        session, statement, Job, after, limit, cursor_scope=team_rows(Job, team_id)
    )
    positions = queue_positions(session, jobs)
    encoded = [_encoded(job, positions.get(job.id)) for job in jobs]
    body = json_page(encoded, [job.id for job in jobs], has_more)
    return conditional_json(request, body)


def _encoded(job: Job, position: int | None = None) -> bytes:
    """The job as the API sends it (``position``: where it waits in the queue)."""
    return job_object(job, position).model_dump_json(by_alias=True).encode()


def _read_job(session: Session, *, team_id: str, job_id: str) -> bytes:
    """The job's answer as sent (raises the 404 for another team's job)."""
    job = get_team_job(session, team_id, job_id)
    position = queue_position(session, job)
    session.commit()
    return _encoded(job, position)


@router.get(
    "/{fine_tuning_job_id}", response_model=FineTuningJob, responses={**errors(404), **NOT_MODIFIED}
)
async def get_job(request: Request, team_id: CurrentTeamId, fine_tuning_job_id: str) -> Response:
    """One job. Send the ``ETag`` of the last answer as ``If-None-Match`` to get a bodiless
    304 while the job has not changed."""
    read = functools.partial(_read_job, team_id=team_id, job_id=fine_tuning_job_id)
    return conditional_json(request, await read_in_session(request, read))


@router.post(
    "/{fine_tuning_job_id}/cancel", response_model=FineTuningJob, responses=errors(404, 409)
)
def cancel_job(team: CurrentTeam, session: SessionDep, fine_tuning_job_id: str) -> FineTuningJob:
    """Cancel a job. A running one stops within one training step, keeping its checkpoint."""
    job = get_team_job(session, team.id, fine_tuning_job_id)
    # The worker may move the job between our read and our conditional update; then the
    # update matches nothing, and we look again instead of claiming a cancel that did not
    # happen. Before running, statuses only move forward, so this ends.
    while True:
        if job.status in TERMINAL:
            raise Conflict("job_not_cancellable", f"the job is already {job.status}", "status")
        if job.status == "running":
            job.cancel_requested = True
            append_event(
                session, job.id, "info", "Cancellation requested; stopping after this step"
            )
            break
        if transition(session, job.id, job.status, "cancelled", cancel_requested=True):
            append_event(session, job.id, "info", "Job cancelled")
            break
        session.refresh(job)
    # Commit before answering: the session dependency commits only after the response is
    # sent, so a client's next request (a second cancel) could still see the old status.
    session.commit()
    session.refresh(job)
    return job_object(job, queue_position(session, job))


@router.post(
    "/{fine_tuning_job_id}/start",
    response_model=FineTuningJob,
    responses=errors(404, 409, 429),
)
def start_job(
    team: CurrentTeam,
    session: SessionDep,
    settings: SettingsDep,
    queue: QueueDep,
    fine_tuning_job_id: str,
) -> FineTuningJob:
    """Queue a job created with ``auto_start: false`` once it is ``validated``."""
    job = get_team_job(session, team.id, fine_tuning_job_id)
    if job.status != "validated":
        raise Conflict("job_not_startable", f"only validated jobs start; it is {job.status}")
    # A validated job holds no slot, so queueing it must respect the limit like a new job.
    try:
        check_active_limit(session, team, settings)
    except Refused as error:
        raise refused(error) from None
    if not transition(session, job.id, "validated", "queued"):
        raise Conflict("job_not_startable", "the job left validated while it was being started")
    append_event(session, job.id, "info", "Job queued")
    session.commit()
    try:
        send_job(queue, session.get_bind(), job.id)
    except Exception:
        logger.exception("could not enqueue job %s", job.id)
    session.refresh(job)
    return job_object(job, queue_position(session, job))


@router.get(
    "/{fine_tuning_job_id}/events",
    response_model=Page[JobEventObject],
    responses={**errors(404), **NOT_MODIFIED},
)
def list_events(
    request: Request,
    team_id: CurrentTeamId,
    session: SessionDep,
    fine_tuning_job_id: str,
    after: Annotated[str | None, Query(max_length=64, pattern=ID_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> Response:
    """The job's events, newest first (``metrics`` events carry per-step figures). The page
    has an ``ETag``: send it as ``If-None-Match`` to get a bodiless 304 until a new event."""
    get_team_job(session, team_id, fine_tuning_job_id)
    statement = select(JobEvent).where(JobEvent.job_id == fine_tuning_job_id)
    rows, has_more = descending_by(
        session, statement, JobEvent, JobEvent.seq, after, limit, "event"
    )
    data = [
        JobEventObject(
            id=row.id,
            created_at=row.created_at,
            level=row.level,
            message=row.message,
            type=row.type,
            data=row.data,
        )
        for row in rows
    ]
    return conditional_json(
        request, page_of(data, has_more).model_dump_json(by_alias=True).encode()
    )


@router.get(
    "/{fine_tuning_job_id}/metrics",
    response_model=JobMetrics,
    responses={**errors(404), **NOT_MODIFIED},
)
def get_metrics(
    request: Request,
    team_id: CurrentTeamId,
    session: SessionDep,
    fine_tuning_job_id: str,
    resolution: Annotated[
        int, Query(ge=2, le=10_000, description="the most points to return")
    ] = 500,
) -> Response:
    """The job's training curves: per-step metrics averaged into at most ``resolution``
    points (with each bucket's lowest and highest train loss), and the validation loss of
    each checkpoint. Conditional like the events: a bodiless 304 until a new step."""
    get_team_job(session, team_id, fine_tuning_job_id)
    curves = job_curves(session, fine_tuning_job_id, resolution)
    body = JobMetrics(
        fine_tuning_job_id=fine_tuning_job_id,
        resolution=resolution,
        bucket_steps=curves.bucket_steps,
        steps_recorded=curves.steps_recorded,
        last_step=curves.last_step,
        total_steps=curves.total_steps,
        data=[MetricPoint(**point) for point in curves.points],
        validation=[ValidationPoint(**point) for point in curves.validation],
    )
    return conditional_json(request, body.model_dump_json().encode())


def _checkpoint_object(row: Checkpoint, job: Job, team: Team) -> JobCheckpoint:
    return JobCheckpoint(
        id=row.id,
        created_at=row.created_at,
        fine_tuned_model_checkpoint=f"{fine_tuned_name(job, team.name)}:ckpt-step-{row.step}",
        step_number=row.step,
        metrics=row.metrics,
        fine_tuning_job_id=job.id,
    )


@router.get(
    "/{fine_tuning_job_id}/checkpoints",
    response_model=Page[JobCheckpoint],
    responses=errors(404),
)
def list_checkpoints(
    team: CurrentTeam,
    session: SessionDep,
    fine_tuning_job_id: str,
    after: Annotated[str | None, Query(max_length=64, pattern=ID_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> Page[JobCheckpoint]:
    """The job's checkpoints, newest (highest step) first."""
    job = get_team_job(session, team.id, fine_tuning_job_id)
    statement = select(Checkpoint).where(Checkpoint.job_id == job.id)
    # Ordered by step, not (created_at, id): a fast job saves several checkpoints within one
    # second, and random ids would then list them in a random order.
    rows, has_more = descending_by(
        session, statement, Checkpoint, Checkpoint.step, after, limit, "checkpoint"
    )
    data = [_checkpoint_object(row, job, team) for row in rows]
    return page_of(data, has_more)


@router.get("/{fine_tuning_job_id}/report", response_model=JobReport, responses=errors(404, 409))
def get_report(team: CurrentTeam, session: SessionDep, fine_tuning_job_id: str) -> JobReport:
    """The safety and utility evaluation of the job's adapter, once it exists."""
    job = get_team_job(session, team.id, fine_tuning_job_id)
    report = session.get(EvaluationReport, job.id)
    if report is None:
        raise Conflict("report_not_ready", f"the job is {job.status}; no report yet")
    return JobReport(
        fine_tuning_job_id=job.id,
        created_at=report.created_at,
        approved=report.approved,
        report=report.report,
    )


_ARCHIVE: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"application/gzip": {}},
        "description": "A tar.gz holding adapter/ (PEFT files and the report); the "
        "X-Content-SHA256 header carries its sha256.",
    }
}


def _archive_response(folder: Path, name: str, approved: bool) -> FileResponse:
    if not folder.is_dir():
        raise NotFound("adapter_not_found", "the adapter files are gone")
    archive, sha256 = adapter_archive(folder)
    return FileResponse(
        archive,
        media_type="application/gzip",
        filename=name,
        headers={"X-Content-SHA256": sha256, "X-ASFT-Approved": str(approved).lower()},
    )


@router.get(
    "/{fine_tuning_job_id}/adapter",
    response_class=FileResponse,
    responses={**errors(404, 409), **_ARCHIVE},
)
def get_adapter(
    team: CurrentTeam, session: SessionDep, store: StoreDep, fine_tuning_job_id: str
) -> FileResponse:
    """The job's final adapter (also when the safety gate failed: marked not approved)."""
    job = get_team_job(session, team.id, fine_tuning_job_id)
    model = session.scalar(select(FineTunedModel).where(FineTunedModel.job_id == job.id))
    if model is None and job.fine_tuned_model is not None:
        raise NotFound("model_deleted", f"{job.fine_tuned_model} was deleted with its adapter")
    if model is None and job.status in TERMINAL:
        raise Conflict(
            "adapter_not_ready",
            f"the job ended {job.status} without a final adapter; its checkpoints' adapters "
            "remain (GET .../checkpoints, then .../checkpoints/{step}/adapter)",
        )
    if model is None:
        raise Conflict("adapter_not_ready", f"the job is {job.status}; no adapter yet")
    return _archive_response(
        store.path(model.storage_key), f"{job.id}-adapter.tar.gz", model.approved
    )


@router.get(
    "/{fine_tuning_job_id}/checkpoints/{step}/adapter",
    response_class=FileResponse,
    responses={**errors(404), **_ARCHIVE},
)
def get_checkpoint_adapter(
    team: CurrentTeam,
    session: SessionDep,
    store: StoreDep,
    fine_tuning_job_id: str,
    # The range of the column: a larger number names no checkpoint, and SQLite cannot even
    # compare it (an overflow, which was a 500).
    step: Annotated[int, PathParam(ge=0, le=2**31 - 1)],
) -> FileResponse:
    """The adapter saved at checkpoint ``step``."""
    job = get_team_job(session, team.id, fine_tuning_job_id)
    row = session.scalar(
        select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.step == step)
    )
    if row is None:
        raise NotFound("checkpoint_not_found", f"no checkpoint at step {step}", "step")
    folder = store.path(row.storage_key) / "adapter"
    return _archive_response(folder, f"{job.id}-step-{step}-adapter.tar.gz", approved=False)
