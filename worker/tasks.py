"""Celery tasks: thin. Jobs run through ``worker.runner``, file scans through ``worker.scan``.

Every worker process also runs the reconciler: once at start and then periodically in a
thread of its own (so it runs while the worker trains), re-enqueueing jobs whose worker died
or whose message the broker lost. ``asft.reconcile`` is the same pass as a task, for Celery
beat.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

from celery.signals import (
    setup_logging,
    worker_init,
    worker_process_init,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)

from service.db.session import engine_for
from service.logs import configure_logging
from service.queue import RUN_JOB_TASK, SCAN_FILE_TASK, send_job
from service.settings import get_settings
from service.storage import ArtifactStore
from worker.celery_app import app
from worker.persistence import JobContext, Reconciled, reconcile
from worker.runner import execute_job
from worker.scan import scan_file

logger = logging.getLogger("asft.worker")
RECONCILE_TASK = "asft.reconcile"
_stop_reconciler = threading.Event()
# Set on SIGTERM (warm shutdown): the running job checkpoints and is requeued, not lost.
_preempt = threading.Event()


@setup_logging.connect
def _json_logs(**_: object) -> None:
    # Connecting this signal stops Celery from installing its own text handlers.
    configure_logging(get_settings().log_level)


@worker_process_init.connect
def _fresh_connections(**_: object) -> None:
    # A forked worker process must not share the parent's database connections.
    engine_for(get_settings().resolved_database_url).dispose(close=False)


@worker_process_init.connect
def _file_size_limit_is_an_error(**_: object) -> None:
    # A write past the file-size limit (RLIMIT_FSIZE, a quota) must raise EFBIG, which fails
    # the job with storage_full, not deliver SIGXFSZ, which kills the worker and loses the
    # job's error. Python ignores it at start already; a host that embeds it may not.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _context() -> JobContext:
    settings = get_settings()
    engine = engine_for(settings.resolved_database_url)
    return JobContext(
        settings=settings,
        engine=engine,
        store=ArtifactStore(settings.resolved_artifact_dir),
        requeue=lambda job_id: send_job(app, engine, job_id),
        preempt=_preempt,
    )


@app.task(name=RUN_JOB_TASK, acks_late=True)
def run_job(job_id: str) -> str:
    """Run one fine-tuning job (validation, training, evaluation, gate); returns its status."""
    return execute_job(job_id, _context())


@app.task(name=SCAN_FILE_TASK, acks_late=True)
def scan_uploaded_file(file_id: str) -> str:
    """Scan an uploaded file's rows with the guard; returns how the scan ended."""
    return scan_file(file_id, _context())


@app.task(name=RECONCILE_TASK)
def reconcile_jobs(requeue_running: bool = True) -> Reconciled:
    """One reconciler pass; returns the jobs it requeued and the waiting ones it re-sent."""
    return reconcile(_context(), app, get_settings().stale_after_s, requeue_running)


def _reconcile_forever() -> None:
    stale_after_s = get_settings().stale_after_s
    interval = max(1.0, stale_after_s / 2)
    failed_at = -float(stale_after_s)  # monotonic time of the last failed pass
    while True:
        # After an outage every heartbeat looks stale, though the workers holding the leases
        # kept training (their writes wait for the database): judge leases again only once
        # the database has answered for a whole stale period.
        trusted = time.monotonic() - failed_at >= stale_after_s
        try:
            passed = reconcile_jobs(requeue_running=trusted)
            if passed.lost:
                logger.error("reconciler failed %s: worker_lost, too often", ", ".join(passed.lost))
            if passed.requeued:
                logger.warning(
                    "reconciler requeued %s: their worker died", ", ".join(passed.requeued)
                )
            for job_id, why in passed.resent.items():
                logger.info("reconciler re-sent the message of %s: %s", job_id, why)
            for file_id, why in passed.rescanned.items():
                logger.info("reconciler re-sent the scan of %s: %s", file_id, why)
        except Exception:  # the database or the broker may be restarting: try next period
            failed_at = time.monotonic()
            logger.exception("reconciler pass failed")
        if _stop_reconciler.wait(interval):
            return


@worker_init.connect
def _check_device(**_: object) -> None:
    # A worker that cannot use its device would fail every job it takes: stop it at once.
    from asft_core.training import TrainingError, check_device

    device = get_settings().device
    try:
        resolved = check_device(device)
    except TrainingError as error:
        raise SystemExit(f"asft worker: ASFT_DEVICE={device}: {error}") from None
    logger.info("worker trains on %s (ASFT_DEVICE=%s)", resolved, device)


@worker_ready.connect
def _start_reconciler(**_: object) -> None:
    # Import the ML stack now, so the first job does not pay for it.
    import asft_core.recipe
    import asft_core.training  # noqa: F401

    threading.Thread(target=_reconcile_forever, name="reconciler", daemon=True).start()


@worker_shutting_down.connect
def _preempt_running_job(**_: object) -> None:
    _preempt.set()


@worker_shutdown.connect
def _stop(**_: object) -> None:
    _stop_reconciler.set()


app.conf.beat_schedule = {
    "reconcile": {"task": RECONCILE_TASK, "schedule": max(1.0, get_settings().stale_after_s / 2)}
}
