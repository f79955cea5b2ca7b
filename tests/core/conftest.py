"""Fixtures for the core library's tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from asft_core.zoo import ZooPaths


@pytest.fixture(scope="session")
def alignment_artifact(zoo: ZooPaths, cache_dir: Path) -> Path:
    """The zoo pair's alignment direction, computed once."""
    from asft_core.alignment import get_or_compute_alignment

    return get_or_compute_alignment(zoo.base, zoo.aligned, cache_dir / "alignment").path
