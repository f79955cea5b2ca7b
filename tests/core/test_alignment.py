"""Alignment direction: streamed from safetensors shards, cached per pair, clear errors."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from asft_core.alignment import (
    AlignmentArtifact,
    AlignmentError,
    checkpoint_fingerprint,
    compute_alignment_direction,
    get_or_compute_alignment,
    load_alignment_directions,
    top_singular_value,
)

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
    assert sorted(saved) == sorted(expected_modules) == sorted(artifact.modules)
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
