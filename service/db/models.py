"""SQLAlchemy 2 models: the service's state. The database, not the broker, is the truth.

Ids are prefixed random strings (``ftjob-...``), timestamps epoch seconds, as in the OpenAI
API. Artifact locations (``storage_key``) are built from ids only, never from user strings.
"""

from __future__ import annotations

import secrets
import time
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def now() -> int:
    """Epoch seconds, the API's timestamp unit."""
    return int(time.time())


def new_id(prefix: str) -> str:
    """A random id such as ``ftjob-3fK...``: unguessable, so ids leak nothing."""
    return f"{prefix}-{secrets.token_urlsafe(18).replace('_', 'x').replace('-', 'y')}"


class Base(DeclarativeBase):
    """Declarative base; JSON columns hold dicts and lists."""

    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


class Team(Base):
    """A tenant: owns keys, files, jobs and fine-tuned models."""

    __tablename__ = "teams"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[int] = mapped_column(Integer, default=now)
    # None means the service default (settings.max_active_jobs_per_team).
    max_active_jobs: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Safety gate: the fine-tuned model's harmful score, and its increase over the aligned one.
    gate_max_harmful_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    gate_max_harmful_increase: Mapped[float | None] = mapped_column(Float, nullable=True)
    # The team's default data policy (asft_core.spec.DataPolicy JSON); None: the service's.
    data_policy: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # Chat with adapters that failed the safety gate, and with unevaluated checkpoints.
    allow_unapproved_chat: Mapped[bool] = mapped_column(
        Boolean, default=False, server_default=false()
    )
    webhook_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Signs webhook bodies (HMAC-SHA256); made when a URL is first set, shown to the admin.
    webhook_secret: Mapped[str | None] = mapped_column(String(64), nullable=True)


class ApiKey(Base):
    """A bearer key of a team, stored as its SHA-256 only (a random token needs no slow hash)."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # The first characters of the key, so a user can tell keys apart in listings.
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[int] = mapped_column(Integer, default=now)
    revoked_at: Mapped[int | None] = mapped_column(Integer, nullable=True)


class File(Base):
    """An uploaded dataset; its bytes live in the artifact store under ``storage_key``."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"))
    filename: Mapped[str] = mapped_column(String(255))  # shown back only, never a path
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[int] = mapped_column(Integer, default=now)
    storage_key: Mapped[str] = mapped_column(String(255))
    # Dataset validation at upload: "processed" or "error" (with the rule's code and line).
    status: Mapped[str] = mapped_column(String(16), default="processed")
    status_details: Mapped[str | None] = mapped_column(Text, nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_line: Mapped[int | None] = mapped_column(Integer, nullable=True)
    row_format: Mapped[str | None] = mapped_column(String(32), nullable=True)
    num_examples: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # The safety scan of a valid file (service.scans): pending, running, succeeded, failed or
    # skipped (invalid files, or no guard); flagged rows are FileFlag rows.
    scan_status: Mapped[str] = mapped_column(String(16), default="skipped")
    scan_rows: Mapped[int] = mapped_column(Integer, default=0)
    scan_flagged: Mapped[int] = mapped_column(Integer, default=0)
    scan_per_category: Mapped[dict[str, int] | None] = mapped_column(JSON, nullable=True)
    scan_details: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Written with each batch: a running scan whose worker died goes stale and is redone.
    scan_updated_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # When the scan's message was last sent and in which broker epoch (cleared when a worker
    # takes it), as for jobs: the reconciler re-sends only a message that can have been lost.
    scan_sent_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    scan_sent_epoch: Mapped[str | None] = mapped_column(String(64), nullable=True)

    __table_args__ = (Index("ix_files_team_created", "team_id", "created_at", "id"),)


class FileFlag(Base):
    """A row of an uploaded file that the safety scan flagged (line numbers from 1)."""

    __tablename__ = "file_flags"

    file_id: Mapped[str] = mapped_column(
        ForeignKey("files.id", ondelete="CASCADE"), primary_key=True
    )
    line: Mapped[int] = mapped_column(Integer, primary_key=True)
    category: Mapped[str] = mapped_column(String(64))
    score: Mapped[float] = mapped_column(Float)


class ModelPair(Base):
    """A registered model: the aligned (chat) model that is fine-tuned, and its base."""

    __tablename__ = "model_pairs"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)  # the name jobs use
    aligned_model: Mapped[str] = mapped_column(Text)  # local folder or hub id
    base_model: Mapped[str] = mapped_column(Text)
    eval_suite: Mapped[str | None] = mapped_column(Text, nullable=True)  # path of a suite JSON
    # The inference server chat goes to (None: the service's), and the name it serves the
    # aligned model under (None: the aligned model's reference, what the embedded one uses).
    inference_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    served_model: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[int] = mapped_column(Integer, default=now)


class Job(Base):
    """A fine-tuning job. Status changes go through ``service.jobs.state`` only."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(ForeignKey("model_pairs.id"))
    # Plain ids, not foreign keys: a finished job keeps its record when its files are deleted.
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64), nullable=True)
    status: Mapped[str] = mapped_column(String(32), index=True)
    method: Mapped[dict[str, Any]] = mapped_column(JSON)  # {"type", "<type>": {"hyperparameters"}}
    evaluation: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # What the job does with the rows the safety scan flagged (asft_core.spec.DataPolicy).
    data_policy: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    safety: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    validation: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    seed: Mapped[int] = mapped_column(Integer)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON, nullable=True)
    auto_start: Mapped[bool] = mapped_column(Boolean, default=True)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    error_param: Mapped[str | None] = mapped_column(String(128), nullable=True)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(255), nullable=True)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    estimated_finish: Mapped[int | None] = mapped_column(Integer, nullable=True)
    result_files: Mapped[list[Any]] = mapped_column(JSON, default=list)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    # Workers that died under the job (not cancels, SIGTERM requeues or database outages):
    # at ASFT_MAX_WORKER_LOSSES it fails with worker_lost instead of taking down another.
    worker_losses: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The lease of the worker running the job, renewed by its heartbeat thread; a stale
    # heartbeat lets the reconciler hand the job to another worker.
    lease_owner: Mapped[str | None] = mapped_column(String(255), nullable=True)
    heartbeat_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[int] = mapped_column(Integer, default=now)
    # When the job last joined the queue (created, started, requeued), to the nanosecond:
    # the order of the jobs waiting for a worker, as the broker hands them out.
    queued_ns: Mapped[int | None] = mapped_column(BigInteger, default=time.time_ns, nullable=True)
    # When the job's message was last sent and in which broker epoch (service.queue); null
    # when none is outstanding (a worker took it): the reconciler re-sends only a lost one.
    sent_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    sent_epoch: Mapped[str | None] = mapped_column(String(64), nullable=True)
    started_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    finished_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    updated_at: Mapped[int] = mapped_column(Integer, default=now, onupdate=now)

    __table_args__ = (
        UniqueConstraint("team_id", "idempotency_key", name="uq_jobs_team_idempotency"),
        Index("ix_jobs_team_created", "team_id", "created_at", "id"),
        # /metrics reads the last finished jobs at every scrape: without it, all jobs sorted.
        Index("ix_jobs_finished_at", "finished_at"),
    )


class JobEvent(Base):
    """A line of a job's log: ``message`` events and ``metrics`` events (one per step)."""

    __tablename__ = "job_events"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, default=lambda: new_id("ftevent"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[int] = mapped_column(Integer, default=now)
    level: Mapped[str] = mapped_column(String(8))  # info | warn | error
    type: Mapped[str] = mapped_column(String(16), default="message")  # message | metrics
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # Set on metrics events: a replayed step updates its row instead of adding one.
    step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Metrics events: the charted figures again, as columns, so a chart of 100k steps is
    # aggregated by the database without parsing each row's JSON (service.jobs.curves).
    train_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    penalty: Mapped[float | None] = mapped_column(Float, nullable=True)
    learning_rate: Mapped[float | None] = mapped_column(Float, nullable=True)

    __table_args__ = (
        Index("ix_job_events_job_seq", "job_id", "seq"),
        UniqueConstraint("job_id", "type", "step", name="uq_job_events_step"),
    )


class Checkpoint(Base):
    """A saved training state of a job: adapter plus resume state, in the artifact store."""

    __tablename__ = "checkpoints"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[int] = mapped_column(Integer, default=now)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    storage_key: Mapped[str] = mapped_column(String(255))

    __table_args__ = (UniqueConstraint("job_id", "step", name="uq_checkpoints_job_step"),)


class EvaluationReport(Base):
    """The safety and utility evaluation of a job's adapter."""

    __tablename__ = "evaluation_reports"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    created_at: Mapped[int] = mapped_column(Integer, default=now)
    approved: Mapped[bool] = mapped_column(Boolean)
    report: Mapped[dict[str, Any]] = mapped_column(JSON)


class FineTunedModel(Base):
    """A job's final adapter, served as ``fine_tuned_model``."""

    __tablename__ = "fine_tuned_models"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)  # ft:{model}:{team}:...
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    model: Mapped[str] = mapped_column(ForeignKey("model_pairs.id"))
    storage_key: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    approved: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[int] = mapped_column(Integer, default=now)

    # GET /v1/models lists a team's models newest first: without it, every team's are read.
    __table_args__ = (Index("ix_fine_tuned_models_team_created", "team_id", "created_at"),)


class AlignmentArtifactRow(Base):
    """A cached alignment direction of a model pair (the file lives in the cache folder)."""

    __tablename__ = "alignment_artifacts"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_pair: Mapped[str] = mapped_column(ForeignKey("model_pairs.id", ondelete="CASCADE"))
    cache_key: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str] = mapped_column(Text)
    summary: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[int] = mapped_column(Integer, default=now)
