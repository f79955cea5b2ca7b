"""The safety scan task: score an uploaded file's rows with the guard, batch by batch.

Each batch is one transaction that writes its flagged rows and the file's progress, and only
while the file is still ``running``: a file deleted mid-scan (its flags go with it) stops the
scan at the next batch. When the scan ends, jobs waiting on the file are enqueued again.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select, update

from service.db.models import File, FileFlag, Job, now
from service.db.session import transaction
from service.scans import guard_path
from worker.persistence import JobContext

logger = logging.getLogger("asft.worker")


@functools.lru_cache(maxsize=2)
def load_guard(path: Path, device: str) -> Any:
    """The guard at ``path``, loaded once per worker process."""
    from asft_core.scan import Guard

    return Guard(path, device="cpu" if device == "auto" else device)


def _claim(context: JobContext, file_id: str) -> File | None:
    """Move a pending scan to running (its earlier flags, from a dead worker, cleared)."""
    with transaction(context.engine) as session:
        result = session.execute(
            update(File)
            .where(File.id == file_id, File.scan_status == "pending")
            .values(
                scan_status="running",
                scan_rows=0,
                scan_flagged=0,
                scan_updated_at=now(),
                scan_sent_at=None,  # the message is taken: none is outstanding any more
            )
        )
        moved = getattr(result, "rowcount", 0)
        if not moved:
            return None
        session.execute(delete(FileFlag).where(FileFlag.file_id == file_id))
        return session.get(File, file_id)


def _end(context: JobContext, file_id: str, status: str, details: str | None = None) -> None:
    with transaction(context.engine) as session:
        session.execute(
            update(File)
            .where(File.id == file_id, File.scan_status == "running")
            .values(scan_status=status, scan_details=details, scan_updated_at=now())
        )


def _waiting_jobs(context: JobContext, file_id: str) -> list[str]:
    with transaction(context.engine) as session:
        return list(
            session.scalars(
                select(Job.id).where(Job.training_file == file_id, Job.status == "validating_files")
            ).all()
        )


def scan_file(file_id: str, context: JobContext) -> str:
    """Scan a pending file; returns how the scan ended (or why it did not run)."""
    from asft_core.scan import scan_file as scan_rows

    with transaction(context.engine) as session:
        guard = guard_path(session, context.settings)
    row = _claim(context, file_id)
    if row is None:
        return "not_pending"
    try:
        if guard is None:
            _end(context, file_id, "skipped", "no guard is configured (ASFT_GUARD_MODEL)")
            return "skipped"
        model = load_guard(guard, context.settings.device)
        rows = flagged = 0
        counts: Counter[str] = Counter()
        path = context.store.path(row.storage_key)
        for batch in scan_rows(model, path, context.settings.scan_batch_size):
            rows += batch.rows
            flagged += len(batch.flags)
            counts.update(flag.category for flag in batch.flags)
            with transaction(context.engine) as session:
                result = session.execute(
                    update(File)
                    .where(File.id == file_id, File.scan_status == "running")
                    .values(
                        scan_rows=rows,
                        scan_flagged=flagged,
                        scan_per_category=dict(counts),
                        scan_updated_at=now(),
                    )
                )
                alive = getattr(result, "rowcount", 0)
                if not alive:
                    logger.info("scan of %s stopped after %d rows: the file is gone", file_id, rows)
                    return "cancelled"
                session.add_all(
                    FileFlag(file_id=file_id, line=f.line, category=f.category, score=f.score)
                    for f in batch.flags
                )
        _end(context, file_id, "succeeded")
        logger.info("scan of %s: %d of %d rows flagged", file_id, flagged, rows)
        return "succeeded"
    except Exception as error:
        logger.exception("scan of %s failed", file_id)
        _end(context, file_id, "failed", f"{type(error).__name__}: {error}")
        return "failed"
    finally:
        if context.requeue is not None:
            for job_id in _waiting_jobs(context, file_id):
                context.requeue(job_id)
