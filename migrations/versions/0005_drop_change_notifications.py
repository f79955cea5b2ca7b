"""Drop the change notifications of 0003 and 0004: the API no longer keeps read caches.

A job being trained has its row updated every step, so a cached answer was dropped on every
step and real polls missed; each NOTIFY also took a global lock at commit. Conditional GETs
(``ETag`` / ``If-None-Match``) now save the polling client its bytes instead.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TRIGGERS = (
    ("jobs", "asft_notify_job_change"),
    ("api_keys", "asft_notify_key_change"),
    ("jobs", "asft_notify_job_truncate"),
    ("api_keys", "asft_notify_key_truncate"),
)
FUNCTIONS = ("asft_notify_job_change", "asft_notify_key_change", "asft_notify_truncate")


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, trigger in TRIGGERS:
        op.execute(f"DROP TRIGGER IF EXISTS {trigger} ON {table}")
    for function in FUNCTIONS:
        op.execute(f"DROP FUNCTION IF EXISTS {function}()")


def downgrade() -> None:
    # Going back to 0004 means running an API that expects the notifications: recreate them.
    for name in ("0003_change_notifications", "0004_truncate_notifications"):
        path = Path(__file__).with_name(f"{name}.py")
        spec = importlib.util.spec_from_file_location(f"asft_migration_{name}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.upgrade()
