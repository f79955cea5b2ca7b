"""The safety scan of uploaded files, its flagged rows, and data policies for teams and jobs.

Files uploaded before this revision count as ``skipped`` (never scanned).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("scan_status", sa.String(16), nullable=False, server_default="skipped")
        )
        batch_op.add_column(
            sa.Column("scan_rows", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.add_column(
            sa.Column("scan_flagged", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.add_column(sa.Column("scan_per_category", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("scan_details", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("scan_updated_at", sa.Integer(), nullable=True))
    # The defaults only filled the existing rows; the models set them from now on.
    with op.batch_alter_table("files", schema=None) as batch_op:
        for column in ("scan_status", "scan_rows", "scan_flagged"):
            batch_op.alter_column(column, server_default=None)
    op.create_table(
        "file_flags",
        sa.Column("file_id", sa.String(64), nullable=False),
        sa.Column("line", sa.Integer(), nullable=False),
        sa.Column("category", sa.String(64), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["file_id"], ["files.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("file_id", "line"),
    )
    with op.batch_alter_table("teams", schema=None) as batch_op:
        batch_op.add_column(sa.Column("data_policy", sa.JSON(), nullable=True))
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("data_policy", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("data_policy")
    with op.batch_alter_table("teams", schema=None) as batch_op:
        batch_op.drop_column("data_policy")
    op.drop_table("file_flags")
    with op.batch_alter_table("files", schema=None) as batch_op:
        for column in (
            "scan_updated_at",
            "scan_details",
            "scan_per_category",
            "scan_flagged",
            "scan_rows",
            "scan_status",
        ):
            batch_op.drop_column(column)
