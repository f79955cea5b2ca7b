"""Change notifications for the API's read caches (PostgreSQL only).

A trigger on ``jobs`` sends ``NOTIFY asft_changes, 'jobs:<id>'`` and one on ``api_keys`` sends
``'api_keys'`` whenever a row is inserted, updated or deleted, by any process; PostgreSQL
delivers them when the writing transaction commits. Each API process listens and drops what
changed from its caches (``api.cache``). SQLite has no notifications: nothing to do there, and
the API does not cache on it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 06:00:00.000000
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# Table, trigger function, and the payload expression (the row is NEW, or OLD on delete).
TRIGGERS = (
    (
        "jobs",
        "asft_notify_job_change",
        "'jobs:' || CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END",
    ),
    ("api_keys", "asft_notify_key_change", "'api_keys'"),
)


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, function, payload in TRIGGERS:
        op.execute(
            f"""
            CREATE OR REPLACE FUNCTION {function}() RETURNS trigger AS $$
            BEGIN
                PERFORM pg_notify('asft_changes', {payload});
                RETURN NULL;
            END
            $$ LANGUAGE plpgsql
            """
        )
        op.execute(
            f"CREATE TRIGGER {function} AFTER INSERT OR UPDATE OR DELETE ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION {function}()"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, function, _ in TRIGGERS:
        op.execute(f"DROP TRIGGER IF EXISTS {function} ON {table}")
        op.execute(f"DROP FUNCTION IF EXISTS {function}()")
