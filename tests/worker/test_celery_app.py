"""The Celery app is configured from the settings: filesystem broker by default."""

from __future__ import annotations

from pathlib import Path

from service.queue import make_celery
from service.settings import Settings


def test_embedded_default_uses_the_filesystem_broker(tmp_path: Path) -> None:
    app = make_celery(Settings(_env_file=None, data_dir=tmp_path))
    options = app.conf.broker_transport_options
    assert app.conf.broker_url == "filesystem://"
    assert app.conf.broker_transport == "service.broker:Transport"  # messages appear whole
    assert Path(options["data_folder_in"]) == tmp_path / "broker" / "out"
    assert (tmp_path / "broker" / "out").is_dir()
    assert app.conf.task_acks_late is True
    assert app.conf.accept_content == ["json"]


def test_a_broker_url_switches_to_it(tmp_path: Path) -> None:
    app = make_celery(
        Settings(_env_file=None, data_dir=tmp_path, broker_url="redis://127.0.0.1:6379/0")
    )
    assert app.conf.broker_url == "redis://127.0.0.1:6379/0"
    assert not (tmp_path / "broker").exists()
