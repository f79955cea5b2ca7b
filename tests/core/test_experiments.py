"""The miniature reproduction, run end to end in its test-size profile."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asft_core.experiments import MiniatureConfig, format_table, run_grid, save_table


def test_every_profile_loads_with_the_same_hyperparameters() -> None:
    full = MiniatureConfig.load("full")
    for profile in ("ci", "test"):
        config = MiniatureConfig.load(profile)
        # Profiles shrink the grid and the evaluation, never the methods' settings.
        assert (config.learning_rate, config.lambda_, config.rank, config.epochs) == (
            full.learning_rate,
            full.lambda_,
            full.rank,
            full.epochs,
        )
    assert full.methods == ("lora", "asft", "safelora")
    assert full.poison_ratios == (0.0, 0.05, 0.1, 0.2)
    with pytest.raises(ValueError, match="unknown profile"):
        MiniatureConfig.load("huge")


def test_the_test_profile_runs_end_to_end(cache_dir: Path, tmp_path: Path) -> None:
    config = MiniatureConfig.load("test")
    table = run_grid(config, cache_dir, tmp_path / "runs", log=lambda line: None)
    names = [(row.name, row.poison_ratio) for row in table.rows]
    expected_runs = [(m, p) for p in config.poison_ratios for m in config.methods]
    assert names == [("base", None), ("aligned", None), *expected_runs]
    for row in table.rows:
        for cell in (row.harmful_score, row.accuracy):
            assert cell["total"] == config.eval_limit
            assert cell["low"] <= cell["value"] <= cell["high"]
        assert set(row.per_category) <= {"weapons", "cybercrime", "fraud", "self_harm", "hate"}
    trained = [row for row in table.rows if row.poison_ratio is not None]
    assert all(row.details["steps"] == config.max_steps for row in trained)
    assert table.alignment["modules"] > 0

    written = save_table(table, tmp_path / "out")
    assert {path.name for path in written} >= {"miniature.json", "miniature.txt", "miniature.png"}
    saved = json.loads((tmp_path / "out" / "miniature.json").read_text())
    assert len(saved["rows"]) == len(table.rows)
    assert (tmp_path / "out" / "miniature.png").read_bytes()[:4] == b"\x89PNG"
    assert "HS" in format_table(table)
