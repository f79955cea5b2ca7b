"""Liveness, readiness (database at the code's schema, broker reachable) and Prometheus metrics."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from api.main import create_app
from service.db.migrate import head_revision
from service.db.session import engine_for
from service.settings import Settings
from tests.api.conftest import auth
from tests.api.finished_jobs import create_job


@pytest.fixture
def unmigrated(tmp_path: Path) -> Iterator[TestClient]:
    """An app on the embedded default whose SQLite file was never migrated."""
    settings = Settings(_env_file=None, data_dir=tmp_path / "fresh", admin_key="x")
    settings.data_dir.mkdir()
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def _samples(body: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def test_healthz(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_on_a_migrated_database(client: TestClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "ready", "checks": {"database": "ok", "broker": "ok"}}


def test_readyz_on_an_empty_database_says_to_upgrade(unmigrated: TestClient) -> None:
    response = unmigrated.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "not_ready"
    assert body["checks"]["broker"] == "ok"
    message = body["checks"]["database"]
    assert "`asft db upgrade`" in message
    assert "revision none" in message
    assert head_revision() in message


def test_readyz_on_an_old_revision_says_to_upgrade(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    with engine_for(url).begin() as connection:
        connection.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32))"))
        connection.execute(text("INSERT INTO alembic_version VALUES ('0000_older')"))
    settings = Settings(_env_file=None, data_dir=tmp_path / "data", database_url=url)
    with TestClient(create_app(settings)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    message = response.json()["checks"]["database"]
    assert "0000_older" in message and "`asft db upgrade`" in message


def test_readyz_with_an_unreachable_database(tmp_path: Path) -> None:
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path,
        database_url="postgresql+psycopg://postgres@127.0.0.1:1/nowhere",
    )
    with TestClient(create_app(settings)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["database"].startswith("database unreachable")
    assert response.json()["checks"]["broker"] == "ok"


def test_readyz_with_an_unreachable_broker(database_url: str, tmp_path: Path) -> None:
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path / "data",
        database_url=database_url,
        broker_url="redis://127.0.0.1:1/0",
    )
    with TestClient(create_app(settings)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["database"] == "ok"
    assert checks["broker"].startswith("broker unreachable")


def test_metrics_count_requests_and_jobs(
    client: TestClient, team_key: str, model_pair: str, training_file: str
) -> None:
    create_job(client, team_key, model_pair, training_file)
    before = _samples(client.get("/metrics").text)
    client.get("/healthz")
    client.get("/v1/files/file-nope", headers=auth(team_key))

    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "asft_http_requests" in response.text and "asft_jobs" in response.text
    after = _samples(response.text)

    def grew(labels: tuple[tuple[str, str], ...]) -> float:
        key = ("asft_http_requests_total", labels)
        return after[key] - before.get(key, 0.0)

    # Labelled by route template, not by the raw path (bounded label values).
    assert grew((("method", "GET"), ("route", "/healthz"), ("status", "200"))) == 1
    assert grew((("method", "GET"), ("route", "/v1/files/{file_id}"), ("status", "404"))) == 1
    assert not any("file-nope" in str(labels) for _, labels in after)
    # Jobs by status, counted in this app's database.
    assert after[("asft_jobs", (("status", "validating_files"),))] == 1
    assert after[("asft_jobs", (("status", "succeeded"),))] == 0
    assert any(name == "asft_http_request_seconds_count" for name, _ in after)


def test_metrics_answer_on_an_unmigrated_database(unmigrated: TestClient) -> None:
    # Request metrics stay scrapeable while the schema is being upgraded.
    unmigrated.get("/healthz")
    response = unmigrated.get("/metrics")
    assert response.status_code == 200, response.text
    assert "asft_http_requests" in response.text
