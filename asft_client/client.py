"""``Client``: the service's HTTP API as plain Python calls.

Errors raise :class:`ApiError` with the server's code and message, never a bare HTTP error.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path
from typing import Any

import httpx


class ApiError(RuntimeError):
    """An error answer from the service: HTTP status, machine-readable code, message."""

    def __init__(self, status: int, code: str | None, message: str) -> None:
        super().__init__(f"{message} ({code}, HTTP {status})")
        self.status, self.code, self.message = status, code, message


class Client:
    """Calls the service at ``base_url`` (e.g. http://127.0.0.1:8000) with a team key."""

    def __init__(self, base_url: str, api_key: str, timeout_s: float = 60.0) -> None:
        """Open a connection pool."""
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout_s,
        )

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                raise ApiError(response.status_code, error.get("code"), error.get("message", ""))
            except (ValueError, KeyError, TypeError):
                raise ApiError(response.status_code, None, response.text[:500]) from None
        return response.json()

    def upload_file(self, path: Path) -> dict[str, Any]:
        """Upload a JSONL dataset for fine-tuning."""
        with path.open("rb") as handle:
            result: dict[str, Any] = self._call(
                "POST",
                "/v1/files",
                files={"file": (path.name, handle, "application/jsonl")},
                data={"purpose": "fine-tune"},
            )
        return result

    def create_job(self, **body: Any) -> dict[str, Any]:
        """Create a fine-tuning job (see the README for the fields)."""
        result: dict[str, Any] = self._call("POST", "/v1/fine_tuning/jobs", json=body)
        return result

    def get_job(self, job_id: str) -> dict[str, Any]:
        """One job."""
        result: dict[str, Any] = self._call("GET", f"/v1/fine_tuning/jobs/{job_id}")
        return result

    def events(self, job_id: str, limit: int = 100) -> list[dict[str, Any]]:
        """The job's newest events, newest first."""
        page = self._call("GET", f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": limit})
        data: list[dict[str, Any]] = page["data"]
        return data

    def report(self, job_id: str) -> dict[str, Any]:
        """The job's safety and utility report."""
        result: dict[str, Any] = self._call("GET", f"/v1/fine_tuning/jobs/{job_id}/report")
        return result

    def download_adapter(self, job_id: str, target: Path, step: int | None = None) -> Path:
        """Download the adapter (or a checkpoint's), check its sha256, unpack it into ``target``.

        Returns the adapter folder (``target/adapter``).
        """
        path = f"/v1/fine_tuning/jobs/{job_id}/adapter"
        if step is not None:
            path = f"/v1/fine_tuning/jobs/{job_id}/checkpoints/{step}/adapter"
        response = self._http.get(path)
        if response.status_code >= 400:
            self._call("GET", path)  # raises ApiError with the server's code
        expected = response.headers.get("x-content-sha256")
        if hashlib.sha256(response.content).hexdigest() != expected:
            raise ApiError(200, "checksum_mismatch", "the download does not match its sha256")
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(response.content)) as archive:
            archive.extractall(target, filter="data")
        return target / "adapter"
