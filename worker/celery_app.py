"""The Celery application, configured from the one settings object.

With no broker URL set it uses Celery's filesystem broker under the data folder, so the
embedded default needs no server.
"""

from __future__ import annotations

from celery import Celery

from api.settings import Settings, get_settings


def make_celery(settings: Settings | None = None) -> Celery:
    """A Celery app for ``settings`` (the process settings by default)."""
    settings = settings or get_settings()
    app = Celery("asft", broker=settings.resolved_broker_url)
    if settings.broker_url is None:
        folders = {name: settings.broker_dir / name for name in ("out", "processed")}
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        app.conf.broker_transport_options = {
            "data_folder_in": str(folders["out"]),
            "data_folder_out": str(folders["out"]),
            "processed_folder": str(folders["processed"]),
            "store_processed": False,
        }
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        accept_content=["json"],
    )
    return app


app = make_celery()
