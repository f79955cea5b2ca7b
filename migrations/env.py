"""Alembic environment: the URL comes from the config's attributes (see service.db.migrate)."""

from __future__ import annotations

from alembic import context

from service.db.models import Base
from service.db.session import make_engine

url = context.config.attributes.get("database_url") or context.config.get_main_option(
    "sqlalchemy.url"
)
assert url, "no database URL: run migrations through `asft db upgrade`"

if context.is_offline_mode():
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    engine = make_engine(url)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=url.startswith("sqlite"),
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()
