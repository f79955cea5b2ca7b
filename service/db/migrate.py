"""Alembic, driven from code: upgrade under a lock, and tell whether a schema is current.

Only ``asft db upgrade`` and the one-machine ``asft serve`` upgrade; ``asft api`` refuses to
start on an old revision and ``/readyz`` says why, so two API processes never race a migration.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text

from service.db.session import make_engine

# Advisory lock id for PostgreSQL migrations (any constant shared by all processes).
_PG_LOCK_ID = 0x41534654


def migrations_dir() -> Path:
    """The Alembic folder: ``migrations/`` beside the ``service`` package (or in the cwd)."""
    beside = Path(__file__).resolve().parents[2] / "migrations"
    return beside if beside.is_dir() else Path.cwd() / "migrations"


def alembic_config(url: str) -> Config:
    """An Alembic config for ``url``, with no ini file needed."""
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["database_url"] = url
    return config


def head_revision() -> str:
    """The newest revision the code knows."""
    head = ScriptDirectory.from_config(alembic_config("")).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None for an empty database)."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


@dataclass(frozen=True)
class SchemaStatus:
    """Whether the database schema matches the code."""

    current: str | None
    head: str

    @property
    def ok(self) -> bool:
        """True when the database is at the code's head revision."""
        return self.current == self.head

    @property
    def message(self) -> str:
        """What is wrong, for /readyz and start-up errors."""
        if self.ok:
            return "schema is current"
        return (
            f"database schema is at revision {self.current or 'none'}, the code needs "
            f"{self.head}: run `asft db upgrade`"
        )


def schema_status(engine: Engine) -> SchemaStatus:
    """The database's revision next to the code's head."""
    return SchemaStatus(current_revision(engine), head_revision())


@contextmanager
def _migration_lock(url: str, lock_dir: Path) -> Iterator[None]:
    if url.startswith("postgresql"):
        engine = make_engine(url)
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": _PG_LOCK_ID})
            try:
                yield
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": _PG_LOCK_ID})
        engine.dispose()
        return
    lock_dir.mkdir(parents=True, exist_ok=True)
    with (lock_dir / "migrate.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def upgrade_head(url: str, lock_dir: Path) -> str:
    """Bring the database at ``url`` to the head revision, one process at a time."""
    with _migration_lock(url, lock_dir):
        command.upgrade(alembic_config(url), "head")
    return head_revision()
