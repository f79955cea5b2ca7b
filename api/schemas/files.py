"""The OpenAI ``file`` object, plus our dataset validation summary."""

from __future__ import annotations

from typing import Literal

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field

from service.scans import ScanStatus

PURPOSES = ("fine-tune",)


class UploadForm(BaseModel):
    """The ``POST /v1/files`` form: the dataset and its purpose. Any other field is an error
    (documented as ``additionalProperties: false``), never silently dropped."""

    file: UploadFile
    # Documented as an enum; the route checks it, so a wrong purpose gets its own code.
    purpose: str = Field(
        description="Must be 'fine-tune'.", json_schema_extra={"enum": list(PURPOSES)}
    )

    model_config = ConfigDict(extra="forbid")


class FlaggedRow(BaseModel):
    """A row the safety scan flagged: its line, the guard's likeliest category and score."""

    line: int
    category: str
    score: float = Field(description="The guard's unsafe probability, 0 to 1.")


class ScanSummary(BaseModel):
    """The safety scan of a file: its status, progress and counts."""

    object: Literal["file.safety_scan"] = "file.safety_scan"
    status: ScanStatus = Field(
        description="pending, running, succeeded, failed, or skipped (invalid file, no guard)."
    )
    rows_scanned: int
    rows_flagged: int
    flagged_share: float | None = Field(None, description="rows_flagged / rows_scanned.")
    per_category: dict[str, int] = Field(default_factory=dict)
    details: str | None = None


class SafetyScan(ScanSummary):
    """A file object's scan, with the first flagged rows."""

    flagged: list[FlaggedRow] = Field(
        default_factory=list, description="The first flagged rows (all: GET .../safety_scan)."
    )


class SafetyScanPage(ScanSummary):
    """``GET /v1/files/{id}/safety_scan``: the scan and a page of its flagged rows."""

    file_id: str
    data: list[FlaggedRow]
    has_more: bool


class FileObject(BaseModel):
    """An uploaded dataset. ``status`` is ``processed`` when its rows are valid, else ``error``."""

    id: str = Field(examples=["file-9Qx2bL0sTfR1kq5mC3pZyA7d"])
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str = Field(examples=["fine-tune"])
    status: Literal["processed", "error"]
    status_details: str | None = Field(
        None, description="Why the file cannot be used for fine-tuning, with the line number."
    )
    sha256: str
    format: str | None = Field(None, description="chat, prompt_completion or instruction.")
    num_examples: int | None = None
    safety_scan: SafetyScan | None = None


class FileDeleted(BaseModel):
    """The answer to a deletion."""

    id: str
    object: Literal["file"] = "file"
    deleted: bool = True
