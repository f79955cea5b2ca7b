"""The artifact store: uploaded files, checkpoints and adapters on a local or shared disk.

Every location is a *storage key* built here from ids (``files/file-abc.jsonl``), never from a
user string, and every write goes to a temporary file in the same folder that is fsynced and
renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, BinaryIO

from anyio import to_thread

# The shape of every id (``file-abc``): what storage keys and lookups are built from.
ID_PATTERN = r"^[A-Za-z0-9-]{1,64}$"
_ID = re.compile(ID_PATTERN)
CHUNK_BYTES = 1 << 20
# What an adapter archive holds: the PEFT folder's files, the chat template it was trained
# with (when the model has one) and the evaluation report.
ARCHIVE_MEMBERS = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "chat_template.jinja",
    "report.json",
)


class FileTooLarge(ValueError):
    """An upload past its size limit (nothing of it is kept)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(f"the file is larger than the limit of {max_bytes} bytes")
        self.max_bytes = max_bytes


def is_id(identifier: str) -> bool:
    """Whether ``identifier`` has the shape of our ids (a user string may not)."""
    # fullmatch, not match: "$" also matches before a final newline.
    return _ID.fullmatch(identifier) is not None


def _checked(identifier: str) -> str:
    if not is_id(identifier):
        raise ValueError(f"not an id: {identifier!r}")
    return identifier


def file_key(file_id: str) -> str:
    """Storage key of an uploaded file."""
    return f"files/{_checked(file_id)}.jsonl"


def job_key(job_id: str, *parts: str) -> str:
    """Storage key under a job's folder (checkpoints, adapter)."""
    return "/".join(["jobs", _checked(job_id), *(_checked(p) for p in parts)])


class ArtifactStore:
    """Keys -> paths under one root folder."""

    def __init__(self, root: Path) -> None:
        """Use ``root`` (created when missing)."""
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        """The path of ``key``; refuses keys that would leave the root."""
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise ValueError(f"storage key escapes the store: {key!r}")
        return path

    async def save_stream(
        self, key: str, chunks: AsyncIterator[bytes], max_bytes: int
    ) -> tuple[int, str]:
        """Write ``chunks`` atomically at ``key``; returns (bytes, sha256).

        Raises :class:`FileTooLarge` (and leaves nothing behind) past ``max_bytes``.
        """
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".upload-", dir=target.parent)
        digest, size = hashlib.sha256(), 0
        try:
            with os.fdopen(handle, "wb") as out:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > max_bytes:
                        raise FileTooLarge(max_bytes)
                    # Disk writes, hashing and the fsync run in a thread: on the event loop a
                    # large upload to a slow disk would stall every request of this process.
                    await to_thread.run_sync(_append, out, digest, chunk)
                await to_thread.run_sync(_sync_and_rename, out, Path(temporary), target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return size, digest.hexdigest()

    def remove_temporaries(self, key: str) -> int:
        """Remove the dot-named files and folders under ``key`` that a killed writer left
        (every write here goes through one); returns how many. Call only while no live
        process writes there, e.g. under the job's lease."""
        folder = self.path(key)
        if not folder.is_dir():
            return 0
        leftovers = [path for path in folder.rglob(".*") if path.exists()]
        for path in sorted(leftovers, key=lambda p: len(p.parts)):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return len(leftovers)

    def delete(self, key: str) -> None:
        """Remove a file or a whole folder; a missing one is fine."""
        path = self.path(key)
        if path.is_dir():
            for child in sorted(path.rglob("*"), reverse=True):
                child.rmdir() if child.is_dir() else child.unlink()
            path.rmdir()
        else:
            path.unlink(missing_ok=True)


def _append(out: BinaryIO, digest: Any, chunk: bytes) -> None:
    digest.update(chunk)
    out.write(chunk)


def _sync_and_rename(out: BinaryIO, temporary: Path, target: Path) -> None:
    out.flush()
    os.fsync(out.fileno())
    os.replace(temporary, target)


def _archive_paths(folder: Path) -> tuple[Path, Path]:
    """Where :func:`adapter_archive` caches the archive of ``folder`` and its sha256."""
    return folder.with_name(folder.name + ".tar.gz"), folder.with_name(
        folder.name + ".tar.gz.sha256"
    )


def forget_adapter_archive(folder: Path) -> None:
    """Remove the cached archive of ``folder`` (its adapter is about to be replaced)."""
    for path in _archive_paths(folder):
        path.unlink(missing_ok=True)


def adapter_archive(folder: Path) -> tuple[Path, str]:
    """A tar.gz of the adapter in ``folder`` and its sha256, built once and cached beside it.

    The archive holds ``adapter/`` with the PEFT files (and the report when present), so
    ``tar xzf`` gives a folder that ``PeftModel.from_pretrained`` and vLLM load as is.
    """
    archive, checksum = _archive_paths(folder)
    if archive.exists() and checksum.exists():
        return archive, checksum.read_text().strip()
    handle, temporary = tempfile.mkstemp(prefix=".archive-", dir=folder.parent)
    os.close(handle)
    try:
        with tarfile.open(temporary, "w:gz") as tar:
            for name in ARCHIVE_MEMBERS:
                if (folder / name).exists():
                    tar.add(folder / name, arcname=f"adapter/{name}")
        digest = hashlib.sha256()
        with open(temporary, "rb") as source:
            for block in iter(lambda: source.read(CHUNK_BYTES), b""):
                digest.update(block)
        os.replace(temporary, archive)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    # Atomic too: a checksum cut short by a full disk would be served as the archive's.
    write_atomically(checksum, digest.hexdigest().encode())
    return archive, digest.hexdigest()


def write_atomically(target: Path, content: bytes) -> None:
    """Write ``content`` at ``target`` through a temporary sibling and a rename."""
    handle, temporary = tempfile.mkstemp(prefix=".write-", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(content)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
