"""Alignment direction: streamed from safetensors shards, cached per pair, clear errors."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from asft_core.alignment import (
    DEFAULT_SUBSPACE_ENERGY,
    AlignmentArtifact,
    AlignmentError,
    ModuleStats,
    StreamingSafetensorsWriter,
    alignment_subspaces,
    checkpoint_fingerprint,
    compute_alignment_direction,
    get_or_compute_alignment,
    load_alignment_directions,
    regime,
    save_directions,
    spectrum_names,
    subspace_sidecar_path,
    top_singular_value,
)
from asft_core.penalty import energy_rank

CONFIG = {
    "model_type": "llama",
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
}


def weights(seed: int, layers: int = 2, dtype: torch.dtype = torch.float32) -> dict:
    generator = torch.Generator().manual_seed(seed)
    tensors = {"model.embed_tokens.weight": torch.randn(32, 16, generator=generator)}
    for layer in range(layers):
        prefix = f"model.layers.{layer}"
        tensors[f"{prefix}.self_attn.q_proj.weight"] = torch.randn(16, 16, generator=generator)
        tensors[f"{prefix}.self_attn.q_proj.bias"] = torch.randn(16, generator=generator)
        tensors[f"{prefix}.self_attn.k_proj.weight"] = torch.randn(8, 16, generator=generator)
        tensors[f"{prefix}.self_attn.v_proj.weight"] = torch.randn(8, 16, generator=generator)
        tensors[f"{prefix}.mlp.up_proj.weight"] = torch.randn(40, 16, generator=generator)
    return {name: value.to(dtype) for name, value in tensors.items()}


def write_checkpoint(folder: Path, tensors: dict, shards: int = 1, config: dict = CONFIG) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
        return folder
    weight_map = {}
    for index in range(shards):
        part = names[index::shards]
        file = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        save_file({name: tensors[name] for name in part}, str(folder / file))
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def aligned_from(base: dict, seed: int, rank_one: bool = True) -> dict:
    generator = torch.Generator().manual_seed(seed)
    aligned = {name: value.clone() for name, value in base.items()}
    for value in aligned.values():
        if rank_one:
            u = torch.randn(value.shape[0], 1, generator=generator)
            v = torch.randn(1, value.shape[-1], generator=generator) if value.ndim == 2 else None
            value += (u @ v).to(value.dtype) if v is not None else 0.1
        else:
            value += 1e-6 * torch.randn(value.shape, generator=generator).to(value.dtype)
    return aligned


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path, dict, dict]:
    base = weights(0)
    aligned = aligned_from(base, 1)
    return (
        write_checkpoint(tmp_path / "base", base, shards=3),
        write_checkpoint(tmp_path / "aligned", aligned),
        base,
        aligned,
    )


def test_direction_is_the_exact_difference_of_target_weights(pair, tmp_path: Path) -> None:
    base_dir, aligned_dir, base, aligned = pair
    artifact = compute_alignment_direction(base_dir, aligned_dir, tmp_path / "v.safetensors")
    saved = load_file(str(artifact.path))  # a standard safetensors file
    expected_modules = [
        f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")
    ]
    assert sorted(expected_modules) == sorted(artifact.modules)
    # Each V, then its stored spectrum (the top singular directions and values).
    spectra = [name for module in expected_modules for name in spectrum_names(module)]
    assert sorted(saved) == sorted(expected_modules + spectra)
    for module in expected_modules:
        name = module + ".weight"
        assert torch.equal(saved[module], aligned[name] - base[name])
        assert artifact.shapes[module] == list(base[name].shape)
    loaded = load_alignment_directions(artifact.path, modules=expected_modules[:1])
    assert list(loaded) == expected_modules[:1]


def test_metadata_records_models_and_per_module_stats(pair, tmp_path: Path) -> None:
    base_dir, aligned_dir, base, aligned = pair
    path = tmp_path / "v.safetensors"
    compute_alignment_direction(base_dir, aligned_dir, path, dtype="bfloat16")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["dtype"] == "bfloat16" and metadata["degenerate"] == "false"
    assert metadata["base_fingerprint"] == checkpoint_fingerprint(base_dir)
    artifact = AlignmentArtifact.load(path)
    assert artifact.base_model == str(base_dir) and artifact.aligned_model == str(aligned_dir)
    for module in artifact.modules:
        v = (aligned[module + ".weight"] - base[module + ".weight"]).double()
        norm = float(torch.linalg.matrix_norm(v))
        sigma = float(torch.linalg.svdvals(v)[0])
        stats = artifact.stats[module]
        assert stats.frobenius_norm == pytest.approx(norm, rel=1e-6)
        assert stats.top_eigenvalue == pytest.approx(sigma**2 / norm, rel=1e-6)
        # A rank-one difference has all its energy in one direction.
        assert stats.top_energy_share == pytest.approx(1.0, rel=1e-5)
    assert artifact.summary()["degenerate"] is False


def test_tiny_noise_difference_is_flagged_degenerate(tmp_path: Path) -> None:
    base = weights(0)
    base_dir = write_checkpoint(tmp_path / "base", base)
    aligned_dir = write_checkpoint(tmp_path / "aligned", aligned_from(base, 1, rank_one=False))
    artifact = compute_alignment_direction(base_dir, aligned_dir, tmp_path / "v.safetensors")
    assert artifact.degenerate and artifact.max_top_eigenvalue < 1e-2
    assert AlignmentArtifact.load(artifact.path).degenerate


def test_power_iteration_matches_svd_on_a_large_matrix() -> None:
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(600, 2, generator=generator) @ torch.randn(2, 300, generator=generator)
    matrix += 0.01 * torch.randn(600, 300, generator=generator)
    exact = float(torch.linalg.svdvals(matrix.double())[0])
    assert top_singular_value(matrix) == pytest.approx(exact, rel=1e-5)


def test_cache_computes_once_and_a_rebuilt_model_gets_a_new_entry(pair, tmp_path: Path) -> None:
    base_dir, aligned_dir, base, _ = pair
    cache = tmp_path / "cache"
    first = get_or_compute_alignment(base_dir, aligned_dir, cache)
    stamp = first.path.stat().st_mtime_ns
    again = get_or_compute_alignment(base_dir, aligned_dir, cache)
    assert again.path == first.path and again.path.stat().st_mtime_ns == stamp
    # Rebuild the aligned model with other weights: the stale direction must not be reused.
    write_checkpoint(aligned_dir, aligned_from(base, 2))
    os.utime(aligned_dir / "model.safetensors", ns=(stamp + 10**9, stamp + 10**9))
    rebuilt = get_or_compute_alignment(base_dir, aligned_dir, cache)
    assert rebuilt.path != first.path
    other_modules = get_or_compute_alignment(
        base_dir, aligned_dir, cache, target_modules=("q_proj",)
    )
    assert other_modules.path != rebuilt.path and len(other_modules.modules) == 2


def _die_writing(path: str) -> None:
    """Start writing an artifact at ``path``, then die as a SIGKILLed worker would."""
    StreamingSafetensorsWriter(Path(path), [("m", "F32", (4, 4))], metadata_reserve=0)
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_writers_temporary_file_is_removed_by_the_next_computation(
    pair, tmp_path: Path
) -> None:
    base_dir, aligned_dir, _, _ = pair
    name = get_or_compute_alignment(base_dir, aligned_dir, tmp_path / "first").path.name
    cache = tmp_path / "cache"
    cache.mkdir()
    child = multiprocessing.get_context("spawn").Process(
        target=_die_writing, args=(str(cache / name),)
    )
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    assert [p.name.startswith(f".{name}-") for p in cache.iterdir()] == [True]
    artifact = get_or_compute_alignment(base_dir, aligned_dir, cache)
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [
        artifact.path.name
    ]


def _compute_in_child(base_dir: str, aligned_dir: str, cache: str) -> None:
    get_or_compute_alignment(base_dir, aligned_dir, Path(cache))


def test_concurrent_processes_share_one_computation(pair, tmp_path: Path) -> None:
    base_dir, aligned_dir, _, _ = pair
    cache = tmp_path / "cache"
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(
            target=_compute_in_child, args=(str(base_dir), str(aligned_dir), str(cache))
        )
        for _ in range(3)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    artifacts = sorted(cache.glob("*.safetensors"))
    assert len(artifacts) == 1
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp files left


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ("architecture", "architecture_mismatch"),
        ("missing", "missing_module"),
        ("shape", "shape_mismatch"),
        ("no_targets", "missing_module"),
        ("no_files", "no_safetensors"),
    ],
)
def test_bad_pairs_fail_with_a_code(tmp_path: Path, change: str, code: str) -> None:
    base = weights(0)
    aligned = aligned_from(base, 1)
    config = dict(CONFIG)
    modules: tuple[str, ...] = ("q_proj", "v_proj")
    if change == "architecture":
        config["num_hidden_layers"] = 3
    elif change == "missing":
        del aligned["model.layers.1.self_attn.v_proj.weight"]
    elif change == "shape":
        aligned["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(16, 8)
    elif change == "no_targets":
        modules = ("o_proj",)
    base_dir = write_checkpoint(tmp_path / "base", base)
    aligned_dir = write_checkpoint(tmp_path / "aligned", aligned, config=config)
    if change == "no_files":
        (aligned_dir / "model.safetensors").unlink()
    with pytest.raises(AlignmentError) as error:
        compute_alignment_direction(base_dir, aligned_dir, tmp_path / "v.safetensors", modules)
    assert error.value.code == code
    assert not (tmp_path / "v.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".v.safetensors")]


def test_unknown_local_path_is_model_not_found(tmp_path: Path) -> None:
    with pytest.raises(AlignmentError) as error:
        compute_alignment_direction(tmp_path / "nope", tmp_path / "nope2", tmp_path / "v.st")
    assert error.value.code == "model_not_found"


def noisy_artifact(tmp_path: Path) -> AlignmentArtifact:
    """A pair whose differences are full-rank noise, so k at tau = 0.5 is several directions."""
    base = weights(0)
    base_dir = write_checkpoint(tmp_path / "base", base)
    aligned_dir = write_checkpoint(tmp_path / "aligned", aligned_from(base, 1, rank_one=False))
    return compute_alignment_direction(base_dir, aligned_dir, tmp_path / "v.safetensors")


def test_stats_hold_sigma_stable_rank_and_the_energy_rank(pair, tmp_path: Path) -> None:
    base_dir, aligned_dir, _, _ = pair
    rank_one = compute_alignment_direction(base_dir, aligned_dir, tmp_path / "one.safetensors")
    for stats in rank_one.stats.values():
        assert stats.k == 1 and stats.energy_top_k == pytest.approx(1.0, rel=1e-6)
        assert stats.stable_rank == pytest.approx(1.0, rel=1e-5)
    noisy = noisy_artifact(tmp_path / "noisy")
    directions = load_alignment_directions(noisy.path, dtype=torch.float64)
    reloaded = AlignmentArtifact.load(noisy.path)
    for module, v in directions.items():
        singular_values = torch.linalg.svdvals(v)
        energies = singular_values**2 / (singular_values**2).sum()
        k = energy_rank(singular_values, DEFAULT_SUBSPACE_ENERGY)
        assert k > 1  # noise spreads the energy
        for stats in (noisy.stats[module], reloaded.stats[module]):
            assert stats.sigma_1 == pytest.approx(float(singular_values[0]), rel=1e-6)
            assert stats.stable_rank == pytest.approx(float(1 / energies[0]), rel=1e-6)
            assert stats.k == k
            assert stats.energy_top_k == pytest.approx(float(energies[:k].sum()), rel=1e-6)
            assert float(energies[: k - 1].sum()) < DEFAULT_SUBSPACE_ENERGY <= stats.energy_top_k


def test_an_artifact_written_before_the_new_stats_still_loads(pair, tmp_path: Path) -> None:
    base_dir, aligned_dir, _, _ = pair
    artifact = compute_alignment_direction(base_dir, aligned_dir, tmp_path / "new.safetensors")
    with safe_open(str(artifact.path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    old_keys = ("frobenius_norm", "top_eigenvalue", "top_energy_share")
    metadata["stats"] = json.dumps(
        {
            name: {key: values[key] for key in old_keys}
            for name, values in json.loads(metadata["stats"]).items()
        }
    )
    old_path = tmp_path / "old.safetensors"
    save_file(tensors, str(old_path), metadata=metadata)
    old = AlignmentArtifact.load(old_path)
    for module, stats in old.stats.items():
        new = artifact.stats[module]
        assert stats.k is None and stats.energy_top_k is None
        assert stats.sigma_1 == pytest.approx(new.sigma_1, rel=1e-6)
        assert stats.stable_rank == pytest.approx(new.stable_rank, rel=1e-6)
    summary = json.loads(json.dumps(old.summary(), allow_nan=False))
    assert summary["regime"] == regime(old) and summary["per_module"][module]["k"] is None
    # The subspaces (and so k) are still available for an old artifact.
    subspaces = alignment_subspaces(old_path)
    assert {s.k for s in subspaces.values()} == {1}


def test_zero_direction_stats_are_zero_not_nan() -> None:
    stats = ModuleStats.from_metadata(
        {"frobenius_norm": 0.0, "top_eigenvalue": 0.0, "top_energy_share": 0.0}
    )
    assert (stats.sigma_1, stats.stable_rank) == (0.0, 0.0)


def test_summary_keeps_its_keys_and_adds_the_subspace_facts(pair, tmp_path: Path) -> None:
    base_dir, aligned_dir, _, _ = pair
    summary = compute_alignment_direction(base_dir, aligned_dir, tmp_path / "v.st").summary()
    assert {"modules", "dtype", "max_top_eigenvalue", "degenerate", "per_module"} <= set(summary)
    assert summary["subspace_energy"] == DEFAULT_SUBSPACE_ENERGY
    assert summary["regime"].startswith("AsFT")
    for module in summary["per_module"].values():
        assert set(module) == {
            "frobenius_norm",
            "top_eigenvalue",
            "top_energy_share",
            "sigma_1",
            "stable_rank",
            "k",
            "energy_top_k",
        }
        assert module["k"] == 1


def with_top_eigenvalues(artifact: AlignmentArtifact, values: list[float]) -> AlignmentArtifact:
    template = next(iter(artifact.stats.values()))
    stats = {
        f"m{i}": dataclasses.replace(template, top_eigenvalue=value)
        for i, value in enumerate(values)
    }
    return dataclasses.replace(artifact, modules=list(stats), stats=stats)


@pytest.mark.parametrize(
    ("eigenvalues", "phrases"),
    [
        ([0.17, 0.05], ["plain L2", "0.17 at most", "(1-0.17)^2 = 69%"]),
        ([0.001], ["plain L2", "1.0e-03", "= 100%"]),
        ([1.1, 0.95, 0.2], ["as intended", "near 1 in 2 of 3 modules", "= 1%", "nearly free"]),
        ([1.8, 0.3], ["only partly", "1.80", "= 64%"]),
        ([3.0, 2.5, 0.4], ["inverts", "> 2 in 2 of 3 modules", "(3.00-1)^2 = 4 times as much"]),
    ],
)
def test_regime_says_what_the_penalty_does(
    pair, tmp_path: Path, eigenvalues: list[float], phrases: list[str]
) -> None:
    base_dir, aligned_dir, _, _ = pair
    artifact = compute_alignment_direction(base_dir, aligned_dir, tmp_path / "v.st")
    sentence = regime(with_top_eigenvalues(artifact, eigenvalues))
    for phrase in phrases:
        assert phrase in sentence, sentence


def test_subspaces_are_the_top_singular_vectors_and_cached_beside_the_artifact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    artifact = noisy_artifact(tmp_path)
    directions = load_alignment_directions(artifact.path, dtype=torch.float64)
    subspaces = alignment_subspaces(artifact.path)
    sidecar = subspace_sidecar_path(artifact.path, DEFAULT_SUBSPACE_ENERGY)
    assert (
        sidecar.name == f"v.subspace-{DEFAULT_SUBSPACE_ENERGY:g}.safetensors" and sidecar.exists()
    )
    assert list(subspaces) == artifact.modules
    for module, subspace in subspaces.items():
        v = directions[module]
        u, singular_values, _ = torch.linalg.svd(v, full_matrices=False)
        k = energy_rank(singular_values, DEFAULT_SUBSPACE_ENERGY)
        assert subspace.k == k == artifact.stats[module].k
        assert subspace.basis.shape == (v.shape[0], k) and subspace.basis.dtype == torch.float32
        assert torch.allclose(subspace.singular_values, singular_values, rtol=1e-10)
        projector = subspace.basis.double() @ subspace.basis.double().T
        assert torch.allclose(projector, u[:, :k] @ u[:, :k].T, atol=1e-5)
        assert subspace.energy == pytest.approx(artifact.stats[module].energy_top_k, rel=1e-6)

    # A second call reads the sidecar: no SVD runs and the file is not rewritten.
    stamp = sidecar.stat().st_mtime_ns

    def no_svd(*_: object, **__: object) -> None:
        raise AssertionError("recomputed instead of reading the sidecar")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    again = alignment_subspaces(artifact.path)
    assert sidecar.stat().st_mtime_ns == stamp
    for module, subspace in again.items():
        assert torch.equal(subspace.basis, subspaces[module].basis)
    capped = alignment_subspaces(artifact.path, max_k=1)
    assert {s.k for s in capped.values()} == {1}
    assert all(s.basis.shape[1] == 1 and s.energy < s.tau for s in capped.values())


def test_subspaces_compute_only_missing_modules_and_follow_a_rewritten_artifact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    artifact = noisy_artifact(tmp_path)
    first = artifact.modules[0]
    calls = []
    svd = torch.linalg.svd

    def counting_svd(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return svd(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", counting_svd)
    only_first = alignment_subspaces(artifact.path, modules=[first])
    assert list(only_first) == [first] and len(calls) == 1
    everything = alignment_subspaces(artifact.path)
    assert list(everything) == artifact.modules and len(calls) == len(artifact.modules)
    with pytest.raises(AlignmentError) as error:
        alignment_subspaces(artifact.path, modules=["model.layers.9.self_attn.q_proj"])
    assert error.value.code == "missing_module"

    # Rewrite the artifact in place with rank-one directions: the stale sidecar is not used.
    generator = torch.Generator().manual_seed(5)
    rank_one = {
        m: torch.randn(s[0], 1, generator=generator) @ torch.randn(1, s[1], generator=generator)
        for m, s in artifact.shapes.items()
    }
    save_directions(artifact.path, rank_one, like=artifact)
    rewritten = alignment_subspaces(artifact.path)
    assert {s.k for s in rewritten.values()} == {1}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".v.subspace")]


def test_metadata_has_room_for_every_stat_of_many_modules(pair, tmp_path: Path) -> None:
    base_dir, aligned_dir, _, _ = pair
    like = compute_alignment_direction(base_dir, aligned_dir, tmp_path / "v.st")
    generator = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.self_attn.{m}" for i in range(64) for m in ("q_proj", "v_proj")]
    names += [f"model.layers.{i}.{'a_long_module_name_' * 10}q_proj" for i in range(8)]
    directions = {name: torch.randn(4, 3, generator=generator) for name in names}
    written = save_directions(tmp_path / "many.safetensors", directions, like=like)
    loaded = AlignmentArtifact.load(written.path)
    assert loaded.modules == names
    assert [s.k for s in loaded.stats.values()] == [s.k for s in written.stats.values()]
