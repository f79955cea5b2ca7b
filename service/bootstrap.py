"""First start of the embedded default: a team and a ready-to-use key, printed once."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from sqlalchemy import Engine, select

from service.db.models import Team
from service.db.session import transaction
from service.settings import Settings
from service.teams import create_team_with_key

DEFAULT_TEAM = "default"


def bootstrap_embedded(settings: Settings, engine: Engine) -> str | None:
    """On an embedded install with no team yet, create ``default`` and return its key.

    The key is also written to ``<data_dir>/api-key`` (mode 600), so ``asft`` commands on
    the same machine find it. Returns None when there is nothing to do.
    """
    if settings.database_url is not None:
        return None
    with transaction(engine) as session:
        if session.scalar(select(Team.id).limit(1)) is not None:
            return None
        _, secret = create_team_with_key(session, DEFAULT_TEAM)
    write_secret(settings.data_dir / "api-key", secret)
    return secret


def write_secret(path: Path, secret: str) -> None:
    """Write ``secret`` atomically, readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".key-", dir=path.parent)
    with os.fdopen(handle, "w") as out:
        out.write(secret + "\n")
    os.chmod(temporary, 0o600)
    os.replace(temporary, path)
