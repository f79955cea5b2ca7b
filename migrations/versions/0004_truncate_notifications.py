"""Truncate notifications for the API's read caches (PostgreSQL only).

``TRUNCATE`` fires no row trigger, so migration 0003's triggers say nothing of it. A statement
trigger on ``jobs`` and on ``api_keys`` (fired also when a truncate of ``teams`` cascades to
them) sends ``NOTIFY asft_changes, 'reset'``, and every API process forgets its caches.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 01:30:00.000000
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

FUNCTION = "asft_notify_truncate"
TRIGGERS = (("jobs", "asft_notify_job_truncate"), ("api_keys", "asft_notify_key_truncate"))


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        f"""
        CREATE OR REPLACE FUNCTION {FUNCTION}() RETURNS trigger AS $$
        BEGIN
            PERFORM pg_notify('asft_changes', 'reset');
            RETURN NULL;
        END
        $$ LANGUAGE plpgsql
        """
    )
    for table, trigger in TRIGGERS:
        op.execute(
            f"CREATE TRIGGER {trigger} AFTER TRUNCATE ON {table} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION {FUNCTION}()"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, trigger in TRIGGERS:
        op.execute(f"DROP TRIGGER IF EXISTS {trigger} ON {table}")
    op.execute(f"DROP FUNCTION IF EXISTS {FUNCTION}()")
