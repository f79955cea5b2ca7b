"""The OpenAI ``file`` object, plus our dataset validation summary."""

from __future__ import annotations

from typing import Literal

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field

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


class FileDeleted(BaseModel):
    """The answer to a deletion."""

    id: str
    object: Literal["file"] = "file"
    deleted: bool = True
