"""``/v1/files``: upload, list, read and delete datasets.

Uploads stream to the artifact store with a size limit (413), are hashed and written
atomically, then checked with the dataset format rules of ``asft_core.formats`` (stdlib only),
so a file's ``status`` says at once whether a job can use it, and why not, with the line.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from sqlalchemy import select

from api.deps import CurrentTeam, QueueDep, SessionDep, SettingsDep, StoreDep
from api.errors import Conflict, NotFound, TooLarge, Unprocessable
from api.lookup import owned_row
from api.pagination import newest_first, team_rows
from api.schemas.common import Page, errors, page_of
from api.schemas.files import (
    PURPOSES,
    FileDeleted,
    FileObject,
    FlaggedRow,
    SafetyScan,
    SafetyScanPage,
    UploadForm,
)
from asft_core.formats import DatasetFormatError, DatasetSummary, validate_file
from service.db.models import File, FileFlag, Job, new_id, now
from service.jobs.state import TERMINAL
from service.queue import send_scan
from service.scans import FLAGS_SHOWN, flags_after
from service.storage import CHUNK_BYTES, ID_PATTERN, FileTooLarge, file_key

router = APIRouter(prefix="/v1/files", tags=["files"])
logger = logging.getLogger("asft.api")
MAX_LINE = 2**31 - 1  # line numbers are 32-bit integers in the database
DEFAULT_FILENAME = "upload.jsonl"
# Control characters: PostgreSQL text cannot hold NUL, and the rest garble headers and logs.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# status_details quotes the offending row (its keys, a role): bound it, lists return it.
MAX_STATUS_DETAILS_CHARS = 2000


def safety_scan(row: File, flags: list[FileFlag]) -> SafetyScan:
    """The scan part of a file object, with the given flagged rows."""
    return SafetyScan(
        status=row.scan_status,
        rows_scanned=row.scan_rows,
        rows_flagged=row.scan_flagged,
        flagged_share=row.scan_flagged / row.scan_rows if row.scan_rows else None,
        per_category=row.scan_per_category or {},
        details=row.scan_details,
        flagged=[FlaggedRow(line=f.line, category=f.category, score=f.score) for f in flags],
    )


def file_object(session: SessionDep, row: File) -> FileObject:
    """The API shape of a file row (with its first flagged rows)."""
    flags, _ = flags_after(session, row.id, 0, FLAGS_SHOWN) if row.scan_flagged else ([], False)
    return FileObject(
        id=row.id,
        bytes=row.bytes,
        created_at=row.created_at,
        filename=row.filename,
        purpose=row.purpose,
        status="error" if row.status == "error" else "processed",
        status_details=row.status_details,
        sha256=row.sha256,
        format=row.row_format,
        num_examples=row.num_examples,
        safety_scan=safety_scan(row, flags),
    )


def get_team_file(session: SessionDep, team_id: str, file_id: str) -> File:
    """The team's file ``file_id``; another team's answers 404 like a missing one."""
    missing = NotFound("file_not_found", f"no file {file_id!r}", "file_id")
    return owned_row(session, File, file_id, team_id, missing)


async def _chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(CHUNK_BYTES):
        yield chunk


def display_name(filename: str | None) -> str:
    """The name shown back for an upload: its last path part, without control characters.

    It never builds a path here, but clients save downloads under it, so it has no separators
    and is never '.' or '..'; at most 255 characters (the column's size).
    """
    name = Path(_CONTROL.sub("", filename or "").replace("\\", "/")).name[:255]
    return DEFAULT_FILENAME if name in ("", ".", "..") else name


def _details(error: DatasetFormatError) -> str:
    text = _CONTROL.sub(lambda match: f"\\x{ord(match[0]):02x}", str(error))
    return text[:MAX_STATUS_DETAILS_CHARS]


def _check(path: Path) -> DatasetSummary | DatasetFormatError:
    try:
        return validate_file(path)
    except DatasetFormatError as error:
        return error


def _commit_row(session: SessionDep, row: File) -> None:
    session.add(row)
    session.commit()


async def refuse_repeated_fields(request: Request) -> None:
    """Refuse a form field given twice (422 ``invalid_request``, naming it): the framework
    would keep the last and drop the rest without a word, and a dropped part is data lost."""
    given = Counter(name for name, _ in (await request.form()).multi_items())
    for name, count in given.items():
        if count > 1:
            raise Unprocessable("invalid_request", f"{name}: given {count} times", name)


@router.post(
    "",
    response_model=FileObject,
    responses=errors(413),
    summary="Upload a dataset (JSONL, purpose=fine-tune)",
)
async def upload_file(
    request: Request,
    team: CurrentTeam,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    queue: QueueDep,
    form: Annotated[UploadForm, Form(media_type="multipart/form-data")],
) -> FileObject:
    """Store the file atomically with its sha256, then validate its rows."""
    await refuse_repeated_fields(request)
    file, purpose = form.file, form.purpose
    if purpose not in PURPOSES:
        raise Unprocessable("invalid_purpose", "purpose must be 'fine-tune'", "purpose")
    file_id = new_id("file")
    key = file_key(file_id)
    try:
        size, sha256 = await store.save_stream(key, _chunks(file), settings.max_upload_bytes)
    except FileTooLarge as error:
        raise TooLarge("file_too_large", str(error), "file") from None
    try:
        checked = await run_in_threadpool(_check, store.path(key))
        row = File(
            id=file_id,
            team_id=team.id,
            filename=display_name(file.filename),
            purpose=purpose,
            bytes=size,
            sha256=sha256,
            storage_key=key,
        )
        if isinstance(checked, DatasetFormatError):
            row.status, row.status_details = "error", _details(checked)
            row.error_code, row.error_line = checked.code, checked.line
        else:
            row.row_format, row.num_examples = checked.row_format, checked.num_examples
            row.scan_status, row.scan_updated_at = "pending", now()
        # Commit here, not in the dependency: bytes whose row was not written must not stay.
        # In the thread pool: a commit waits on the database, and this route is async.
        await run_in_threadpool(_commit_row, session, row)
    except BaseException:
        store.delete(key)
        raise
    if row.scan_status == "pending":
        try:
            await run_in_threadpool(send_scan, queue, session.get_bind(), row.id)
        except Exception:  # the broker is down: the reconciler re-sends pending scans
            logger.exception("could not enqueue the scan of %s", row.id)
    return file_object(session, row)


@router.get("", response_model=Page[FileObject], responses=errors(404))
def list_files(
    team: CurrentTeam,
    session: SessionDep,
    after: Annotated[str | None, Query(max_length=64, pattern=ID_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    purpose: Annotated[str | None, Query(max_length=32, pattern="^[a-z0-9-]+$")] = None,
) -> Page[FileObject]:
    """The team's files, newest first."""
    statement = team_rows(File, team.id)
    if purpose is not None:
        statement = statement.where(File.purpose == purpose)
    rows, has_more = newest_first(session, statement, File, after, limit)
    data = [file_object(session, row) for row in rows]
    return page_of(data, has_more)


@router.get("/{file_id}", response_model=FileObject, responses=errors(404))
def get_file(team: CurrentTeam, session: SessionDep, file_id: str) -> FileObject:
    """One file."""
    return file_object(session, get_team_file(session, team.id, file_id))


@router.get("/{file_id}/safety_scan", response_model=SafetyScanPage, responses=errors(404))
def get_safety_scan(
    team: CurrentTeam,
    session: SessionDep,
    file_id: str,
    after: Annotated[
        int, Query(ge=0, le=MAX_LINE, description="Flagged rows after this line.")
    ] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> SafetyScanPage:
    """The file's safety scan and its flagged rows in line order, a page at a time."""
    row = get_team_file(session, team.id, file_id)
    flags, has_more = flags_after(session, row.id, after, limit)
    summary = safety_scan(row, []).model_dump(exclude={"flagged"})
    rows = [FlaggedRow(line=f.line, category=f.category, score=f.score) for f in flags]
    return SafetyScanPage(**summary, file_id=row.id, data=rows, has_more=has_more)


@router.get(
    "/{file_id}/content",
    response_class=FileResponse,
    responses={**errors(404), 200: {"content": {"application/octet-stream": {}}}},
)
def get_file_content(
    team: CurrentTeam, session: SessionDep, store: StoreDep, file_id: str
) -> FileResponse:
    """The file's bytes as uploaded."""
    row = get_team_file(session, team.id, file_id)
    return FileResponse(
        store.path(row.storage_key),
        media_type="application/octet-stream",
        filename=row.filename,
        headers={"X-Content-SHA256": row.sha256},
    )


@router.delete("/{file_id}", response_model=FileDeleted, responses=errors(404, 409))
def delete_file(
    team: CurrentTeam, session: SessionDep, store: StoreDep, file_id: str
) -> FileDeleted:
    """Delete a file, unless a job that has not finished uses it (409)."""
    row = get_team_file(session, team.id, file_id)
    # Only the team's own jobs can use its file; naming the team lets the query use the
    # (team_id, ...) index instead of reading every team's jobs.
    users = session.scalars(
        select(Job.id).where(
            Job.team_id == team.id,
            (Job.training_file == file_id) | (Job.validation_file == file_id),
            Job.status.not_in(TERMINAL),
        )
    ).all()
    if users:
        raise Conflict(
            "file_in_use", f"file {file_id} is used by unfinished job {users[0]}", "file_id"
        )
    # Finished jobs keep their record; they point at a file that no longer exists.
    session.delete(row)
    session.commit()  # the row goes first: a failed commit must not leave a row without bytes
    store.delete(row.storage_key)
    return FileDeleted(id=file_id)
