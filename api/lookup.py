"""Reading one row a team owns: another team's row answers 404, exactly like a missing one."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy.orm import Session

from api.errors import NotFound
from service.storage import is_id

Row = TypeVar("Row")


def owned_row(
    session: Session, model: type[Row], row_id: str, owner_id: str, error: NotFound
) -> Row:
    """The ``model`` row ``row_id`` whose ``team_id`` is ``owner_id``; raises ``error`` else."""
    # A string that is not an id names no row (and a NUL in it would make PostgreSQL fail).
    row: Any = session.get(model, row_id) if is_id(row_id) else None
    if row is None or row.team_id != owner_id:
        raise error
    return row
