"""Jobs record when they last joined the queue, to the nanosecond, so ``queue_position``
follows the broker's order (a job started or requeued later goes behind) and holds among jobs
queued in the same second.

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
        batch_op.add_column(sa.Column("queued_ns", sa.BigInteger(), nullable=True))
    jobs = sa.table("jobs", sa.column("updated_at", sa.Integer()), sa.column("queued_ns"))
    # In 64 bits: PostgreSQL multiplies two integers in 32 and overflows.
    seconds = sa.cast(jobs.c.updated_at, sa.BigInteger())
    op.execute(jobs.update().values(queued_ns=seconds * 1_000_000_000))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("queued_ns")
