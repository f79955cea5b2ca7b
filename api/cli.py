"""``asft``: the service's server-side commands.

    asft db upgrade                 bring the database to the current schema (under a lock)
    asft api [--host H --port P]    serve the REST API (refuses an out-of-date schema)
    asft admin create-team NAME     create a team and print its first API key

Client commands (files, jobs, models) and ``asft serve`` / ``asft worker`` join later.
"""

from __future__ import annotations

import argparse
import sys

from api.settings import get_settings


def _db_upgrade(_: argparse.Namespace) -> int:
    from api.db.migrate import upgrade_head

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    revision = upgrade_head(settings.resolved_database_url, settings.data_dir)
    print(f"database at revision {revision}")
    return 0


def _api(args: argparse.Namespace) -> int:
    import uvicorn

    from api.bootstrap import bootstrap_embedded
    from api.db.migrate import schema_status
    from api.db.session import engine_for

    settings = get_settings()
    engine = engine_for(settings.resolved_database_url)
    status = schema_status(engine)
    if not status.ok:
        print(f"asft api: {status.message}", file=sys.stderr)
        return 2
    key = bootstrap_embedded(settings, engine)
    if key is not None:
        print(f"created team 'default'; its API key (also in {settings.data_dir / 'api-key'}):")
        print(f"  {key}")
    uvicorn.run(
        "api.main:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=settings.log_level.lower(),
    )
    return 0


def _create_team(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from api.db.models import Team
    from api.db.session import engine_for, transaction
    from api.routes.admin import create_team_with_key

    settings = get_settings()
    with transaction(engine_for(settings.resolved_database_url)) as session:
        if session.scalar(select(Team).where(Team.name == args.name)) is not None:
            print(f"asft: a team named {args.name!r} exists", file=sys.stderr)
            return 1
        team, secret = create_team_with_key(session, args.name)
    print(f"team {team.id} ({args.name}); API key, shown once:")
    print(f"  {secret}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command-line grammar."""
    parser = argparse.ArgumentParser(prog="asft", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    db = commands.add_parser("db", help="database schema").add_subparsers(
        dest="db_command", required=True
    )
    db.add_parser("upgrade", help="upgrade to the current schema").set_defaults(run=_db_upgrade)
    api = commands.add_parser("api", help="serve the REST API")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--workers", type=int, default=1)
    api.set_defaults(run=_api)
    admin = commands.add_parser("admin", help="administration").add_subparsers(
        dest="admin_command", required=True
    )
    create = admin.add_parser("create-team", help="create a team and print its key")
    create.add_argument("name")
    create.set_defaults(run=_create_team)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code."""
    args = build_parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
