"""One-statement upserts (``INSERT ... ON CONFLICT``) on PostgreSQL and SQLite alike.

A select-then-insert lets two writers both see "missing" and one of them fail on the unique
constraint; ``ON CONFLICT`` settles it inside the database, in one round trip.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session


def upsert(
    session: Session,
    model: type[Any],
    values: dict[str, Any],
    conflict: Sequence[str],
    update: Sequence[str] = (),
) -> None:
    """Insert ``values`` as a ``model`` row; when a row with the same ``conflict`` columns
    exists, set its ``update`` columns to the new values instead (or leave it, if none)."""
    dialect = session.get_bind().dialect.name
    insert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}.get(dialect)
    if insert is None:
        raise NotImplementedError(f"no upsert for the {dialect} dialect")
    statement: Any = insert(model).values(**values)
    if update:
        changed = {column: statement.excluded[column] for column in update}
        session.execute(statement.on_conflict_do_update(index_elements=conflict, set_=changed))
    else:
        session.execute(statement.on_conflict_do_nothing(index_elements=conflict))
