"""Security: keys stored hashed and compared in constant time, rate limits per key (in Redis
across processes), header limits, and artifact paths that never come from user strings.

Tenancy (another team's ids answer 404 on every route) is ``test_tenancy.py``; pickles are
``tests/test_no_pickle.py``. The rate limits and header limits are tested over the ASGI client
and over real HTTP: a uvicorn in a thread, and ``asft api`` itself with two worker processes
sharing a Redis.
"""

from __future__ import annotations

import ast
import hashlib
import hmac
import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.deps import current_team_id, require_admin
from api.main import create_app
from api.middleware import MAX_HEADER_COUNT
from api.ratelimit import (
    REDIS_BACKOFF_S,
    MemoryRateLimiter,
    RedisRateLimiter,
    decide,
    make_rate_limiter,
    refill,
)
from service.db.migrate import upgrade_head
from service.db.models import ApiKey, File
from service.settings import Settings
from service.storage import ArtifactStore, file_key, job_key
from tests.api.conftest import ADMIN, ADMIN_KEY, auth, jsonl, sentiment_rows
from tests.conftest import REPO_ROOT, free_port

MakeTeam = Callable[[str], tuple[str, str]]
ASFT = Path(sys.executable).parent / "asft"
START_TIMEOUT_S = 60.0
# Health, Prometheus, and the dashboard's static files (the page holds no data: it calls the
# API with the key the user types in).
PUBLIC_PATHS = {"/healthz", "/readyz", "/metrics", "/ui", "/ui/", "/ui/static/{name}"}
LIMIT = 5


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The response is the OpenAI error envelope with ``status`` and ``code``."""
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code, error
    return error


# --- Keys: stored hashed, compared in constant time -----------------------------------------


def test_keys_are_stored_as_sha256_never_in_clear(
    app: FastAPI, client: TestClient, make_team: MakeTeam
) -> None:
    team_id, secret = make_team("alpha")
    with app.state.sessions() as session:
        rows = session.scalars(select(ApiKey).where(ApiKey.team_id == team_id)).all()
    assert [row.key_hash for row in rows] == [hashlib.sha256(secret.encode()).hexdigest()]
    stored = [str(getattr(rows[0], column.key)) for column in ApiKey.__table__.columns]
    assert not any(secret in value for value in stored), stored
    listed = client.get(f"/v1/admin/teams/{team_id}/keys", headers=ADMIN).text
    assert secret not in listed and rows[0].key_hash not in listed


def _near_misses(secret: str) -> list[str]:
    """Keys a timing attack would try: equal length and one character off, or one short."""
    other = "B" if secret[-1] != "B" else "C"
    return [
        secret[:-1] + other,  # differs in the last character only
        other + secret[1:],  # differs in the first character only
        "x" * len(secret),  # same length, nothing in common
        secret[:-1],  # a prefix
        secret + "x",  # an extension
        secret.swapcase(),
    ]


def test_near_miss_team_keys_answer_401(client: TestClient, team_key: str) -> None:
    for wrong in _near_misses(team_key):
        assert len(wrong) >= len(team_key) - 1
        assert_error(client.get("/v1/files", headers=auth(wrong)), 401, "invalid_api_key")
    assert client.get("/v1/files", headers=auth(team_key)).status_code == 200


def test_near_miss_admin_keys_answer_401(client: TestClient, team_key: str) -> None:
    for wrong in [*_near_misses(ADMIN_KEY), team_key, ""]:
        response = client.get("/v1/admin/teams", headers=auth(wrong))
        assert_error(response, 401, "missing_api_key" if not wrong else "invalid_admin_key")
    assert client.get("/v1/admin/teams", headers=ADMIN).status_code == 200


def test_secrets_are_compared_with_compare_digest_on_equal_length_digests(
    client: TestClient, team_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Behaviour, not timing: both checks go through hmac.compare_digest (a spy that calls the
    # real one), and always on two SHA-256 digests, so even a key of another length costs the
    # same comparison (compare_digest itself returns early on unequal lengths).
    compared: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(left: Any, right: Any) -> bool:
        compared.append((left, right))
        return real(left, right)

    monkeypatch.setattr(hmac, "compare_digest", spy)

    def digest(text: str) -> bytes:
        return hashlib.sha256(text.encode()).hexdigest().encode()

    assert client.get("/v1/files", headers=auth(team_key)).status_code == 200
    assert compared == [(digest(team_key), digest(team_key))]
    compared.clear()
    assert client.get("/v1/admin/teams", headers=auth("short")).status_code == 401
    assert compared == [(digest("short"), digest(ADMIN_KEY))]
    compared.clear()
    assert client.get("/v1/admin/teams", headers=ADMIN).status_code == 200
    assert compared == [(digest(ADMIN_KEY), digest(ADMIN_KEY))]


def test_every_route_but_health_and_metrics_checks_a_key(app: FastAPI) -> None:
    # current_team_id also applies the rate limit, so this is also "every team route is limited".
    public: set[str] = set()
    for context in iter_route_contexts(app.routes):
        route = context.original_route
        if not isinstance(route, APIRoute):
            continue  # /docs, /openapi.json: FastAPI's own, no data
        stack, calls = [route.dependant], set()
        while stack:
            dependant = stack.pop()
            calls.add(dependant.call)
            stack.extend(dependant.dependencies)
        if current_team_id not in calls and require_admin not in calls:
            public.add(route.path)
    assert public == PUBLIC_PATHS


# --- Rate limits: the buckets -----------------------------------------------------------------


def test_refill_and_decide() -> None:
    assert refill(0.0, 0.5, 60) == pytest.approx(0.5)  # 60 per minute: one per second
    assert refill(59.0, 10.0, 60) == 60.0  # never above the limit
    assert refill(5.0, -3.0, 60) == 5.0  # a clock stepping back refills nothing
    refused = decide(60, 0.25, allowed=False)
    assert (refused.remaining, refused.retry_after_s) == (0, pytest.approx(0.75))
    assert refused.reset_s == pytest.approx(59.75)
    assert refused.headers() == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "59.75s",
        "Retry-After": "1",
    }
    assert "Retry-After" not in decide(60, 3.5, allowed=True).headers()


def test_memory_buckets_burst_refuse_and_refill() -> None:
    now = [1000.0]
    limiter = MemoryRateLimiter(6, clock=lambda: now[0])  # one token per 10 s
    assert [limiter.hit("a").remaining for _ in range(6)] == [5, 4, 3, 2, 1, 0]
    refused = limiter.hit("a")
    assert not refused.allowed and refused.retry_after_s == pytest.approx(10.0)
    assert limiter.hit("b").allowed  # identities have buckets of their own
    now[0] += 9.9
    assert not limiter.hit("a").allowed  # refused requests took nothing: still 0.99 tokens
    now[0] += 0.1
    assert limiter.hit("a").allowed
    assert not limiter.hit("a", cost=0).allowed  # looking takes nothing, and tells
    now[0] += 60
    assert limiter.hit("a", cost=0).remaining == 6


def test_make_rate_limiter_follows_the_broker(tmp_path: Path) -> None:
    def made(**values: Any) -> object:
        return make_rate_limiter(Settings(_env_file=None, data_dir=tmp_path, **values))

    assert made(rate_limit_per_minute=0) is None
    assert isinstance(made(), MemoryRateLimiter)
    assert isinstance(made(broker_url="redis://127.0.0.1:1/0"), RedisRateLimiter)


def test_redis_buckets_are_shared_by_processes(private_redis: str) -> None:
    # Two limiters on one Redis stand for two API processes: one budget between them.
    first, second = RedisRateLimiter(120, private_redis), RedisRateLimiter(120, private_redis)
    taken = [(first if i % 2 else second).hit("key:k") for i in range(120)]
    assert all(d is not None and d.allowed for d in taken)
    refused = first.hit("key:k")
    assert refused is not None and not refused.allowed
    assert 0 < refused.retry_after_s <= 0.5  # 120 per minute: a token every 0.5 s
    assert second.hit("key:other") is not None  # other keys are untouched
    time.sleep(refused.retry_after_s + 0.05)
    again = second.hit("key:k")
    assert again is not None and again.allowed


def test_an_unreachable_redis_lets_requests_through_without_waiting() -> None:
    limiter = RedisRateLimiter(5, f"redis://127.0.0.1:{free_port()}/0")
    assert limiter.hit("key:k") is None
    started = time.monotonic()
    assert all(limiter.hit("key:k") is None for _ in range(100))
    assert time.monotonic() - started < REDIS_BACKOFF_S / 10  # skipped, not retried


# --- Rate limits: through the app -------------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
def limited(request: pytest.FixtureRequest, settings: Settings) -> Iterator[TestClient]:
    """A client of the app with a limit of LIMIT requests per minute per key, its buckets in
    this process or in a Redis of the test's own."""
    values: dict[str, Any] = {"rate_limit_per_minute": LIMIT}
    if request.param == "redis":
        values["broker_url"] = request.getfixturevalue("private_redis")
    with TestClient(create_app(settings.model_copy(update=values))) as client:
        yield client


def _new_team(client: TestClient, name: str) -> tuple[str, str, str]:
    """A team made through the admin API: (team id, key id, key)."""
    team = client.post("/v1/admin/teams", json={"name": name}, headers=ADMIN)
    assert team.status_code == 200, team.text
    key = client.post(f"/v1/admin/teams/{team.json()['id']}/keys", json={}, headers=ADMIN)
    assert key.status_code == 200, key.text
    return team.json()["id"], key.json()["id"], key.json()["key"]


def test_a_key_over_its_limit_gets_429_with_retry_after(limited: TestClient) -> None:
    team_id, _, key = _new_team(limited, "alpha")
    for remaining in range(LIMIT - 1, -1, -1):
        response = limited.get("/v1/files", headers=auth(key))
        assert response.status_code == 200, response.text
        assert response.headers["x-ratelimit-limit-requests"] == str(LIMIT)
        assert response.headers["x-ratelimit-remaining-requests"] == str(remaining)
        assert response.headers["x-ratelimit-reset-requests"].endswith("s")
    refused = limited.get("/v1/files", headers=auth(key))
    error = assert_error(refused, 429, "rate_limit_exceeded")
    assert error["type"] == "rate_limit_error"
    # LIMIT per minute: the next token comes 60 / LIMIT s after the first was taken.
    assert 1 <= int(refused.headers["Retry-After"]) <= 60 // LIMIT
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    # Another key of the same team has a budget of its own; admin calls are not limited.
    other = limited.post(f"/v1/admin/teams/{team_id}/keys", json={}, headers=ADMIN)
    assert limited.get("/v1/files", headers=auth(other.json()["key"])).status_code == 200
    for _ in range(LIMIT + 1):
        assert limited.get("/v1/admin/teams", headers=ADMIN).status_code == 200
    # Health and metrics are not limited (nor do they carry a key).
    for _ in range(LIMIT + 1):
        assert limited.get("/healthz").status_code == 200
        assert limited.get("/metrics").status_code == 200


def test_limit_headers_are_on_file_downloads_too(
    limited: TestClient, upload: Callable[..., dict[str, Any]]
) -> None:
    _, _, key = _new_team(limited, "alpha")
    sent = limited.post(
        "/v1/files",
        headers=auth(key),
        files={"file": ("t.jsonl", io.BytesIO(jsonl(sentiment_rows(12))), "application/jsonl")},
        data={"purpose": "fine-tune"},
    )
    assert sent.headers["x-ratelimit-remaining-requests"] == str(LIMIT - 1)
    content = limited.get(f"/v1/files/{sent.json()['id']}/content", headers=auth(key))
    assert content.status_code == 200
    assert content.headers["content-type"] == "application/octet-stream"
    assert content.headers["x-ratelimit-remaining-requests"] == str(LIMIT - 2)


def test_exempt_keys_are_not_limited(settings: Settings) -> None:
    with TestClient(create_app(settings.model_copy(update={"rate_limit_per_minute": 1}))) as setup:
        _, key_id, key = _new_team(setup, "alpha")
    exempt = settings.model_copy(
        update={"rate_limit_per_minute": 1, "rate_limit_exempt_keys": f" key-other , {key_id}"}
    )
    with TestClient(create_app(exempt)) as client:
        for _ in range(5):
            response = client.get("/v1/files", headers=auth(key))
            assert response.status_code == 200, response.text
            assert "x-ratelimit-limit-requests" not in response.headers


def test_bad_keys_are_limited_per_address_and_spare_real_keys(limited: TestClient) -> None:
    _, _, key = _new_team(limited, "alpha")
    for _ in range(LIMIT):
        assert_error(limited.get("/v1/files", headers=auth("asft-guess")), 401, "invalid_api_key")
    assert_error(limited.get("/v1/files", headers=auth("asft-guess")), 429, "rate_limit_exceeded")
    assert_error(limited.get("/v1/files"), 429, "rate_limit_exceeded")  # no key at all
    # The flood did not spend the real key's budget, though it came from the same address...
    assert limited.get("/v1/files", headers=auth(key)).headers[
        "x-ratelimit-remaining-requests"
    ] == str(LIMIT - 1)
    # ...but an address that guessed too often may not even try the admin key for a while.
    assert_error(limited.get("/v1/admin/teams", headers=ADMIN), 429, "rate_limit_exceeded")


def test_the_openai_sdk_sees_a_rate_limit_error(settings: Settings, team_key: str) -> None:
    # Over real HTTP: uvicorn in a thread on a limited app, the official client without retries.
    limited = settings.model_copy(update={"rate_limit_per_minute": 2})
    with _uvicorn_in_thread(create_app(limited)) as url:
        sdk = openai.OpenAI(base_url=f"{url}/v1", api_key=team_key, max_retries=0)
        sdk.files.list()
        sdk.files.list()
        with pytest.raises(openai.RateLimitError) as raised:
            sdk.files.list()
    assert raised.value.code == "rate_limit_exceeded"
    assert int(raised.value.response.headers["retry-after"]) >= 1


@contextmanager
def _uvicorn_in_thread(app: FastAPI) -> Iterator[str]:
    import threading

    import uvicorn

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        _wait_for(url, lambda: thread.is_alive())
        yield url
    finally:
        server.should_exit = True
        thread.join(15)
        listener.close()


def _wait_for(url: str, alive: Callable[[], bool]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert alive(), "the server stopped while starting"
        assert time.monotonic() < deadline, "the server did not answer /healthz in time"
        time.sleep(0.1)


@contextmanager
def asft_api(tmp_path: Path, workers: int, **environment: str) -> Iterator[tuple[str, str]]:
    """``asft api`` as a process on a fresh SQLite database; yields (url, the default key)."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    upgrade_head(f"sqlite:///{data_dir / 'asft.db'}", data_dir)
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ASFT_")}
    env = {**clean, "ASFT_DATA_DIR": str(data_dir), "ASFT_LOG_LEVEL": "WARNING", **environment}
    command = [str(ASFT), "api", "--port", str(port), "--workers", str(workers)]
    log = (tmp_path / "api.log").open("w")
    server = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(url, lambda: server.poll() is None)
        yield url, (data_dir / "api-key").read_text().strip()
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_asft_api_workers_share_one_limit_through_redis(tmp_path: Path, private_redis: str) -> None:
    limit = 20
    environment = {"ASFT_BROKER_URL": private_redis, "ASFT_RATE_LIMIT_PER_MINUTE": str(limit)}
    with asft_api(tmp_path, workers=2, **environment) as (url, key):
        started = time.monotonic()
        answers = []
        for _ in range(limit + 10):
            # A new connection each time, so both worker processes get requests.
            response = httpx.get(
                f"{url}/v1/files", headers={**auth(key), "Connection": "close"}, timeout=10
            )
            answers.append(response)
        elapsed = time.monotonic() - started
    allowed = [r for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code == 429]
    assert len(allowed) + len(refused) == len(answers), [r.status_code for r in answers]
    # The burst, plus what refilled while the requests ran (limit / 60 per second).
    assert limit <= len(allowed) <= limit + 1 + int(elapsed * limit / 60)
    remaining = [int(r.headers["x-ratelimit-remaining-requests"]) for r in allowed[:limit]]
    assert remaining == sorted(remaining, reverse=True) and len(set(remaining)) == limit
    assert all(r.json()["error"]["code"] == "rate_limit_exceeded" for r in refused)
    assert all(int(r.headers["Retry-After"]) >= 1 for r in refused)


# --- Header limits --------------------------------------------------------------------------


def test_oversized_and_too_many_headers_answer_431(client: TestClient, team_key: str) -> None:
    fine = client.get("/v1/files", headers={**auth(team_key), "X-Pad": "a" * 8 * 1024})
    assert fine.status_code == 200
    big = client.get("/v1/files", headers={**auth(team_key), "X-Pad": "a" * 20 * 1024})
    assert_error(big, 431, "headers_too_large")
    many = {f"X-Pad-{i}": "a" for i in range(MAX_HEADER_COUNT)}
    assert_error(
        client.get("/v1/files", headers={**auth(team_key), **many}), 431, "too_many_headers"
    )


def _raw_request(url: str, head: bytes) -> bytes:
    """Send a request head over a plain socket; what the server answered before hanging up."""
    host, port = url.removeprefix("http://").split(":")
    answer = b""
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        try:
            connection.sendall(head)
            # Every refusal closes the connection: read until it does.
            while chunk := connection.recv(65536):
                answer += chunk
        except ConnectionError:
            pass  # a reset after the server gave up reading what we sent
    return answer


def test_asft_api_refuses_large_headers_and_keeps_serving(tmp_path: Path) -> None:
    with asft_api(tmp_path, workers=1, ASFT_MAX_HEADER_BYTES="16384") as (url, key):
        request = f"GET /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
        # 64 KiB in one header: refused, 431 from our check or 400 from uvicorn's parser
        # (h11 stops buffering a head past the limit when it spans several reads).
        answer = _raw_request(url, request.encode() + b"X-Pad: " + b"a" * 65536 + b"\r\n\r\n")
        assert answer.startswith((b"HTTP/1.1 431", b"HTTP/1.1 400")), answer[:100]
        # 8 MiB of headers: refused without being buffered (the connection may be reset).
        answer = _raw_request(url, request.encode() + b"X-Pad: " + b"a" * (8 << 20) + b"\r\n\r\n")
        assert answer == b"" or answer.startswith(b"HTTP/1.1 400"), answer[:100]
        many = "".join(f"X-Pad-{i}: a\r\n" for i in range(MAX_HEADER_COUNT))
        answer = _raw_request(url, (request + many + "\r\n").encode())
        assert answer.startswith(b"HTTP/1.1 431") and b"too_many_headers" in answer
        # ...and the server still serves.
        health = httpx.get(f"{url}/healthz", timeout=5)
        assert health.status_code == 200
        files = httpx.get(f"{url}/v1/files", headers=auth(key), timeout=5)
        assert files.status_code == 200


# --- Artifact paths ---------------------------------------------------------------------------

HOSTILE_FILENAMES = [
    b"../../etc/passwd",
    b"..\\..\\windows\\evil.jsonl",
    b"/tmp/asft-escape-probe.jsonl",
    b"a/b/../../../c.jsonl",
    b"%2e%2e%2f%2e%2e%2fescape.jsonl",
    b"nul\x00/../../x.jsonl",
    b"..",
]


def _files_under(root: Path) -> set[Path]:
    return {path for path in root.rglob("*") if path.is_file()}


@pytest.mark.parametrize("filename", HOSTILE_FILENAMES, ids=range(len(HOSTILE_FILENAMES)))
def test_upload_names_never_become_paths(
    app: FastAPI, client: TestClient, settings: Settings, team_key: str, filename: bytes
) -> None:
    root = settings.data_dir.parent  # the test's own folder: database, data dir, all of it
    before = _files_under(root)
    body = (
        b'--zz\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        b'--zz\r\nContent-Disposition: form-data; name="file"; filename="' + filename + b'"\r\n'
        b"Content-Type: application/jsonl\r\n\r\n" + jsonl(sentiment_rows(12)) + b"\r\n--zz--\r\n"
    )
    response = client.post(
        "/v1/files",
        headers={**auth(team_key), "Content-Type": "multipart/form-data; boundary=zz"},
        content=body,
    )
    assert response.status_code == 200, response.text
    file_id = response.json()["id"]
    with app.state.sessions() as session:
        row = session.get(File, file_id)
        assert row is not None
        assert row.storage_key == f"files/{file_id}.jsonl"
    artifacts = settings.resolved_artifact_dir.resolve()
    written = {p.resolve() for p in _files_under(root) - before}
    written = {p for p in written if not p.name.startswith("asft.db")}  # SQLite's own files
    # The safety scan's queue message, named by the broker (creation order and a uuid), the
    # broker's own exchange table and its epoch marker (service.queue.broker_epoch).
    broker = settings.broker_dir.resolve()
    messages = {p for p in written if broker in p.parents}
    own = {"epoch", "gpu.exchange"}
    assert all(p.name.endswith(".gpu.msg") or p.name in own for p in messages), messages
    assert written - messages == {artifacts / "files" / f"{file_id}.jsonl"}
    assert not Path("/tmp/asft-escape-probe.jsonl").exists()
    shown = response.json()["filename"]
    assert "/" not in shown and "\\" not in shown and shown not in ("", ".", "..")


@pytest.mark.parametrize("hostile", ["..", "../x", "a/b", "x\n", "", "file-1.jsonl", "a" * 65, "é"])
def test_storage_keys_refuse_anything_but_ids(tmp_path: Path, hostile: str) -> None:
    with pytest.raises(ValueError, match="not an id"):
        file_key(hostile)
    with pytest.raises(ValueError, match="not an id"):
        job_key("ftjob-1", hostile)
    store = ArtifactStore(tmp_path / "store")
    for key in ("../outside", "files/../../outside", "/etc/passwd"):
        with pytest.raises(ValueError, match="escapes"):
            store.path(key)


def _storage_key_sources(source: str, filename: str) -> tuple[int, list[str]]:
    """Check every key handed to the artifact store or stored as ``storage_key`` in ``source``.

    A key may be a ``file_key``/``job_key`` call, a ``.storage_key`` read back from the
    database, or a local name assigned from one of those in the same function. Returns how
    many keys were checked and where a key came from anything else.
    """
    checked, problems = 0, list[str]()

    def allowed(node: ast.expr, names: dict[str, ast.expr]) -> bool:
        if isinstance(node, ast.Call) and ast.unparse(node.func) in ("file_key", "job_key"):
            return True
        if isinstance(node, ast.Attribute) and node.attr == "storage_key":
            return True
        if isinstance(node, ast.Name) and node.id in names:
            return allowed(names[node.id], {})
        if isinstance(node, ast.IfExp):
            return allowed(node.body, names) and (
                allowed(node.orelse, names) or _is_none(node.orelse)
            )
        return False

    tree = ast.parse(source, filename)
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        names: dict[str, ast.expr] = {}
        for node in ast.walk(function):
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target, value = node.targets[0], node.value
                pairs = (
                    list(zip(target.elts, value.elts, strict=False))
                    if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple)
                    else [(target, value)]
                )
                for left, right in pairs:
                    if isinstance(left, ast.Name):
                        names[left.id] = right
        for node in ast.walk(function):
            keys: list[ast.expr] = []
            if isinstance(node, ast.Call):
                func = node.func
                if (
                    isinstance(func, ast.Attribute)
                    and ast.unparse(func.value).endswith("store")
                    and func.attr in ("path", "save_stream", "delete")
                    and node.args
                ):
                    keys.append(node.args[0])
                keys.extend(k.value for k in node.keywords if k.arg == "storage_key")
            elif isinstance(node, ast.Assign):
                for target in node.targets:
                    elements = target.elts if isinstance(target, ast.Tuple) else [target]
                    values = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
                    for left, right in zip(elements, values, strict=False):
                        if isinstance(left, ast.Attribute) and left.attr == "storage_key":
                            keys.append(right)
            for key in keys:
                checked += 1
                if not allowed(key, names):
                    problems.append(f"{filename}:{key.lineno}: key from {ast.unparse(key)}")
    return checked, problems


def _is_none(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and node.value is None


def test_storage_keys_in_the_code_come_from_ids_only() -> None:
    checked, problems = 0, list[str]()
    for package in ("api", "worker"):
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            if path.name == "storage.py":
                continue  # where keys are made
            count, found = _storage_key_sources(path.read_text(), str(path.relative_to(REPO_ROOT)))
            checked, problems = checked + count, problems + found
    assert checked >= 10  # the scan saw the store's uses
    assert problems == []
    # ...and the check can fail.
    bad = "def f(store, name):\n    store.path(f'files/{name}')\n    File(storage_key=name)\n"
    assert len(_storage_key_sources(bad, "bad.py")[1]) == 2
