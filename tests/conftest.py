"""Shared fixtures. Expensive ones (the tiny zoo) are built once and cached on disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from asft_core.zoo import ZooPaths, build_zoo

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """A cache folder that survives between runs (the zoo is built once per checkout)."""
    folder = Path(os.environ.get("ASFT_TEST_CACHE", REPO_ROOT / "var" / "test-cache"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def zoo(cache_dir: Path) -> ZooPaths:
    """The tiny base/aligned pair and its datasets, built once per checkout."""
    return build_zoo(cache_dir / "zoo")
