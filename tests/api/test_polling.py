"""Polling a job: every read sees the latest row, and conditional GETs save the bytes."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from tests.api.conftest import ADMIN, auth
from tests.api.finished_jobs import create_job


@pytest.fixture
def job_id(client: TestClient, team_key: str, model_pair: str, training_file: str) -> str:
    """A job of team alpha, created through the API."""
    return create_job(client, team_key, model_pair, training_file)


@pytest.fixture
def writer(database_url: str) -> Iterator[Callable[[str], None]]:
    """Runs SQL on a connection of its own, as a worker or an operator would."""
    engine = create_engine(database_url)

    def run(sql: str) -> None:
        with engine.begin() as connection:
            connection.execute(text(sql))

    yield run
    engine.dispose()


def test_a_change_made_elsewhere_shows_on_the_next_read(
    client: TestClient, team_key: str, job_id: str, writer: Callable[[str], None]
) -> None:
    path = f"/v1/fine_tuning/jobs/{job_id}"
    assert client.get(path, headers=auth(team_key)).json()["trained_tokens"] != 4242
    writer(f"UPDATE jobs SET trained_tokens = 4242 WHERE id = '{job_id}'")
    assert client.get(path, headers=auth(team_key)).json()["trained_tokens"] == 4242


def test_the_api_s_own_change_shows_at_once(client: TestClient, team_key: str, job_id: str) -> None:
    path = f"/v1/fine_tuning/jobs/{job_id}"
    assert client.get(path, headers=auth(team_key)).json()["status"] != "cancelled"
    assert client.post(f"{path}/cancel", headers=auth(team_key)).status_code == 200
    assert client.get(path, headers=auth(team_key)).json()["status"] == "cancelled"


def test_a_listed_job_is_the_job_read_alone(client: TestClient, team_key: str, job_id: str) -> None:
    read = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth(team_key)).json()
    listed = client.get("/v1/fine_tuning/jobs", headers=auth(team_key)).json()["data"]
    assert read == next(job for job in listed if job["id"] == job_id)


def test_another_team_gets_404_whatever_it_sends(
    client: TestClient, team_key: str, job_id: str, make_team: Callable[[str], tuple[str, str]]
) -> None:
    path = f"/v1/fine_tuning/jobs/{job_id}"
    tag = client.get(path, headers=auth(team_key)).headers["etag"]
    _, other_key = make_team("beta")
    for suffix in ("", "/events"):
        for extra in ({}, {"If-None-Match": tag}, {"If-None-Match": "*"}):
            answer = client.get(f"{path}{suffix}", headers={**auth(other_key), **extra})
            assert answer.status_code == 404
            assert "etag" not in answer.headers


def test_a_key_revoked_elsewhere_stops_working_at_once(
    client: TestClient, team_key: str, job_id: str, writer: Callable[[str], None]
) -> None:
    path = f"/v1/fine_tuning/jobs/{job_id}"
    assert client.get(path, headers=auth(team_key)).status_code == 200
    writer("UPDATE api_keys SET revoked_at = 1")
    assert client.get(path, headers=auth(team_key)).status_code == 401


def test_a_key_revoked_through_the_api_is_refused_at_once(
    client: TestClient, make_team: Callable[[str], tuple[str, str]]
) -> None:
    team_id, key = make_team("gamma")
    assert client.get("/v1/fine_tuning/jobs", headers=auth(key)).status_code == 200
    keys = client.get(f"/v1/admin/teams/{team_id}/keys", headers=ADMIN).json()["data"]
    for listed in keys:
        revoked = client.delete(f"/v1/admin/teams/{team_id}/keys/{listed['id']}", headers=ADMIN)
        assert revoked.status_code == 200
    assert client.get("/v1/fine_tuning/jobs", headers=auth(key)).status_code == 401


@pytest.mark.parametrize("suffix", ["", "/events"], ids=["job", "events"])
def test_an_unchanged_answer_is_a_bodiless_304_until_it_changes(
    client: TestClient,
    team_key: str,
    job_id: str,
    writer: Callable[[str], None],
    suffix: str,
) -> None:
    path = f"/v1/fine_tuning/jobs/{job_id}{suffix}"
    first = client.get(path, headers=auth(team_key))
    tag = first.headers["etag"]
    assert tag.startswith('"') and tag.endswith('"')
    for sent in (tag, f"W/{tag}", f'"other", {tag}', "*"):
        again = client.get(path, headers={**auth(team_key), "If-None-Match": sent})
        assert again.status_code == 304, sent
        assert again.content == b""
        assert again.headers["etag"] == tag
    stale = client.get(path, headers={**auth(team_key), "If-None-Match": '"other"'})
    assert stale.status_code == 200 and stale.json() == first.json()
    # A worker's change (a new event on the events page) gives a new answer and a new tag.
    if suffix:
        writer(
            "INSERT INTO job_events (id, job_id, created_at, level, message, type) "
            f"VALUES ('ftevent-polling', '{job_id}', 2000000000, 'info', 'step', 'message')"
        )
    else:
        writer(f"UPDATE jobs SET trained_tokens = 4242 WHERE id = '{job_id}'")
    changed = client.get(path, headers={**auth(team_key), "If-None-Match": tag})
    assert changed.status_code == 200
    assert changed.headers["etag"] != tag
    assert changed.json() != first.json()
