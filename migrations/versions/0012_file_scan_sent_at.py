"""Files record when their scan's message was last sent and in which broker epoch, so the
reconciler re-sends a pending scan only when its message can have been lost.

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.add_column(sa.Column("scan_sent_at", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("scan_sent_epoch", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.drop_column("scan_sent_epoch")
        batch_op.drop_column("scan_sent_at")
