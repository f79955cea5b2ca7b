"""``Client``: the service's HTTP API as plain Python calls.

Errors raise :class:`ApiError` with the server's code and message, never a bare HTTP error.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

# Downloads are streamed to disk in pieces of this size, so an adapter never sits in memory.
DOWNLOAD_CHUNK_BYTES = 1 << 20


class ApiError(RuntimeError):
    """An error answer from the service: HTTP status, machine-readable code, message."""

    def __init__(self, status: int, code: str | None, message: str) -> None:
        super().__init__(f"{message} ({code}, HTTP {status})")
        self.status, self.code, self.message = status, code, message


class Client:
    """Calls the service at ``base_url`` (e.g. http://127.0.0.1:8000) with a team key."""

    def __init__(self, base_url: str, api_key: str, timeout_s: float = 60.0) -> None:
        """Open a connection pool."""
        self.base_url = base_url.rstrip("/")
        self.last_download_approved: bool | None = None
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout_s,
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, path, **kwargs)
        _raise_for_error(response)
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

    def get_file(self, file_id: str) -> dict[str, Any]:
        """``GET /v1/files/{id}``."""
        result: dict[str, Any] = self._call("GET", f"/v1/files/{file_id}")
        return result

    def safety_scan(self, file_id: str, after: int = 0, limit: int = 1000) -> dict[str, Any]:
        """One page of a file's safety scan: flagged rows after line ``after``."""
        result: dict[str, Any] = self._call(
            "GET", f"/v1/files/{file_id}/safety_scan", params={"after": after, "limit": limit}
        )
        return result

    def create_job(self, **body: Any) -> dict[str, Any]:
        """Create a fine-tuning job (see the README for the fields)."""
        result: dict[str, Any] = self._call("POST", "/v1/fine_tuning/jobs", json=body)
        return result

    def list_files(self, limit: int = 100) -> list[dict[str, Any]]:
        """The team's files, newest first."""
        return self._page("/v1/files", {"limit": limit})

    def get_job(self, job_id: str) -> dict[str, Any]:
        """One job."""
        result: dict[str, Any] = self._call("GET", f"/v1/fine_tuning/jobs/{job_id}")
        return result

    def list_jobs(self, limit: int = 20) -> list[dict[str, Any]]:
        """The team's jobs, newest first."""
        return self._page("/v1/fine_tuning/jobs", {"limit": limit})

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        """Ask a job to stop; returns the job (``cancelled`` once the worker has stopped)."""
        result: dict[str, Any] = self._call("POST", f"/v1/fine_tuning/jobs/{job_id}/cancel")
        return result

    def events(self, job_id: str, limit: int = 100) -> list[dict[str, Any]]:
        """The job's newest events, newest first."""
        return self._page(f"/v1/fine_tuning/jobs/{job_id}/events", {"limit": limit})

    def all_events(self, job_id: str) -> list[dict[str, Any]]:
        """Every event of the job, oldest first (all pages)."""
        path = f"/v1/fine_tuning/jobs/{job_id}/events"
        events: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": 1000}
        while True:
            page = self._call("GET", path, params=params)
            events += page["data"]
            if not page["has_more"] or not page["data"]:
                return events[::-1]
            params["after"] = page["last_id"]

    def checkpoints(self, job_id: str, limit: int = 100) -> list[dict[str, Any]]:
        """The job's checkpoints, newest first."""
        return self._page(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", {"limit": limit})

    def get_model(self, model_id: str) -> dict[str, Any]:
        """A registered pair or one of the team's fine-tuned models."""
        model: dict[str, Any] = self._call("GET", f"/v1/models/{model_id}")
        return model

    def list_models(self) -> list[dict[str, Any]]:
        """Registered model pairs and the team's fine-tuned models."""
        return self._page("/v1/models", {})

    def register_model(
        self,
        model_id: str,
        aligned_model: str,
        base_model: str,
        eval_suite: str | None = None,
        inference_url: str | None = None,
        served_model: str | None = None,
    ) -> dict[str, Any]:
        """Register a base/aligned pair (needs the admin key); optional fields stay unset."""
        body = {"id": model_id, "aligned_model": aligned_model, "base_model": base_model}
        optional = {
            "eval_suite": eval_suite,
            "inference_url": inference_url,
            "served_model": served_model,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        result: dict[str, Any] = self._call("POST", "/v1/models", json=body)
        return result

    def _page(self, path: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self._call("GET", path, params=params)["data"]
        return data

    def report(self, job_id: str) -> dict[str, Any]:
        """The job's safety and utility report."""
        result: dict[str, Any] = self._call("GET", f"/v1/fine_tuning/jobs/{job_id}/report")
        return result

    def download_adapter(self, job_id: str, target: Path, step: int | None = None) -> Path:
        """Download the adapter (or a checkpoint's), check its sha256, unpack it into ``target``.

        The archive is streamed to a temporary file beside ``target`` and unpacked only once
        its sha256 matches the server's ``X-Content-SHA256``; a refused or bad download leaves
        nothing, not even ``target``. Returns the adapter folder (``target/adapter``); whether
        the safety gate approved it is :attr:`last_download_approved`.
        """
        path = f"/v1/fine_tuning/jobs/{job_id}/adapter"
        if step is not None:
            path = f"/v1/fine_tuning/jobs/{job_id}/checkpoints/{step}/adapter"
        target = target.absolute()
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}-download-", suffix=".tar.gz"
        )
        try:
            digest = hashlib.sha256()
            with os.fdopen(handle, "wb") as out, self._http.stream("GET", path) as response:
                if response.status_code >= 400:
                    response.read()
                    _raise_for_error(response)
                expected = response.headers.get("x-content-sha256")
                self.last_download_approved = response.headers.get("x-asft-approved") == "true"
                for chunk in response.iter_bytes(DOWNLOAD_CHUNK_BYTES):
                    digest.update(chunk)
                    out.write(chunk)
            if expected is None or digest.hexdigest() != expected:
                raise ApiError(200, "checksum_mismatch", "the download does not match its sha256")
            target.mkdir(exist_ok=True)
            with tarfile.open(partial) as archive:
                archive.extractall(target, filter="data")
        finally:
            Path(partial).unlink(missing_ok=True)
        return target / "adapter"


def chat_stream(
    client: Client, model: str, messages: list[dict[str, str]], **options: Any
) -> Iterator[str]:
    """Stream a chat completion: the answer's text pieces as they come.

    Raises :class:`ApiError` for an error answer, and for an error event mid-stream (the
    inference server went away).
    """
    body = {"model": model, "messages": messages, "stream": True, **options}
    # The first request to a model may wait while the inference server loads it.
    timeout = httpx.Timeout(60.0, read=600.0)
    with client._http.stream(
        "POST", "/v1/chat/completions", json=body, timeout=timeout
    ) as response:
        if response.status_code >= 400:
            response.read()
            _raise_for_error(response)
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data == "[DONE]":
                return
            chunk = json.loads(data)
            if "error" in chunk:
                error = chunk["error"]
                raise ApiError(503, error.get("code"), error.get("message", ""))
            for choice in chunk.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    yield piece
    raise ApiError(503, "stream_ended", "the answer ended before it was complete")


def _raise_for_error(response: httpx.Response) -> None:
    """Raise :class:`ApiError` for an error answer, with the envelope's code and message."""
    if response.status_code < 400:
        return
    try:
        error = response.json()["error"]
        code, message = error.get("code"), error.get("message", "")
    except (ValueError, KeyError, TypeError, AttributeError):
        code, message = None, response.text[:500]
    raise ApiError(response.status_code, code, message)
