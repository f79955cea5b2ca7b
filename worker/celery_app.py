"""The worker's Celery application, configured from the one settings object.

With no broker URL set it uses Celery's filesystem broker under the data folder, so the
embedded default needs no server. The configuration is shared with the API (``api.queue``).
"""

from __future__ import annotations

from celery import Celery

from api.queue import make_celery as _make_celery
from api.settings import Settings, get_settings


def make_celery(settings: Settings | None = None) -> Celery:
    """A Celery app for ``settings`` (the process settings by default)."""
    return _make_celery(settings or get_settings())


app = make_celery()
# Register the tasks with the app the worker command loads.
app.conf.imports = ("worker.tasks",)
