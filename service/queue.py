"""The Celery side the API needs: the app's configuration and enqueueing by task name.

The API enqueues with ``send_task`` and a job id only, after the job's row is committed, so it
never imports ``worker`` or torch; the worker builds its app from the same function.
"""

from __future__ import annotations

import os
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from sqlalchemy import Connection, Engine, update

from service.broker import TRANSPORT
from service.db.models import File, Job, now
from service.db.session import transaction
from service.settings import Settings

RUN_JOB_TASK = "asft.run_job"
# The Redis key (and broker-folder file) naming the broker's current contents.
EPOCH_KEY = "asft:broker-epoch"
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


def broker_epoch(app: Celery) -> str | None:
    """An id of the broker's contents, which changes when the broker loses its messages.

    A Redis restarted without persistence or flushed loses the key with the messages, and a
    removed broker folder loses its marker file; the next call names a new epoch. None for a
    broker it cannot tell (a message there counts as lost only after the visibility timeout).
    """
    if app.conf.broker_transport == TRANSPORT:
        folder = Path(app.conf.broker_transport_options["data_folder_in"]).parent
        return _folder_epoch(folder / "epoch")
    url = str(app.conf.broker_url)
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return None
    client = _redis(url)
    client.set(EPOCH_KEY, uuid.uuid4().hex, nx=True)
    value = client.get(EPOCH_KEY)
    return value.decode() if isinstance(value, bytes) else None


@lru_cache(maxsize=4)
def _redis(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=10)


def _folder_epoch(marker: Path) -> str:
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        draft = marker.with_name(f".epoch-{uuid.uuid4().hex}")
        draft.write_text(uuid.uuid4().hex)
        try:
            os.link(draft, marker)  # never replaces a marker another process made meanwhile
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    return marker.read_text()


def send_job(
    app: Celery, engine: Engine | Connection, job_id: str, epoch: str | None = None
) -> None:
    """Put ``job_id`` on the GPU queue, recording when and in which :func:`broker_epoch`.

    The reconciler re-sends a waiting job's message only when it can have been lost (see
    ``worker.persistence.reconcile``). The record comes first and is undone if sending fails,
    so a worker that takes the message always finds it. Call after the job's row is committed;
    ``epoch``: the broker's, when the caller has just read it.
    """
    epoch = broker_epoch(app) if epoch is None else epoch
    _send_recorded(app, engine, RUN_JOB_TASK, job_id, update(Job).where(Job.id == job_id), epoch)


def send_scan(
    app: Celery, engine: Engine | Connection, file_id: str, epoch: str | None = None
) -> None:
    """Put the safety scan of ``file_id`` on the GPU queue (the guard runs where models do),
    recording when and in which broker epoch, as :func:`send_job` does for jobs."""
    epoch = broker_epoch(app) if epoch is None else epoch
    row = update(File).where(File.id == file_id)
    _send_recorded(app, engine, SCAN_FILE_TASK, file_id, row, epoch, prefix="scan_")


def _send_recorded(
    app: Celery,
    engine: Engine | Connection,
    task: str,
    item_id: str,
    row: Any,
    epoch: str | None,
    prefix: str = "",
) -> None:
    """Record the message in ``row`` (``<prefix>sent_at``, ``<prefix>sent_epoch``), send it,
    and undo the record if sending fails."""
    sent_at, sent_epoch = f"{prefix}sent_at", f"{prefix}sent_epoch"
    _record(engine, row.values({sent_at: now(), sent_epoch: epoch}))
    try:
        app.send_task(task, args=[item_id], queue=GPU_QUEUE)
    except Exception:
        _record(engine, row.values({sent_at: None, sent_epoch: None}))
        raise


def _record(engine: Engine | Connection, statement: Any) -> None:
    with transaction(engine) as session:
        session.execute(statement)
