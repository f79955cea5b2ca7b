"""Read caches for the polling paths, kept exact by PostgreSQL's change notifications.

Clients poll jobs, so most requests read rows that have not changed since the last poll. On
PostgreSQL, triggers (migration 0003) send ``NOTIFY asft_changes`` with ``jobs:<id>`` when a
job row changes and ``api_keys`` when any key does, from whichever process wrote them (API,
worker or an operator's SQL), when the writing transaction commits. Each API process listens
on a connection of its own (:class:`ChangeFeed`) and drops what changed from its caches, so a
cached answer is never older than the notification's trip (milliseconds).

Two rules keep that exact:
- entries are stored only while the feed is listening; when its connection drops, the caches
  are emptied and stay off until it listens again (notifications sent in between are lost);
- a value read from the database is stored only if no notification for its key arrived
  since the read began (:meth:`ChangeCache.version` before, :meth:`ChangeCache.put` after),
  so a read that raced a write cannot store the older row.

The API's own writes do not wait for that trip: a session from the app's factory forgets
the jobs and keys it changed when it commits (:func:`forget_on_commit`), so a client that
cancels a job and polls it at once sees the cancel, and a key revoked is refused at once.

The feed does not take delivery on trust. Every 2 s it checks that the triggers exist and
fire, and sends a probe notification from a second connection, which must reach the listening
one before the next check; the caches turn on only once a probe has come back, and serve
entries only until 6 s after the last returned probe was sent. So triggers missing (an API
started before migration 0003) or disabled, a pooler that does not pass notifications on
(PgBouncer in transaction mode), or a connection that died or hung silently (a failover, a
partition) leave the caches on for 6 s at most; a watchdog then shuts down the sockets of a
feed stuck on a hung connection so that it connects again. ``TRUNCATE`` fires no row
trigger: a statement trigger (migration 0004) sends ``reset``, which forgets everything.
Writes made with ``session_replication_role = replica`` (some replication and restore tools)
fire no trigger at all; run those with the API stopped.

SQLite has no notifications: there the caches stay off and every request reads the database.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

from api.db.models import ApiKey, Job

logger = logging.getLogger("asft.cache")
CHANNEL = "asft_changes"
V = TypeVar("V")
# Session.info key: ids of the jobs a session changed (forgotten from the caches at commit).
CHANGED_JOBS = "asft_changed_jobs"
# Session.info key: set when a session changed an API key (all grants are forgotten).
CHANGED_KEYS = "asft_changed_keys"
# How long the feed waits before listening again after its connection failed; doubled after
# each failure in a row, up to TRIGGER_RECHECK_S.
RECONNECT_DELAY_S = 1.0
# How often a feed that found no triggers looks again (an upgrade may be under way).
TRIGGER_RECHECK_S = 30.0
# The feed's connection as pg_stat_activity shows it.
APPLICATION_NAME = "asft-change-feed"
# How often the feed checks the triggers and sends a probe (from a second connection), which
# must have come back by the next check.
PROBE_INTERVAL_S = 2.0
# How long after a returned probe was sent the caches are served: past it, a feed that could
# not confirm again (its thread stuck on a hung connection) has them off. This bounds how
# long a lost feed leaves the caches on.
CONFIRMED_FOR_S = 2 * PROBE_INTERVAL_S + 2.0
# How long past that the watchdog waits before it shuts a stuck feed's sockets down.
WATCHDOG_GRACE_S = 2.0
# Payload prefix of the feed's own probes.
PROBE_PREFIX = "probe:"
# libpq settings that bound how long a dead connection goes unnoticed (a few seconds), where
# the system's defaults would take hours.
DEAD_CONNECTION_LIMITS = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 5_000,
}
# The triggers whose notifications the caches rely on (migrations 0003 and 0004).
TRIGGERS = {
    "jobs": ("asft_notify_job_change", "asft_notify_job_truncate"),
    "api_keys": ("asft_notify_key_change", "asft_notify_key_truncate"),
}


class FeedLost(Exception):
    """The feed can no longer vouch that notifications reach it."""

    def __init__(self, reason: str, retry_after_s: float = RECONNECT_DELAY_S) -> None:
        """``retry_after_s``: how long to wait before connecting again."""
        super().__init__(reason)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Version:
    """What :meth:`ChangeCache.put` compares: the cache's generation and the key's count."""

    generation: int
    changes: int


class ChangeCache(Generic[V]):
    """A bounded LRU map that forgets a key when it changes; thread-safe; off until enabled."""

    def __init__(self, max_entries: int) -> None:
        """Hold at most ``max_entries`` values (the least recently used go first)."""
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, V] = OrderedDict()
        # Per key, how many changes were seen: kept for keys changed since the last reset
        # (bounded: past max_entries keys, a reset starts over).
        self._changes: dict[str, int] = {}
        self._generation = 0
        self._enabled = False
        # time.monotonic() past which nothing is served or stored until the feed confirms
        # again that notifications reach it: a feed stuck on a hung connection cannot keep
        # the caches on.
        self._confirmed_until = float("inf")

    @property
    def enabled(self) -> bool:
        """Whether values may be stored (the feed is listening)."""
        return self._enabled

    def confirm(self, until: float) -> None:
        """The feed vouches for notifications until ``until`` (``time.monotonic()``)."""
        with self._lock:
            if time.monotonic() > self._confirmed_until:
                # Unconfirmed for a while: notifications may have been lost meanwhile.
                self._reset_locked()
            self._confirmed_until = until

    def get(self, key: str) -> V | None:
        """The cached value for ``key``, or None."""
        if time.monotonic() > self._confirmed_until:
            return None
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def version(self, key: str) -> Version:
        """Take before reading ``key`` from the database; give to :meth:`put` after."""
        with self._lock:
            return Version(self._generation, self._changes.get(key, 0))

    def put(self, key: str, version: Version, value: V) -> bool:
        """Store ``value`` unless ``key`` changed (or the cache was reset) since ``version``."""
        with self._lock:
            if (
                not self._enabled
                or time.monotonic() > self._confirmed_until
                or version != Version(self._generation, self._changes.get(key, 0))
            ):
                return False
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
            return True

    def changed(self, key: str) -> None:
        """``key`` changed in the database: forget it, and refuse values read before now."""
        with self._lock:
            self._entries.pop(key, None)
            if len(self._changes) >= self.max_entries:
                self._reset_locked()
            self._changes[key] = self._changes.get(key, 0) + 1

    def reset(self, enabled: bool) -> None:
        """Forget everything (any key may have changed); store values again only if ``enabled``."""
        with self._lock:
            self._reset_locked()
            self._enabled = enabled

    def forget_all(self) -> None:
        """Forget everything and refuse values read before now; on or off stays as it is."""
        with self._lock:
            self._reset_locked()

    def _reset_locked(self) -> None:
        self._entries.clear()
        self._changes.clear()
        self._generation += 1


@dataclass(frozen=True)
class KeyGrant:
    """What a valid key grants: its id (for its rate limit) and its team."""

    key_id: str
    team_id: str


@dataclass(frozen=True)
class CachedJob:
    """A job's answer as sent, and the team that may read it."""

    team_id: str
    body: bytes
    status: str


class ReadCaches:
    """The caches one API process keeps: valid keys by hash, and job answers by job id."""

    def __init__(self, max_entries: int = 10_000) -> None:
        """Empty and off until a :class:`ChangeFeed` listens."""
        self.keys: ChangeCache[KeyGrant] = ChangeCache(max_entries)
        self.jobs: ChangeCache[CachedJob] = ChangeCache(max_entries)

    def notified(self, payload: str) -> None:
        """Apply one notification's payload (``jobs:<id>``, ``api_keys`` or ``reset``)."""
        table, _, row_id = payload.partition(":")
        if table == "jobs":
            self.jobs.changed(row_id)
        elif table == "api_keys":
            # Rare (created, revoked), and a grant is keyed by hash, not id: forget them all.
            self.keys.forget_all()
        elif table == "reset":  # a table was truncated
            # Jobs first: once a key is refused, no job it could read is still served.
            self.jobs.forget_all()
            self.keys.forget_all()

    def reset(self, enabled: bool) -> None:
        """Forget everything; store again only if ``enabled``."""
        self.keys.reset(enabled)
        self.jobs.reset(enabled)

    def confirm(self, until: float) -> None:
        """Serve entries until ``until`` (``time.monotonic()``) unless confirmed again."""
        self.keys.confirm(until)
        self.jobs.confirm(until)


class ChangeFeed:
    """Listens for the database's change notifications and applies them to ``caches``.

    Runs in a daemon thread with two psycopg connections of its own: one listens, the other
    sends the probes (a session gets its own notifications back at once, which would prove
    nothing). The caches turn on only once a probe has come back, and off whenever one is
    late; a watchdog thread shuts down the sockets of a feed stuck on a hung connection.
    """

    def __init__(self, dsn: str, caches: ReadCaches) -> None:
        """``dsn``: a libpq connection string or ``postgresql://`` URL."""
        self.dsn, self.caches = dsn, caches
        self._stop = threading.Event()
        self.listening = threading.Event()
        # Every API process listens on the one channel: its probes carry its own token.
        self._probe_token = f"{PROBE_PREFIX}{secrets.token_hex(8)}:"
        self._connections: list[Any] = []
        # Held while a connection is closed or its socket shut down, so the watchdog never
        # shuts down a descriptor that was closed and reused meanwhile.
        self._connections_lock = threading.Lock()
        self._confirmed_until = 0.0
        self._thread = threading.Thread(target=self._run, name="change-feed", daemon=True)
        self._watchdog = threading.Thread(
            target=self._watch, name="change-feed-watchdog", daemon=True
        )

    def start(self) -> None:
        """Begin listening in the background (the caches turn on once a probe came back)."""
        self._thread.start()
        self._watchdog.start()

    def stop(self) -> None:
        """Stop listening and turn the caches off."""
        self._stop.set()
        self._thread.join(timeout=5)
        self._watchdog.join(timeout=5)
        self.caches.reset(enabled=False)

    def _run(self) -> None:
        failures, last_reason = 0, ""
        while not self._stop.is_set():
            delay_s = RECONNECT_DELAY_S
            try:
                self._listen()
            except Exception as error:  # lost, or the database restarting or unreachable
                if self.listening.is_set():  # it had worked: a new outage, counted afresh
                    failures, last_reason = 0, ""
                delay_s = min(RECONNECT_DELAY_S * 2**failures, TRIGGER_RECHECK_S)
                if isinstance(error, FeedLost):
                    delay_s = max(delay_s, error.retry_after_s)
                reason = f"{type(error).__name__}: {error}".strip()
                if not self._stop.is_set():
                    # Once per kind of failure, not every few seconds while it lasts.
                    level = logging.WARNING if reason != last_reason else logging.DEBUG
                    logger.log(
                        level, "change feed: %s; caches off, again in %.0f s", reason, delay_s
                    )
                failures, last_reason = failures + 1, reason
            finally:
                self.caches.reset(enabled=False)
                self.listening.clear()
                self._close_connections()
            self._stop.wait(delay_s)

    def _connect(self) -> Any:
        import psycopg
        from psycopg.conninfo import make_conninfo

        address = make_conninfo(
            self.dsn, application_name=APPLICATION_NAME, **DEAD_CONNECTION_LIMITS
        )
        connection = psycopg.connect(address, autocommit=True, connect_timeout=5)
        with self._connections_lock:
            self._connections.append(connection)
        return connection

    def _listen(self) -> None:
        """Listen until the stop or a failure (raised); the caches are on while confirmed."""
        listener, prober = self._connect(), self._connect()
        listener.execute(f"LISTEN {CHANNEL}")
        own_pid = listener.info.backend_pid
        probes_sent, sent_at, probe_back = 0, 0.0, True
        next_probe = time.monotonic()
        while not self._stop.is_set():
            for note in listener.notifies(timeout=0.5):
                if not note.payload.startswith(PROBE_PREFIX):
                    self.caches.notified(note.payload)
                elif note.payload == f"{self._probe_token}{probes_sent}" and note.pid != own_pid:
                    # Sent by the other connection and delivered to this one: what any
                    # writer's notifications take. (A pooler that put both sessions on one
                    # server connection fails here, as its LISTEN would not hold.)
                    probe_back = True
                    self._confirm(sent_at + CONFIRMED_FOR_S)
            if time.monotonic() < next_probe:
                continue
            if not probe_back:
                raise FeedLost(f"probe {probes_sent} did not come back")
            self._check_triggers(listener)
            probes_sent, sent_at, probe_back = probes_sent + 1, time.monotonic(), False
            prober.execute(
                "SELECT pg_notify(%s, %s)", (CHANNEL, f"{self._probe_token}{probes_sent}")
            )
            next_probe = sent_at + PROBE_INTERVAL_S

    def _confirm(self, until: float) -> None:
        if not self.listening.is_set():
            # The first probe back: from here on every change reaches this feed, and
            # whatever changed before was never notified, so the caches start empty.
            self.caches.reset(enabled=True)
            self.listening.set()
        self._confirmed_until = until
        self.caches.confirm(until)

    def _watch(self) -> None:
        """Shut down the sockets of a feed whose thread is stuck on a hung connection (one
        whose peer still acknowledges packets, so TCP's limits never fire)."""
        while not self._stop.wait(1.0):
            overdue_s = time.monotonic() - self._confirmed_until
            if self.listening.is_set() and overdue_s > WATCHDOG_GRACE_S:
                logger.warning("change feed: unconfirmed for %.0f s; dropping it", overdue_s)
                with self._connections_lock:
                    for connection in self._connections:
                        _shut_down(connection)
                self._confirmed_until = time.monotonic()  # once per stuck connection

    def _close_connections(self) -> None:
        with self._connections_lock:
            while self._connections:
                connection = self._connections.pop()
                try:
                    connection.close()
                except Exception:  # already broken: nothing to close cleanly
                    logger.debug("change feed: closing a connection failed", exc_info=True)

    @staticmethod
    def _check_triggers(connection: Any) -> None:
        """Raise :class:`FeedLost` unless every trigger the caches rely on exists and fires
        in ordinary sessions ('O'rigin or 'A'lways)."""
        found = connection.execute(
            "SELECT c.relname, t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
            "WHERE c.relname = ANY(%s) AND pg_table_is_visible(c.oid) "
            "AND t.tgenabled IN ('O', 'A') AND NOT t.tgisinternal",
            (list(TRIGGERS),),
        ).fetchall()
        enabled = set(found)
        missing = [
            name
            for table, names in TRIGGERS.items()
            for name in names
            if (table, name) not in enabled
        ]
        if missing:
            raise FeedLost(
                f"triggers missing or disabled ({', '.join(missing)}; migrations 0003-0004)",
                retry_after_s=TRIGGER_RECHECK_S,
            )


def _shut_down(connection: Any) -> None:
    """Wake whatever waits on ``connection``'s socket with an error (a duplicate descriptor,
    so the connection's own is never closed under it)."""
    try:
        duplicate = socket.socket(fileno=os.dup(connection.fileno()))
    except Exception:  # closed meanwhile
        return
    with duplicate, contextlib.suppress(OSError):
        duplicate.shutdown(socket.SHUT_RDWR)


def note_changed_job(session: Session, job_id: str) -> None:
    """Record that ``session`` changed job ``job_id`` by a statement (not through its row)."""
    session.info.setdefault(CHANGED_JOBS, set()).add(job_id)


def forget_on_commit(sessions: sessionmaker[Session], caches: ReadCaches) -> None:
    """Make ``sessions`` forget, from ``caches``, the jobs each one changed, once committed.

    Changed rows are found at flush; ``UPDATE`` statements report theirs with
    :func:`note_changed_job` (``api.jobs.state.transition`` does).
    """

    @event.listens_for(sessions, "before_flush")
    def _collect(session: Session, _context: Any, _instances: Any) -> None:
        for row in (*session.new, *session.dirty, *session.deleted):
            if isinstance(row, Job):
                note_changed_job(session, row.id)
            elif isinstance(row, ApiKey):
                session.info[CHANGED_KEYS] = True

    @event.listens_for(sessions, "after_commit")
    def _forget(session: Session) -> None:
        for job_id in session.info.pop(CHANGED_JOBS, ()):
            caches.jobs.changed(job_id)
        if session.info.pop(CHANGED_KEYS, False):
            # A key revoked here answers 401 from the next request on, not a moment later.
            caches.keys.forget_all()
