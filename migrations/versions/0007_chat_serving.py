"""Chat completions: where a pair is served, and whether a team may try unapproved adapters.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("model_pairs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("inference_url", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("served_model", sa.Text(), nullable=True))
    # The server default stays: a team inserted by hand (SQL, a restore) may not chat with
    # unapproved adapters either.
    with op.batch_alter_table("teams", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "allow_unapproved_chat", sa.Boolean(), nullable=False, server_default=sa.false()
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("teams", schema=None) as batch_op:
        batch_op.drop_column("allow_unapproved_chat")
    with op.batch_alter_table("model_pairs", schema=None) as batch_op:
        batch_op.drop_column("served_model")
        batch_op.drop_column("inference_url")
