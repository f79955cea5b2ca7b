"""The API skeleton: the app builds, serves /healthz, and reads its one settings object."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from service.settings import Settings


def test_healthz_answers() -> None:
    with TestClient(create_app()) as client:
        response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_embedded_defaults_live_under_var(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ASFT_DATA_DIR", "ASFT_DATABASE_URL", "ASFT_BROKER_URL", "ASFT_ARTIFACT_DIR"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(_env_file=None)
    assert settings.data_dir == Path("var")
    assert settings.resolved_database_url == f"sqlite:///{Path('var/asft.db').resolve()}"
    assert settings.resolved_broker_url == "filesystem://"
    assert settings.broker_dir == Path("var/broker")
    assert settings.resolved_artifact_dir == Path("var/artifacts")
    assert settings.resolved_cache_dir == Path("var/cache")


def test_environment_overrides_with_the_asft_prefix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ASFT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ASFT_BROKER_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("ASFT_MAX_UPLOAD_BYTES", "1024")
    settings = Settings(_env_file=None)
    assert settings.resolved_artifact_dir == tmp_path / "artifacts"
    assert settings.resolved_broker_url == "redis://127.0.0.1:6379/0"
    assert settings.max_upload_bytes == 1024


def test_every_setting_is_documented_in_the_readme() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for name in Settings.model_fields:
        assert f"`ASFT_{name.upper()}`" in readme, name
