"""The Celery side the API needs: the app's configuration and enqueueing by task name.

The API enqueues with ``send_task`` and a job id only, after the job's row is committed, so it
never imports ``worker`` or torch; the worker builds its app from the same function.
"""

from __future__ import annotations

from celery import Celery

from service.broker import TRANSPORT
from service.settings import Settings

RUN_JOB_TASK = "asft.run_job"
SCAN_FILE_TASK = "asft.scan_file"
GPU_QUEUE = "gpu"


def make_celery(settings: Settings) -> Celery:
    """A Celery app for ``settings``: the filesystem broker by default, else the broker URL."""
    app = Celery("asft", broker=settings.resolved_broker_url)
    if settings.broker_url is None:
        folders = {name: settings.broker_dir / name for name in ("out", "processed", "control")}
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        # Kombu's filesystem transport, with messages that appear whole (see service.broker).
        app.conf.broker_transport = TRANSPORT
        app.conf.broker_transport_options = {
            "data_folder_in": str(folders["out"]),
            "data_folder_out": str(folders["out"]),
            "processed_folder": str(folders["processed"]),
            "store_processed": False,
            # Control messages (pings, shutdown) too, or Celery writes them into the cwd.
            "control_folder": str(folders["control"]),
            "polling_interval": 0.1,
        }
    else:
        # Redis hands an unacknowledged message to another worker after this long; it must
        # outlast the longest job, or a running job would be delivered twice (the lease
        # would stop the second run, but the message would be wasted).
        app.conf.broker_transport_options = {"visibility_timeout": settings.visibility_timeout_s}
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=GPU_QUEUE,
        broker_connection_retry_on_startup=True,
    )
    return app


def enqueue_job(app: Celery, job_id: str) -> None:
    """Put ``job_id`` on the GPU queue; call only after the job's row is committed."""
    app.send_task(RUN_JOB_TASK, args=[job_id], queue=GPU_QUEUE)


def enqueue_scan(app: Celery, file_id: str) -> None:
    """Put the safety scan of ``file_id`` on the GPU queue (the guard runs where models do)."""
    app.send_task(SCAN_FILE_TASK, args=[file_id], queue=GPU_QUEUE)
