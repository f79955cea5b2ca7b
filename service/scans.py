"""The safety scan of uploaded files, as the API and the worker share it.

A valid upload starts ``pending``; a worker's scan task moves it to ``running`` and then
``succeeded`` (or ``failed``), writing the flagged rows as ``FileFlag`` rows batch by batch.
Invalid files, and files uploaded while no guard is configured, are ``skipped``. A job whose
training file is still being scanned waits in ``validating_files``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, get_args

from sqlalchemy import select
from sqlalchemy.orm import Session

from asft_core.spec import DataScan
from service.db.models import File, FileFlag, ModelPair
from service.settings import Settings

ScanStatus = Literal["pending", "running", "succeeded", "failed", "skipped"]
SCAN_STATUSES: tuple[str, ...] = get_args(ScanStatus)
SCANNING = ("pending", "running")
FLAGS_SHOWN = 10  # flagged rows shown on the file object; the rest via /safety_scan


def guard_path(session: Session, settings: Settings) -> Path | None:
    """The guard that scans uploads: ``ASFT_GUARD_MODEL``, else the first registered model
    pair's (by registration) whose evaluation suite names one; None when there is none."""
    if settings.guard_model is not None:
        return settings.guard_model
    suites = session.scalars(
        select(ModelPair.eval_suite)
        .where(ModelPair.eval_suite.is_not(None))
        .order_by(ModelPair.created_at, ModelPair.id)
    ).all()
    for suite in suites:
        if suite is None:
            continue
        try:
            named = json.loads(Path(suite).read_text()).get("guard")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(named, str) and named:
            path = Path(named)
            return path if path.is_absolute() else Path(suite).parent / path
    return None


def flags_after(
    session: Session, file_id: str, after_line: int, limit: int
) -> tuple[list[FileFlag], bool]:
    """Up to ``limit`` flagged rows of a file after ``after_line``, in line order; has_more."""
    rows = session.scalars(
        select(FileFlag)
        .where(FileFlag.file_id == file_id, FileFlag.line > after_line)
        .order_by(FileFlag.line)
        .limit(limit + 1)
    ).all()
    return list(rows[:limit]), len(rows) > limit


def data_scan(session: Session, file: File) -> DataScan:
    """A file's scan as a job reads it, with every flagged line."""
    lines = session.scalars(
        select(FileFlag.line).where(FileFlag.file_id == file.id).order_by(FileFlag.line)
    ).all()
    return DataScan(
        status=file.scan_status,
        rows=file.scan_rows,
        flagged_lines=tuple(lines),
        per_category=dict(file.scan_per_category or {}),
        details=file.scan_details,
    )
