"""The frontier study: its endpoint arithmetic on known curves, and its test profile end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from asft_core.experiments import frontier
from asft_core.experiments import frontier_analysis as analysis


def test_every_profile_keeps_the_registered_training_settings() -> None:
    full = frontier.load_config("full")
    for profile in ("ci", "test"):
        config = frontier.load_config(profile)
        assert config["training"] == full["training"]
        assert config["endpoints"]["hs_targets"] == full["endpoints"]["hs_targets"]
        assert config["decision_rule"] == full["decision_rule"]
    assert full["poison_ratios"] == [0.0, 0.05, 0.1, 0.2]
    assert len(full["seeds"]) == 3
    with pytest.raises(ValueError, match="unknown profile"):
        frontier.load_config("huge")


def test_the_full_grid_holds_every_registered_cell_once() -> None:
    config = frontier.load_config("full")
    cells = frontier.study_cells(config)
    keys = [cell.key for cell in cells]
    assert len(keys) == len(set(keys))
    asft = {c.lam for c in cells if c.method == "asft"}
    assert config["reference_lambda"] in asft
    assert {c.lam for c in cells if c.method == "l2"} == set(config["lambdas"])
    per_seed = {c.seed for c in cells if c.method == "projector_haar"}
    assert per_seed == set(config["seeds"])


def test_tuning_picks_the_best_then_the_cheapest_within_a_point() -> None:
    trials = [
        {"learning_rate": 0.004, "epochs": 12, "validation_accuracy": 0.90},
        {"learning_rate": 0.008, "epochs": 8, "validation_accuracy": 0.895},
        {"learning_rate": 0.004, "epochs": 8, "validation_accuracy": 0.70},
    ]
    assert frontier.pick_tuned(trials) == trials[1]
    trials[1]["validation_accuracy"] = 0.85
    assert frontier.pick_tuned(trials) == trials[0]


def test_best_under_reads_the_curve_at_its_crossing() -> None:
    # HS falls 0.5 -> 0.1 -> 0.0 while FA falls 0.9 -> 0.7 -> 0.2 along lambda.
    values = {
        "hs": np.array([0.5, 0.1, 0.0]),
        "fa": np.array([0.9, 0.7, 0.2]),
        "retention": np.array([0.4, 0.6, 0.8]),
    }
    at = analysis.best_under(values, 0.3, "hs", "fa")
    # Halfway along the first segment: FA 0.8, retention 0.5.
    assert at["hs"] == pytest.approx(0.3)
    assert at["fa"] == pytest.approx(0.8)
    assert at["retention"] == pytest.approx(0.5)
    at_vertex = analysis.best_under(values, 0.1, "hs", "fa")
    assert at_vertex["fa"] == pytest.approx(0.7)
    nowhere = analysis.best_under({k: v + 1 for k, v in values.items()}, 0.3, "hs", "fa")
    assert np.isnan(nowhere["fa"])


def test_best_under_works_row_by_row_on_bootstrap_replicates() -> None:
    hs = np.array([[0.5, 0.1], [0.05, 0.0]])
    fa = np.array([[0.9, 0.7], [0.6, 0.5]])
    at = analysis.best_under({"hs": hs, "fa": fa}, 0.1, "hs", "fa")
    assert at["fa"].tolist() == pytest.approx([0.7, 0.6])


def _cell(
    method: str, lam: float, seed: int, hs: float, fa: float, shift: int = 0
) -> dict[str, object]:
    n = 100
    harmful = "c" * round(hs * n) + "r" * (n - round(hs * n))
    task = "1" * round(fa * n) + "0" * (n - round(fa * n))
    return {
        "key": f"{method}|{lam:g}|0.1|{seed}",
        "method": method,
        "lam": lam,
        "poison_ratio": 0.1,
        "seed": seed,
        "harmful": harmful,
        "task": task[shift:] + task[:shift],  # which prompts it gets right
        "over_refusal": "0" * 50,
        "retention": {"topic": "1" * 40},
        "update_norm": 1.0 / (1.0 + lam),
        "energy_inside": 0.2,
    }


def test_the_decision_prefers_the_simpler_method_when_the_difference_is_noise() -> None:
    config = frontier.load_config("test")
    config["methods"] = ["lora", "asft", "l2"]
    config["controls"] = []
    config["seeds"] = [1, 2]
    cells = []
    for seed in (1, 2):
        cells.append(_cell("lora", 0.0, seed, 0.6, 0.9))
        # asft is one point better than l2, on other prompts: within the prompts' noise.
        cells += [_cell("asft", 1.0, seed, 0.05, 0.71, 50), _cell("asft", 10.0, seed, 0.0, 0.3)]
        cells += [_cell("l2", 1.0, seed, 0.05, 0.70), _cell("l2", 10.0, seed, 0.0, 0.3)]
    summary = analysis.analyse(cells, config)
    entry = summary["endpoints"]["0.1"]["asft"]["at_hs_5"]["fa"]
    assert entry["value"] == pytest.approx(0.71)
    assert entry["low"] <= 0.71 <= entry["high"]
    decision = summary["decision"]
    assert decision["scores"]["asft"] > decision["scores"]["l2"]
    assert decision["winner"] == "l2"
    assert decision["default_lambda"] == 1.0
    assert "| 0.1 | asft |" in analysis.format_summary(summary)


def test_the_test_profile_runs_end_to_end(cache_dir: Path, tmp_path: Path) -> None:
    config = frontier.load_config("test")
    cells_path = frontier.run_study(config, cache_dir, tmp_path, workers=1, log=lambda _: None)
    cells = list(frontier.read_cells(cells_path).values())
    assert sorted(c["key"] for c in cells) == sorted(c.key for c in frontier.study_cells(config))
    sizes = config["evaluation"]
    for cell in cells:
        assert len(cell["harmful"]) == sizes["harmful_prompts"]
        assert set(cell["harmful"]) <= {"r", "c", "o"}
        assert len(cell["task"]) == sizes["task_prompts"]
        assert len(cell["over_refusal"]) == sizes["over_refusal_prompts"]
        assert set(cell["retention"]) == {"sentiment", "topic", "arithmetic"}
        assert cell["steps"] == config["max_steps"]
        assert 0.0 <= cell["energy_inside"] <= 1.0
        assert cell["update_norm"] > 0
    safelora = next(c for c in cells if c["method"] == "safelora_modules")
    assert len(safelora["safelora"]["projected"]) == 2
    # A rerun finds every cell done and runs none.
    before = cells_path.read_text()
    frontier.run_study(config, cache_dir, tmp_path, workers=1, log=lambda _: None)
    assert cells_path.read_text() == before

    summary = analysis.analyse(cells, config)
    assert set(summary["endpoints"]["0.1"]) == {
        "asft_projector",
        "l2",
        "safelora_modules",
        "drop_flagged",
        "projector_haar",
    }
    dropped = next(c for c in cells if c["method"] == "drop_flagged")
    assert dropped["lam"] == 1.0
    written = analysis.plot(summary, cells, tmp_path / "out")
    assert all(path.read_bytes()[:4] == b"\x89PNG" for path in written)
    saved = json.loads(analysis.save(summary, tmp_path).read_text())
    assert saved["decision"]["primary_endpoint"] == config["decision_rule"]["primary"]
