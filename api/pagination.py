"""Cursor pagination, newest first, as the OpenAI lists do (``after`` = the last id seen)."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import Select, and_, or_, select
from sqlalchemy.orm import Session

from api.errors import NotFound

Row = TypeVar("Row")


def newest_first(
    session: Session,
    statement: Select[Any],
    model: type[Row],
    after: str | None,
    limit: int,
    cursor_scope: Select[Any] | None = None,
) -> tuple[list[Row], bool]:
    """One page of ``statement`` ordered by (created_at, id) descending; returns (rows, has_more).

    ``statement`` must already restrict rows to the caller's team, so a cursor from another
    team is simply not found. ``cursor_scope`` (default: ``statement``) is where ``after`` is
    looked up: the team's rows without filters such as ``status``, which can change between
    pages.
    """
    created, identifier = model.created_at, model.id  # type: ignore[attr-defined]
    if after is not None:
        scope = statement if cursor_scope is None else cursor_scope
        cursor = session.execute(
            scope.with_only_columns(created, identifier).where(identifier == after)
        ).first()
        if cursor is None:
            raise NotFound("invalid_cursor", f"no item {after!r} to page after", "after")
        statement = statement.where(
            or_(created < cursor[0], and_(created == cursor[0], identifier < cursor[1]))
        )
    rows = list(
        session.scalars(statement.order_by(created.desc(), identifier.desc()).limit(limit + 1))
    )
    return rows[:limit], len(rows) > limit


def team_rows(model: type[Row], team_id: str) -> Select[Any]:
    """``SELECT model WHERE team_id = ...``."""
    return select(model).where(model.team_id == team_id)  # type: ignore[attr-defined]


def descending_by(
    session: Session,
    statement: Select[Any],
    model: type[Row],
    column: Any,
    after: str | None,
    limit: int,
    what: str,
) -> tuple[list[Row], bool]:
    """One page of ``statement`` ordered by a unique ``column`` descending (an event's
    sequence number, a checkpoint's step); the cursor ``after`` is an id in that statement.
    """
    if after is not None:
        cursor = session.scalar(
            statement.with_only_columns(column).where(model.id == after)  # type: ignore[attr-defined]
        )
        if cursor is None:
            raise NotFound("invalid_cursor", f"no {what} {after!r} to page after", "after")
        statement = statement.where(column < cursor)
    rows = list(session.scalars(statement.order_by(column.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit
