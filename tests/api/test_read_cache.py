"""The read caches: exact on PostgreSQL through real change notifications, off on SQLite."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, make_url, text

from api.cache import (
    APPLICATION_NAME,
    CONFIRMED_FOR_S,
    PROBE_INTERVAL_S,
    RECONNECT_DELAY_S,
    CachedJob,
    ChangeCache,
    ChangeFeed,
    ReadCaches,
)
from api.main import change_feed_dsn
from tests.api.conftest import ADMIN, auth
from tests.api.finished_jobs import create_job

NOTIFIED_WITHIN_S = 5.0


# --- The cache's rules, on their own --------------------------------------------------------


def test_a_read_that_raced_a_change_is_not_stored() -> None:
    cache: ChangeCache[str] = ChangeCache(max_entries=10)
    cache.reset(enabled=True)
    before = cache.version("job")
    cache.changed("job")  # the row changed while the old value was being read
    assert not cache.put("job", before, "old")
    assert cache.get("job") is None
    assert cache.put("job", cache.version("job"), "new")
    assert cache.get("job") == "new"
    cache.changed("job")
    assert cache.get("job") is None


def test_nothing_is_stored_while_off_or_across_a_reset() -> None:
    cache: ChangeCache[str] = ChangeCache(max_entries=10)
    assert not cache.put("job", cache.version("job"), "value")  # off until a feed listens
    cache.reset(enabled=True)
    version = cache.version("job")
    cache.reset(enabled=True)  # the feed reconnected: anything may have changed
    assert not cache.put("job", version, "value")


def test_the_cache_is_bounded() -> None:
    cache: ChangeCache[int] = ChangeCache(max_entries=3)
    cache.reset(enabled=True)
    for number in range(5):
        cache.put(f"job-{number}", cache.version(f"job-{number}"), number)
    assert [cache.get(f"job-{n}") for n in range(5)] == [None, None, 2, 3, 4]
    for number in range(5):  # past max_entries changed keys, it starts over
        cache.changed(f"other-{number}")
    assert cache.get("job-4") is None


# --- On a real database ---------------------------------------------------------------------


def _eventually(check: Callable[[], bool], timeout_s: float = NOTIFIED_WITHIN_S) -> float:
    """Seconds until ``check()`` held (fails after ``timeout_s``)."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout_s, "not within the time limit"
        time.sleep(0.01)
    return time.monotonic() - started


@pytest.fixture
def feed(app: FastAPI, client: TestClient, database_url: str) -> ChangeFeed | None:
    """The app's change feed once it listens (None on SQLite, which has none)."""
    feed: ChangeFeed | None = app.state.change_feed
    if feed is not None:
        assert feed.listening.wait(10)
    return feed


@pytest.fixture
def job_id(
    client: TestClient, team_key: str, model_pair: str, training_file: str, feed: Any
) -> str:
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


def test_caches_are_on_with_postgresql_only(app: FastAPI, feed: ChangeFeed | None) -> None:
    url = app.state.settings.resolved_database_url
    assert (feed is not None) == url.startswith("postgresql")
    assert app.state.read_caches.jobs.enabled == (feed is not None)


def test_a_worker_s_change_shows_within_the_notification_s_trip(
    app: FastAPI,
    client: TestClient,
    team_key: str,
    job_id: str,
    feed: ChangeFeed | None,
    writer: Callable[[str], None],
) -> None:
    first = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth(team_key))
    again = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth(team_key))
    assert first.json() == again.json()
    cached = app.state.read_caches.jobs.get(job_id)
    assert (cached is not None) == (feed is not None)
    writer(f"UPDATE jobs SET trained_tokens = 4242 WHERE id = '{job_id}'")

    def shows_it() -> bool:
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth(team_key)).json()
        return bool(job["trained_tokens"] == 4242)

    waited = _eventually(shows_it)
    if feed is None:
        assert waited < 0.5  # no cache: the very next read


def test_the_api_s_own_change_shows_at_once(
    app: FastAPI, client: TestClient, team_key: str, job_id: str
) -> None:
    path = f"/v1/fine_tuning/jobs/{job_id}"
    for _ in range(2):
        assert client.get(path, headers=auth(team_key)).json()["status"] != "cancelled"
    assert client.post(f"{path}/cancel", headers=auth(team_key)).status_code == 200
    # No wait: the API forgot the job when its cancel committed.
    assert client.get(path, headers=auth(team_key)).json()["status"] == "cancelled"


def test_the_cached_answer_is_the_uncached_one(
    app: FastAPI, client: TestClient, team_key: str, job_id: str
) -> None:
    path = f"/v1/fine_tuning/jobs/{job_id}"
    read = client.get(path, headers=auth(team_key)).json()
    cached = client.get(path, headers=auth(team_key)).json()
    listed = client.get("/v1/fine_tuning/jobs", headers=auth(team_key)).json()["data"]
    assert read == cached == next(job for job in listed if job["id"] == job_id)


def test_another_team_gets_404_for_a_cached_job(
    client: TestClient, team_key: str, job_id: str, make_team: Callable[[str], tuple[str, str]]
) -> None:
    path = f"/v1/fine_tuning/jobs/{job_id}"
    assert client.get(path, headers=auth(team_key)).status_code == 200
    assert client.get(path, headers=auth(team_key)).status_code == 200
    _, other_key = make_team("beta")
    assert client.get(path, headers=auth(other_key)).status_code == 404
    assert client.get(f"{path}/events", headers=auth(other_key)).status_code == 404


def test_a_key_revoked_elsewhere_stops_working(
    client: TestClient, team_key: str, job_id: str, writer: Callable[[str], None]
) -> None:
    path = f"/v1/fine_tuning/jobs/{job_id}"
    assert client.get(path, headers=auth(team_key)).status_code == 200
    assert client.get(path, headers=auth(team_key)).status_code == 200  # the key is cached
    # Another API process (or an operator) revokes it.
    writer("UPDATE api_keys SET revoked_at = 1")
    _eventually(lambda: client.get(path, headers=auth(team_key)).status_code == 401)


def _drop_feed_connection(dsn: str) -> None:
    """Terminate the feed's connection, as a PostgreSQL restart would."""
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = %s AND datname = current_database()",
            (APPLICATION_NAME,),
        )


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_lost_feed_turns_the_caches_off_until_it_listens_again(
    app: FastAPI,
    client: TestClient,
    team_key: str,
    job_id: str,
    feed: ChangeFeed | None,
    writer: Callable[[str], None],
    database_url: str,
) -> None:
    assert feed is not None
    path = f"/v1/fine_tuning/jobs/{job_id}"
    client.get(path, headers=auth(team_key))
    client.get(path, headers=auth(team_key))
    assert app.state.read_caches.jobs.get(job_id) is not None
    dsn = change_feed_dsn(database_url)
    assert dsn is not None
    _drop_feed_connection(dsn)
    _eventually(lambda: app.state.read_caches.jobs.get(job_id) is None)
    # A change made while nobody listens is not missed: the caches start empty again.
    writer(f"UPDATE jobs SET trained_tokens = 777 WHERE id = '{job_id}'")
    _eventually(lambda: client.get(path, headers=auth(team_key)).json()["trained_tokens"] == 777)
    _eventually(feed.listening.is_set)
    client.get(path, headers=auth(team_key))
    _eventually(lambda: app.state.read_caches.jobs.get(job_id) is not None)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize(
    "sql",
    [
        "DROP TRIGGER asft_notify_job_change ON jobs",
        "ALTER TABLE api_keys DISABLE TRIGGER asft_notify_key_change",
        "DROP TRIGGER asft_notify_job_truncate ON jobs",
    ],
    ids=["dropped", "disabled", "truncate-trigger-dropped"],
)
def test_a_trigger_gone_while_listening_turns_the_caches_off(
    app: FastAPI, feed: ChangeFeed | None, writer: Callable[[str], None], sql: str
) -> None:
    # Nothing would notify the API of such changes any more: it must stop caching, without
    # waiting for its connection to drop, and stay off while the trigger is missing.
    assert feed is not None
    writer(sql)
    _eventually(lambda: not feed.listening.is_set(), timeout_s=3 * PROBE_INTERVAL_S + 2)
    assert not app.state.read_caches.jobs.enabled
    time.sleep(RECONNECT_DELAY_S + 0.5)  # past a reconnect: it looked again, and found none
    assert not feed.listening.is_set()
    assert not app.state.read_caches.keys.enabled


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_truncate_forgets_everything(
    app: FastAPI,
    client: TestClient,
    team_key: str,
    job_id: str,
    feed: ChangeFeed | None,
    writer: Callable[[str], None],
) -> None:
    # TRUNCATE fires no row trigger; migration 0004's statement triggers say "reset".
    path = f"/v1/fine_tuning/jobs/{job_id}"
    for _ in range(2):
        assert client.get(path, headers=auth(team_key)).status_code == 200
    assert app.state.read_caches.jobs.get(job_id) is not None
    writer("TRUNCATE teams CASCADE")  # the keys and jobs go with their teams
    _eventually(lambda: client.get(path, headers=auth(team_key)).status_code == 401)
    assert app.state.read_caches.jobs.get(job_id) is None
    assert feed is not None and feed.listening.is_set()  # still on: only the rows went


def test_a_key_revoked_through_the_api_is_refused_at_once(
    client: TestClient, make_team: Callable[[str], tuple[str, str]], feed: ChangeFeed | None
) -> None:
    team_id, key = make_team("gamma")
    for _ in range(2):  # cached (on PostgreSQL)
        assert client.get("/v1/fine_tuning/jobs", headers=auth(key)).status_code == 200
    keys = client.get(f"/v1/admin/teams/{team_id}/keys", headers=ADMIN).json()["data"]
    for listed in keys:
        revoked = client.delete(f"/v1/admin/teams/{team_id}/keys/{listed['id']}", headers=ADMIN)
        assert revoked.status_code == 200
    # No wait for the notification: the revoking process forgot its grants at commit.
    assert client.get("/v1/fine_tuning/jobs", headers=auth(key)).status_code == 401


class _FreezableRelay:
    """A TCP relay to PostgreSQL that can stop passing bytes while keeping its sockets open:
    a hung pooler or a partitioned link, as the feed's connections see it (the kernel still
    acknowledges what the feed sends, so TCP's own limits never fire)."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.frozen = threading.Event()
        self._sockets: list[socket.socket] = []
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self._closed = threading.Event()
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                near, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            near.settimeout(None)
            far = socket.create_connection(self.upstream)
            self._sockets += [near, far]
            for source, target in ((near, far), (far, near)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                while self.frozen.is_set():  # held, not delivered
                    time.sleep(0.05)
                target.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.frozen.clear()
        self._closed.set()
        for open_socket in [self._server, *self._sockets]:
            open_socket.close()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_feed_on_a_hung_connection_stops_serving_then_recovers(database_url: str) -> None:
    url = make_url(database_url)
    relay = _FreezableRelay(url.host or "127.0.0.1", url.port or 5432)
    caches = ReadCaches()
    answer = CachedJob(team_id="team-x", body=b"{}", status="running")
    relayed = url.set(drivername="postgresql", host="127.0.0.1", port=relay.port)
    feed = ChangeFeed(relayed.render_as_string(hide_password=False), caches)
    feed.start()
    try:
        assert feed.listening.wait(10)
        caches.jobs.put("ftjob-x", caches.jobs.version("ftjob-x"), answer)
        time.sleep(2 * PROBE_INTERVAL_S)  # probes come back: still served
        assert caches.jobs.get("ftjob-x") == answer
        relay.frozen.set()
        # Off within the confirmation of the last probe that came back (slack for a busy
        # machine), and nothing read meanwhile is stored.
        _eventually(lambda: caches.jobs.get("ftjob-x") is None, CONFIRMED_FOR_S + 2)
        assert not caches.jobs.put("ftjob-y", caches.jobs.version("ftjob-y"), answer)
        relay.frozen.clear()
        # The link is back: the feed connects again and serves what it stores from then on.
        _eventually(lambda: caches.jobs.put("ftjob-z", caches.jobs.version("ftjob-z"), answer), 40)
        assert caches.jobs.get("ftjob-x") is None  # nothing from before the outage
    finally:
        feed.stop()
        relay.close()
