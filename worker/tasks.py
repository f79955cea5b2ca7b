"""Celery tasks: thin. Load the job, run it through ``worker.runner``, nothing else."""

from __future__ import annotations

from celery.signals import worker_process_init

from api.db.session import engine_for
from api.queue import RUN_JOB_TASK
from api.settings import get_settings
from api.storage import ArtifactStore
from worker.celery_app import app
from worker.runner import JobContext, execute_job


@worker_process_init.connect
def _fresh_connections(**_: object) -> None:
    # A forked worker process must not share the parent's database connections.
    engine_for(get_settings().resolved_database_url).dispose(close=False)


def _context() -> JobContext:
    settings = get_settings()
    return JobContext(
        settings=settings,
        engine=engine_for(settings.resolved_database_url),
        store=ArtifactStore(settings.resolved_artifact_dir),
    )


@app.task(name=RUN_JOB_TASK, acks_late=True)
def run_job(job_id: str) -> str:
    """Run one fine-tuning job (validation, training, evaluation, gate); returns its status."""
    return execute_job(job_id, _context())
