"""The worker's Celery application, configured from the one settings object.

With no broker URL set it uses Celery's filesystem broker under the data folder, so the
embedded default needs no server. The configuration is shared with the API (``service.queue``).
"""

from __future__ import annotations

from service.queue import make_celery
from service.settings import get_settings

app = make_celery(get_settings())
# Register the tasks with the app the worker command loads.
app.conf.imports = ("worker.tasks",)
