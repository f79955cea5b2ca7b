"""Body limits over real HTTP: a uvicorn server on 127.0.0.1 and a plain httpx client.

The ASGI test transport hands the app whole bodies, so what matters here (a 413 before the
body is read, a chunked upload cut off part way, nothing left on disk) needs a real socket.
The limit is the fixture's ``max_upload_bytes`` (1 MiB); JSON bodies are limited to 1 MiB.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy import func, select

from api.main import MAX_JSON_BODY_BYTES
from service.db.migrate import upgrade_head
from service.db.models import File, Job
from service.settings import Settings
from tests.api.conftest import ADMIN, auth, jsonl, sentiment_rows
from tests.conftest import free_port

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 15.0
REQUEST_TIMEOUT_S = 30.0
CHUNK_BYTES = 64 * 1024
MULTIPART = "multipart/form-data; boundary=limit-test-boundary"
PREAMBLE = (
    b'--limit-test-boundary\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n'
    b"fine-tune\r\n--limit-test-boundary\r\n"
    b'Content-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
    b"Content-Type: application/jsonl\r\n\r\n"
)
EPILOGUE = b"\r\n--limit-test-boundary--\r\n"


@pytest.fixture
def live_url(app: FastAPI) -> Iterator[str]:
    """The app served by uvicorn on a free loopback port, in a background thread."""
    # Bind first and hand uvicorn the socket: no race for the port.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert thread.is_alive(), "uvicorn stopped while starting"
            assert time.monotonic() < deadline, "uvicorn did not answer /healthz in time"
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(STOP_TIMEOUT_S)
        listener.close()
        assert not thread.is_alive(), "uvicorn did not stop in time"


@pytest.fixture
def http(live_url: str) -> Iterator[httpx.Client]:
    """A plain httpx client on the live server."""
    with httpx.Client(base_url=live_url, timeout=REQUEST_TIMEOUT_S) as client:
        yield client


@pytest.fixture
def key(http: httpx.Client) -> str:
    """A fresh team's key, made through the admin API of the live server.

    Each answer is used at once: sessions commit before the response is sent, so a row is
    visible as soon as its 200 arrives (a commit after it made this fixture flaky).
    """
    team = http.post("/v1/admin/teams", json={"name": "alpha"}, headers=ADMIN)
    assert team.status_code == 200, team.text
    created = http.post(f"/v1/admin/teams/{team.json()['id']}/keys", json={}, headers=ADMIN)
    assert created.status_code == 200, created.text
    secret = str(created.json()["key"])
    assert http.get("/v1/files", headers=auth(secret)).status_code == 200
    return secret


def artifact_files(settings: Settings) -> list[str]:
    """Every file under the artifact folder, hidden temporary ones included."""
    root = settings.resolved_artifact_dir
    return sorted(str(path.relative_to(root)) for path in Path(root).rglob("*") if path.is_file())


def count(app: FastAPI, model: type[File] | type[Job]) -> int:
    """Rows of ``model`` in the database."""
    with app.state.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def assert_too_large(response: httpx.Response, code: str) -> None:
    """A 413 in the error envelope with ``code``."""
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}


def valid_content(size: int) -> bytes:
    """A valid JSONL dataset of exactly ``size`` bytes (padded with a blank line)."""
    row = jsonl(sentiment_rows(1))
    content = row * ((size - 1) // len(row))
    return content + b" " * (size - len(content) - 1) + b"\n"


def test_an_upload_with_a_content_length_over_the_limit_is_refused(
    http: httpx.Client, app: FastAPI, settings: Settings, key: str
) -> None:
    content = valid_content(2 * settings.max_upload_bytes)
    response = http.post(
        "/v1/files",
        headers=auth(key),
        files={"file": ("big.jsonl", content, "application/jsonl")},
        data={"purpose": "fine-tune"},
    )
    assert int(response.request.headers["content-length"]) > 2 * settings.max_upload_bytes
    assert_too_large(response, "request_too_large")
    assert artifact_files(settings) == []
    assert count(app, File) == 0
    assert http.get("/v1/files", headers=auth(key)).json()["data"] == []
    # The server is still serving after cutting that request off.
    assert http.get("/healthz").status_code == 200


def test_a_chunked_upload_over_the_limit_is_cut_off(
    http: httpx.Client, app: FastAPI, settings: Settings, key: str
) -> None:
    cap = 256 << 20
    sent = 0

    def body() -> Iterator[bytes]:
        nonlocal sent
        yield PREAMBLE
        row = jsonl(sentiment_rows(1))
        chunk = row * (CHUNK_BYTES // len(row))
        while sent < cap:  # a stream far larger than anything the server should read
            sent += len(chunk)
            yield chunk
        yield EPILOGUE

    response = http.post(
        "/v1/files", headers={**auth(key), "Content-Type": MULTIPART}, content=body()
    )
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in response.request.headers
    assert_too_large(response, "request_too_large")
    # The server stopped reading soon after the limit; the client could not send the rest.
    assert sent < 64 << 20, f"the client sent {sent} bytes before the 413"
    assert artifact_files(settings) == []
    assert count(app, File) == 0
    assert http.get("/healthz").status_code == 200


def test_a_chunked_upload_under_the_limit_is_accepted(
    http: httpx.Client, settings: Settings, key: str
) -> None:
    content = valid_content(settings.max_upload_bytes // 2)

    def body() -> Iterator[bytes]:
        yield PREAMBLE
        for start in range(0, len(content), CHUNK_BYTES):
            yield content[start : start + CHUNK_BYTES]
        yield EPILOGUE

    response = http.post(
        "/v1/files", headers={**auth(key), "Content-Type": MULTIPART}, content=body()
    )
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert response.status_code == 200, response.text
    assert response.json()["bytes"] == len(content)
    assert response.json()["sha256"] == hashlib.sha256(content).hexdigest()
    assert artifact_files(settings) == [f"files/{response.json()['id']}.jsonl"]


def test_an_upload_of_exactly_the_limit_is_accepted(
    http: httpx.Client, app: FastAPI, settings: Settings, key: str
) -> None:
    content = valid_content(settings.max_upload_bytes)
    response = http.post(
        "/v1/files",
        headers=auth(key),
        files={"file": ("limit.jsonl", content, "application/jsonl")},
        data={"purpose": "fine-tune"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["bytes"] == settings.max_upload_bytes
    assert body["sha256"] == hashlib.sha256(content).hexdigest()
    assert body["status"] == "processed"
    assert artifact_files(settings) == [f"files/{body['id']}.jsonl"]
    downloaded = http.get(f"/v1/files/{body['id']}/content", headers=auth(key))
    assert downloaded.content == content


def test_a_file_one_byte_over_the_limit_is_refused_and_leaves_nothing(
    http: httpx.Client, app: FastAPI, settings: Settings, key: str
) -> None:
    # Small enough to pass the request limit (which allows for multipart framing), so the
    # file's own limit refuses it while streaming it to the store.
    content = valid_content(settings.max_upload_bytes + 1)
    response = http.post(
        "/v1/files",
        headers=auth(key),
        files={"file": ("over.jsonl", content, "application/jsonl")},
        data={"purpose": "fine-tune"},
    )
    assert_too_large(response, "file_too_large")
    assert response.json()["error"]["param"] == "file"
    assert artifact_files(settings) == []  # the temporary file is gone too
    assert count(app, File) == 0


def test_a_json_body_over_the_limit_is_refused(http: httpx.Client, app: FastAPI, key: str) -> None:
    payload = {
        "model": "tiny-chat",
        "training_file": "file-x",
        "metadata": {"padding": "x" * MAX_JSON_BODY_BYTES},
    }
    encoded = json.dumps(payload).encode()
    response = http.post(
        "/v1/fine_tuning/jobs",
        headers={**auth(key), "Content-Type": "application/json"},
        content=encoded,
    )
    assert int(response.request.headers["content-length"]) == len(encoded)
    assert_too_large(response, "request_too_large")

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(encoded), CHUNK_BYTES):
            yield encoded[start : start + CHUNK_BYTES]

    chunked = http.post(
        "/v1/fine_tuning/jobs",
        headers={**auth(key), "Content-Type": "application/json"},
        content=chunks(),
    )
    assert chunked.request.headers.get("transfer-encoding") == "chunked"
    assert_too_large(chunked, "request_too_large")
    assert count(app, Job) == 0


def test_a_json_body_under_the_limit_reaches_the_route(http: httpx.Client, key: str) -> None:
    # The same request, small: the route answers (the model is unknown), not the limit.
    response = http.post(
        "/v1/fine_tuning/jobs",
        headers=auth(key),
        json={"model": "tiny-chat", "training_file": "file-x", "metadata": {"a": "b"}},
    )
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "model_not_found"


# --- A 2 GiB upload against the real server process (``asft api``) ------------------------

TWO_GIB = 2 << 30
# What the client may push before it notices the refusal: the limit (chunked) plus what the
# kernel's socket buffers take in after the server stopped reading.
MAX_SENT_BYTES = 16 << 20
MAX_RSS_GROWTH_BYTES = 100 << 20
PROCESS_LIMIT_BYTES = 1 << 20


@dataclass(frozen=True)
class ServerProcess:
    """``asft api`` in its own process, with its data folder and temporary folder."""

    url: str
    pid: int
    data_dir: Path
    tmp_dir: Path
    key: str


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[ServerProcess]:
    """The service as it is deployed: ``asft api`` (uvicorn, h11) on SQLite, 1 MiB uploads.

    Its temporary folder is its own, so the multipart parser's spooled parts can be checked.
    """
    data_dir, tmp_dir = tmp_path / "data", tmp_path / "tmp"
    tmp_dir.mkdir()
    data_dir.mkdir()
    upgrade_head(f"sqlite:///{data_dir / 'asft.db'}", tmp_path)
    port = free_port()
    # No database URL: the embedded default, which makes team 'default' and writes its key.
    environment = {
        **{name: value for name, value in os.environ.items() if not name.startswith("ASFT_")},
        "ASFT_DATA_DIR": str(data_dir),
        "ASFT_MAX_UPLOAD_BYTES": str(PROCESS_LIMIT_BYTES),
        "ASFT_LOG_LEVEL": "WARNING",
        "TMPDIR": str(tmp_dir),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "asft.cli", "api", "--port", str(port)],
        cwd=tmp_path,  # no .env of the checkout
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S * 2
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline, "asft api did not answer /healthz in time"
            time.sleep(0.1)
        key = (data_dir / "api-key").read_text().strip()
        yield ServerProcess(base, process.pid, data_dir, tmp_dir, key)
    finally:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT_S)


def memory_bytes(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (the peak so far) of process ``pid``, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024  # the kernel counts in kB
    return fields


def every_file(folder: Path) -> set[str]:
    """Every file under ``folder`` (hidden ones too), relative to it."""
    return {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("framing", ["content_length", "chunked"])
def test_a_2_gib_upload_is_refused_early_without_filling_memory_or_disk(
    server_process: ServerProcess, framing: str
) -> None:
    server = server_process
    with httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT_S) as http:
        # Warm the upload path first, so the code it loads is not counted below.
        warm = http.post(
            "/v1/files",
            headers=auth(server.key),
            files={"file": ("warm.jsonl", valid_content(4096), "application/jsonl")},
            data={"purpose": "fine-tune"},
        )
        assert warm.status_code == 200, warm.text
        files_before = every_file(server.data_dir)
        memory_before = memory_bytes(server.pid)
        sent = 0

        def two_gib() -> Iterator[bytes]:
            nonlocal sent
            chunk = jsonl(sentiment_rows(1)) * (CHUNK_BYTES // len(jsonl(sentiment_rows(1))))
            for part in (PREAMBLE, *([chunk] * ((TWO_GIB - len(PREAMBLE)) // len(chunk)))):
                sent += len(part)
                yield part

        headers = {**auth(server.key), "Content-Type": MULTIPART}
        if framing == "content_length":
            headers["Content-Length"] = str(TWO_GIB)
        started = time.monotonic()
        response = http.post("/v1/files", headers=headers, content=two_gib())
        elapsed_s = time.monotonic() - started
        memory_after = memory_bytes(server.pid)

        if framing == "content_length":
            assert response.request.headers["content-length"] == str(TWO_GIB)
        else:
            assert response.request.headers.get("transfer-encoding") == "chunked"
        assert_too_large(response, "request_too_large")
        # Refused early: a few MiB left the client, not 2 GiB, and quickly.
        assert sent <= MAX_SENT_BYTES, f"the client sent {sent} bytes before the 413"
        assert elapsed_s < REQUEST_TIMEOUT_S
        # The server never held the body: its peak memory barely moved.
        growth = memory_after["VmHWM"] - memory_before["VmHWM"]
        assert growth < MAX_RSS_GROWTH_BYTES, f"peak RSS grew by {growth} bytes"
        assert memory_after["VmRSS"] - memory_before["VmRSS"] < MAX_RSS_GROWTH_BYTES
        # Nothing on disk: no new file in the data folder (no partial upload, no row's file),
        # and no part spooled by the multipart parser left in the temporary folder.
        assert every_file(server.data_dir) == files_before
        assert not any(name.startswith(".upload-") for name in files_before)
        assert every_file(server.tmp_dir) == set()
        listed = http.get("/v1/files", headers=auth(server.key)).json()["data"]
        assert [item["filename"] for item in listed] == ["warm.jsonl"]
        # And it still serves: health and a normal upload.
        assert http.get("/healthz").status_code == 200
        again = http.post(
            "/v1/files",
            headers=auth(server.key),
            files={"file": ("after.jsonl", valid_content(4096), "application/jsonl")},
            data={"purpose": "fine-tune"},
        )
        assert again.status_code == 200, again.text
