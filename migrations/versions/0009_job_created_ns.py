"""Jobs record their creation to the nanosecond, so the queue's order (queue_position) holds
among jobs created in the same second.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("created_ns", sa.BigInteger(), nullable=True))
    jobs = sa.table("jobs", sa.column("created_at", sa.Integer()), sa.column("created_ns"))
    op.execute(jobs.update().values(created_ns=jobs.c.created_at * 1_000_000_000))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("created_ns")
