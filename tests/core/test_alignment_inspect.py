"""``python -m asft_core.alignment_inspect`` and ``asft alignment inspect`` on a tiny random pair.

The ``asft`` command is run as its own process (its torch half is a subprocess of it anyway),
in a clean environment with a data folder of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from asft_core.alignment import (
    DEFAULT_SUBSPACE_ENERGY,
    AlignmentArtifact,
    load_alignment_directions,
    subspace_sidecar_path,
)
from asft_core.alignment_inspect import main
from asft_core.penalty import energy_rank
from service.db.models import ModelPair
from service.db.session import engine_for, transaction
from tests.core.test_alignment import aligned_from, weights, write_checkpoint

ASFT = Path(sys.executable).parent / "asft"
MODULES = [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]


@pytest.fixture
def tiny_pair(tmp_path: Path) -> tuple[Path, Path]:
    """Base and aligned checkpoints whose differences are rank one (so C's top eigenvalue is
    ||V||_F, far above 2) in q_proj and v_proj."""
    base = weights(0)
    return (
        write_checkpoint(tmp_path / "base", base),
        write_checkpoint(tmp_path / "aligned", aligned_from(base, 1)),
    )


def inspect_args(pair: tuple[Path, Path], cache: Path, *extra: str) -> list[str]:
    return ["--base", str(pair[0]), "--aligned", str(pair[1]), "--cache-dir", str(cache), *extra]


def only_artifact(cache: Path) -> AlignmentArtifact:
    artifacts = [p for p in cache.glob("*.safetensors") if ".subspace-" not in p.name]
    assert len(artifacts) == 1, artifacts
    return AlignmentArtifact.load(artifacts[0])


def test_table_has_a_row_per_module_and_ends_with_the_regime(
    tiny_pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    assert main(inspect_args(tiny_pair, cache)) == 0
    out = capsys.readouterr().out
    artifact = only_artifact(cache)
    lines = out.strip().splitlines()
    assert "lambda_1(C)" in out and "stable_rank" in out and f"k@{DEFAULT_SUBSPACE_ENERGY:g}" in out
    for module in MODULES:
        stats = artifact.stats[module]
        row = next(line for line in lines if line.startswith(module + " "))
        # norm, sigma_1, lambda_1, stable rank (1: rank one), k = 1 holding 100%.
        assert row.split()[1:] == [
            f"{stats.frobenius_norm:.4g}",
            f"{stats.sigma_1:.4g}",
            f"{stats.top_eigenvalue:.4g}",
            "1",
            "1",
            "100.0%",
        ]
    assert lines[-1].startswith("AsFT inverts on this pair")
    # The subspaces are cached beside the artifact; a second run reuses both.
    assert subspace_sidecar_path(artifact.path, DEFAULT_SUBSPACE_ENERGY).exists()
    stamp = artifact.path.stat().st_mtime_ns
    assert main(inspect_args(tiny_pair, cache)) == 0
    assert capsys.readouterr().out == out
    assert artifact.path.stat().st_mtime_ns == stamp


def test_json_report_with_another_tau_matches_the_spectrum(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = weights(0)
    pair = (
        write_checkpoint(tmp_path / "base", base),
        write_checkpoint(tmp_path / "aligned", aligned_from(base, 1, rank_one=False)),
    )
    cache = tmp_path / "cache"
    assert main(inspect_args(pair, cache, "--tau", "0.9", "--json")) == 0
    report = json.loads(capsys.readouterr().out)
    artifact = only_artifact(cache)
    assert report["artifact"] == str(artifact.path) and report["tau"] == 0.9
    assert report["regime"].startswith("AsFT acts as plain L2") and report["degenerate"]
    assert list(report["modules"]) == MODULES
    directions = load_alignment_directions(artifact.path, dtype=torch.float64)
    for module, row in report["modules"].items():
        singular_values = torch.linalg.svdvals(directions[module])
        k = energy_rank(singular_values, 0.9)
        assert row["k"] == k > 1
        energies = singular_values**2
        assert row["energy_top_k"] == pytest.approx(float(energies[:k].sum() / energies.sum()))
    assert subspace_sidecar_path(artifact.path, 0.9).exists()


def test_an_unreadable_pair_is_one_line_and_exit_code_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = (tmp_path / "nope", tmp_path / "nope2")
    assert main(inspect_args(missing, tmp_path / "cache")) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "(model_not_found)" in err


def asft(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    """``asft ARGS`` in a clean environment: only ASFT_DATA_DIR set, no ``.env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ASFT_")}
    return subprocess.run(
        [str(ASFT), *args],
        env={**clean, "ASFT_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1"},
        cwd=data_dir.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )


def registered_as_tiny(pair: tuple[Path, Path], data_dir: Path) -> Path:
    """A service data folder whose database has ``pair`` registered as ``tiny``."""
    assert asft("db", "upgrade", data_dir=data_dir).returncode == 0
    engine = engine_for(f"sqlite:///{data_dir / 'asft.db'}")
    with transaction(engine) as session:
        session.add(ModelPair(id="tiny", base_model=str(pair[0]), aligned_model=str(pair[1])))
    engine.dispose()
    return data_dir


def test_asft_alignment_inspect_with_paths_prints_the_regime(
    tiny_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    result = asft(
        "alignment", "inspect", *inspect_args(tiny_pair, tmp_path / "c"), data_dir=data_dir
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("AsFT inverts on this pair")
    assert (
        len([p for p in (tmp_path / "c").glob("*.safetensors") if ".subspace-" not in p.name]) == 1
    )


def test_asft_alignment_inspect_resolves_a_registered_model_in_the_service_cache(
    tiny_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    data_dir = registered_as_tiny(tiny_pair, tmp_path / "data")

    result = asft("alignment", "inspect", "tiny", "--json", data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    # The worker's cache folder (<data_dir>/cache/alignment) now holds the artifact.
    assert Path(report["artifact"]).parent == data_dir / "cache" / "alignment"
    assert report["base_model"] == str(tiny_pair[0]) and list(report["modules"]) == MODULES

    unknown = asft("alignment", "inspect", "nope", data_dir=data_dir)
    assert unknown.returncode == 1 and unknown.stdout == ""
    assert unknown.stderr.strip() == "asft: no registered model 'nope'"

    both = asft("alignment", "inspect", "tiny", "--base", "x", data_dir=data_dir)
    assert both.returncode == 2 and "--base and --aligned" in both.stderr
    neither = asft("alignment", "inspect", "--base", "x", data_dir=data_dir)
    assert neither.returncode == 2 and "--base and --aligned" in neither.stderr


def test_asft_plan_resolves_a_registered_model_and_says_what_fits(
    tiny_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    data_dir = registered_as_tiny(tiny_pair, tmp_path / "data")

    planned = asft("plan", "tiny", "-p", "batch_size=2", "--json", data_dir=data_dir)
    assert planned.returncode == 0, planned.stderr
    plan = json.loads(planned.stdout)
    assert plan["total"] > plan["weights"] > 0 and plan["changes"] == []
    refused = asft("plan", "tiny", "--device-memory-gb", "0.000001", data_dir=data_dir)
    assert refused.returncode == 1 and "insufficient_device_memory" in refused.stderr
    unknown = asft("plan", "nope", data_dir=data_dir)
    assert unknown.returncode == 1 and "no registered model 'nope'" in unknown.stderr
