"""V costs what it must: the artifact's stored spectrum, V in bf16 or on the host, the plan."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import asft_core.alignment as alignment
from asft_core.alignment import (
    AlignmentArtifact,
    alignment_low_rank,
    compute_alignment_direction,
    load_alignment_directions,
    save_directions,
    spectrum_names,
    tensor_index_of_file,
)
from asft_core.memory import fitting_hyperparameters, plan_for_config
from asft_core.penalty import AsftRegularizer, asft_penalty_low_rank, low_rank_direction
from asft_core.spec import JobSpec
from asft_core.training import TrainSpec, train
from asft_core.zoo import ZooPaths
from tests.core.test_alignment import aligned_from, weights, write_checkpoint
from tests.core.test_memory import LLAMA_7B

REPO_ROOT = Path(__file__).resolve().parents[2]


def decaying(d_out: int, d_in: int, seed: int) -> torch.Tensor:
    """A random V whose singular values fall off as 1 / (i + 1): no two alike."""
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d_out, d_out, generator=generator, dtype=torch.float64))
    w, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=generator, dtype=torch.float64))
    count = min(d_out, d_in)
    sigma = 1.0 / torch.arange(1, count + 1, dtype=torch.float64)
    return ((u[:, :count] * sigma) @ w[:, :count].T).float()


@pytest.fixture
def artifact(tmp_path: Path) -> AlignmentArtifact:
    """An artifact of two modules with full-rank, decaying V (32 x 24 and 16 x 24)."""
    base = write_checkpoint(tmp_path / "base", weights(0))
    aligned = write_checkpoint(tmp_path / "aligned", aligned_from(weights(0), 1))
    like = compute_alignment_direction(base, aligned, tmp_path / "pair.safetensors")
    directions = {"layers.0.q_proj": decaying(32, 24, 1), "layers.0.v_proj": decaying(16, 24, 2)}
    return save_directions(tmp_path / "v.safetensors", directions, like)


def penalty_of(factors: object, seed: int = 0) -> float:
    generator = torch.Generator().manual_seed(seed)
    assert hasattr(factors, "basis")
    d_out = factors.basis.shape[0]
    lora_a = torch.randn(4, 24, generator=generator)
    lora_b = torch.randn(d_out, 4, generator=generator)
    return float(asft_penalty_low_rank(lora_a, lora_b, factors))  # type: ignore[arg-type]


def test_the_artifact_stores_each_modules_top_spectrum(artifact: AlignmentArtifact) -> None:
    entries = tensor_index_of_file(artifact.path)
    directions = load_alignment_directions(artifact.path)
    for module, v in directions.items():
        basis_name, sigma_name = spectrum_names(module)
        rank = artifact.stored_rank(module)
        assert rank == min(v.shape) and entries[basis_name].shape == (v.shape[0], rank)
        stored = alignment.read_tensor(entries[sigma_name])
        assert torch.allclose(stored, torch.linalg.svdvals(v.double()), rtol=1e-5)
        for k in (1, 3, rank):
            exact = low_rank_direction(v, k)
            factors = alignment_low_rank(artifact.path, k, modules=[module])[module]
            assert factors.basis.shape == (v.shape[0], k)
            assert torch.allclose(factors.eigenvalues, exact.eigenvalues, rtol=1e-5)
            assert factors.spectral_error == pytest.approx(exact.spectral_error, rel=1e-5)
            assert factors.top_eigenvalue == pytest.approx(exact.top_eigenvalue, rel=1e-5)
            # Singular vectors differ by sign; the penalty does not.
            assert penalty_of(factors) == pytest.approx(penalty_of(exact), rel=1e-5)


def poison_v(source: Path, target: Path) -> None:
    """Copy the artifact with every V's bytes set to NaN (fp32 artifacts); spectra intact."""
    shutil.copy(source, target)
    entries = tensor_index_of_file(target)
    nan = torch.tensor(float("nan")).reshape(1).view(torch.uint8).numpy().tobytes()
    with open(target, "r+b") as file:
        for module in AlignmentArtifact.load(target).modules:
            entry = entries[module]
            file.seek(entry.start)
            file.write(nan * ((entry.end - entry.start) // len(nan)))
    assert all(v.isnan().all() for v in load_alignment_directions(target).values())


def test_a_low_rank_penalty_never_reads_v(artifact: AlignmentArtifact, tmp_path: Path) -> None:
    poisoned = tmp_path / "poisoned.safetensors"
    poison_v(artifact.path, poisoned)
    clean = alignment_low_rank(artifact.path, 3)
    from_poisoned = alignment_low_rank(poisoned, 3)
    for module, factors in from_poisoned.items():
        assert torch.equal(factors.basis, clean[module].basis)
        assert penalty_of(factors) == penalty_of(clean[module])


def test_a_low_rank_job_trains_the_same_on_an_artifact_whose_v_is_nan(
    zoo: ZooPaths, alignment_artifact: Path, tmp_path: Path
) -> None:
    poisoned = tmp_path / "poisoned.safetensors"
    poison_v(alignment_artifact, poisoned)
    rows = zoo.task_file("sentiment", "train").read_text().splitlines(keepends=True)[:16]
    (tmp_path / "train.jsonl").write_text("".join(rows))
    adapters = []
    for path in (alignment_artifact, poisoned):
        spec = TrainSpec(
            model=str(zoo.aligned),
            training_file=tmp_path / "train.jsonl",
            output_dir=tmp_path / path.stem,
            job=JobSpec.resolve("asft", {"penalty_rank": 4, "batch_size": 4}),
            alignment_path=path,
            max_steps=3,
            checkpoint_each_epoch=False,
        )
        result = train(spec)
        assert result.final_train_loss is not None and math.isfinite(result.final_train_loss)
        assert result.adapter_dir is not None
        adapters.append(load_file(str(result.adapter_dir / "adapter_model.safetensors")))
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][name], adapters[1][name]) for name in adapters[0])


def test_ranks_beyond_the_stored_spectrum_and_old_artifacts_decompose_v(
    artifact: AlignmentArtifact, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directions = load_alignment_directions(artifact.path)
    monkeypatch.setattr(alignment, "SPECTRUM_RANK", 2)
    short = save_directions(tmp_path / "short.safetensors", directions, artifact)
    assert short.stored_rank("layers.0.q_proj") == 2
    # An artifact of format 1: V and its stats, no spectrum.
    tensors = {m: v.contiguous() for m, v in directions.items()}
    metadata = alignment._metadata(artifact)
    metadata.pop("spectrum_rank")
    metadata["asft_format"] = "1"
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata=metadata)
    assert AlignmentArtifact.load(old).stored_rank("layers.0.q_proj") == 0
    for path, k in ((short.path, 2), (short.path, 5), (old, 3)):
        factors = alignment_low_rank(path, k)
        for module, v in directions.items():
            exact = low_rank_direction(v, k)
            assert torch.allclose(factors[module].eigenvalues, exact.eigenvalues, rtol=1e-5)
            assert factors[module].spectral_error == pytest.approx(exact.spectral_error, rel=1e-5)


def test_large_modules_get_a_randomized_spectrum_close_to_the_exact_one(
    artifact: AlignmentArtifact, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    v = decaying(96, 80, 3)
    monkeypatch.setattr(alignment, "EXACT_SPECTRUM_MAX_DIM", 40)  # 80 > 40: randomized
    monkeypatch.setattr(alignment, "SPECTRUM_RANK", 8)
    stored = save_directions(tmp_path / "big.safetensors", {"m": v}, artifact)
    again = save_directions(tmp_path / "again.safetensors", {"m": v}, artifact)
    factors = alignment_low_rank(stored.path, 8)["m"]
    exact = low_rank_direction(v, 8)
    assert torch.allclose(factors.eigenvalues, exact.eigenvalues, rtol=1e-3)
    overlap = torch.linalg.svdvals(factors.basis.double().T @ exact.basis.double())
    assert overlap.min() > 0.99  # the same 8-dimensional subspace
    assert (stored.path.read_bytes()[-4096:]) == (again.path.read_bytes()[-4096:])  # seeded


@pytest.mark.parametrize(("storage", "tolerance"), [("host", 1e-6), ("bf16", 2e-2)])
def test_v_in_bf16_or_on_the_host_gives_the_exact_penalty_and_gradients(
    storage: str, tolerance: float
) -> None:
    directions = {"a": decaying(32, 24, 4) * 3, "b": decaying(16, 24, 5) * 3}
    generator = torch.Generator().manual_seed(6)
    pairs = {
        name: (
            torch.randn(4, 24, generator=generator, requires_grad=True),
            torch.randn(v.shape[0], 4, generator=generator, requires_grad=True),
        )
        for name, v in directions.items()
    }

    def value_and_gradients(kept: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        regularizer = AsftRegularizer(directions, lambda_=0.5, storage=kept)  # type: ignore[arg-type]
        value = regularizer(pairs)
        weights = [w for pair in pairs.values() for w in pair]
        return value.detach(), list(torch.autograd.grad(value, weights))

    exact, exact_gradients = value_and_gradients("fp32")
    value, gradients = value_and_gradients(storage)
    assert torch.allclose(value, exact, rtol=tolerance)
    for got, want in zip(gradients, exact_gradients, strict=True):
        assert torch.allclose(got, want, rtol=tolerance, atol=tolerance * want.abs().max())
    with pytest.raises(ValueError, match="storage"):
        AsftRegularizer(directions, storage="fp16")  # type: ignore[arg-type]


def test_the_plan_counts_v_as_it_is_kept_and_moves_it_to_the_host_to_fit(
    tmp_path: Path,
) -> None:
    job = JobSpec.resolve("asft", {})  # q_proj and v_proj of 32 layers, 4096 x 4096 each
    module = 4096 * 4096 * 4
    plans = {
        storage: plan_for_config(LLAMA_7B, job, torch.bfloat16, True, storage)  # type: ignore[arg-type]
        for storage in ("fp32", "bf16", "host")
    }
    assert plans["fp32"].alignment == 64 * module
    assert plans["bf16"].alignment == 64 * module // 2 + module
    assert plans["host"].alignment == module
    assert "V on the host" in plans["host"].describe()
    LLAMA_7B.save_pretrained(tmp_path)
    between = (plans["host"].total + plans["fp32"].total) // 2  # fits only with V on the host
    plan, changes = fitting_hyperparameters(tmp_path, job, torch.bfloat16, between)
    assert plan.direction_storage == "host" and plan.gradient_checkpointing
    assert changes == ["gradient checkpointing on", "V kept on the host"]
    # A low-rank job never needs it: its basis is all that reaches the device.
    low_rank = JobSpec.resolve("asft", {"penalty_rank": 16})
    plan, changes = fitting_hyperparameters(tmp_path, low_rank, torch.bfloat16, between)
    assert plan.direction_storage == "fp32" and "V kept on the host" not in changes


def _wide_pair(zoo: ZooPaths, folder: Path) -> tuple[Path, Path, int]:
    """A random Llama pair whose attention weights dwarf the rest: V of q, k, v and o in 2
    layers of width 1024 is 32 MiB in fp32. Returns (base, aligned, V's bytes)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(zoo.aligned)
    config = LlamaConfig(
        hidden_size=1024,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    paths = folder / "base", folder / "aligned"
    model.save_pretrained(paths[0])
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "self_attn" in name:
                parameter.add_(0.01 * torch.randn_like(parameter))
    model.save_pretrained(paths[1])
    for path in paths:
        tokenizer.save_pretrained(path)
    return paths[0], paths[1], 2 * 4 * 1024 * 1024 * 4


def test_a_low_rank_job_never_holds_v_as_its_peak_memory_shows(
    zoo: ZooPaths, tmp_path: Path
) -> None:
    base, aligned, v_bytes = _wide_pair(zoo, tmp_path)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    artifact = compute_alignment_direction(base, aligned, tmp_path / "v.safetensors", targets)
    rows = zoo.task_file("sentiment", "train").read_text().splitlines(keepends=True)[:16]
    (tmp_path / "train.jsonl").write_text("".join(rows))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    peaks = {}
    for rank in (0, 8):
        arguments = [str(aligned), str(artifact.path), str(tmp_path / "train.jsonl")]
        arguments += [str(tmp_path / f"out-{rank}"), str(rank)]
        done = subprocess.run(
            [sys.executable, "-m", "tests.core.direction_probe", *arguments],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO_ROOT,
            timeout=300,
            check=True,
        )
        peaks[rank] = json.loads(done.stdout.strip().splitlines()[-1])["peak"]
    saved = peaks[0] - peaks[8]
    print(f"peak exact {peaks[0] / 2**20:.0f} MiB, low-rank {peaks[8] / 2**20:.0f} MiB")
    assert saved > 0.8 * v_bytes, (peaks, v_bytes)
