"""Jobs record when their message was last sent and in which broker epoch, so the reconciler
re-sends only a message that can have been lost, not one for every job that waits.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sent_at", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("sent_epoch", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("sent_epoch")
        batch_op.drop_column("sent_at")
