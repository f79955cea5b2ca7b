"""The AsFT penalty equals the materialised reference formula, in value and gradient."""

from __future__ import annotations

import pytest
import torch

from asft_core.penalty import (
    AsftRegularizer,
    asft_penalty,
    asft_penalty_low_rank,
    low_rank_direction,
    naive_asft_penalty,
)

SHAPES = [(16, 16, 1), (24, 40, 4), (64, 32, 8), (96, 128, 8), (7, 5, 3)]


def random_module(d_out: int, d_in: int, r: int, seed: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    lora_a = torch.randn(r, d_in, generator=generator, dtype=torch.float64, requires_grad=True)
    lora_b = torch.randn(d_out, r, generator=generator, dtype=torch.float64, requires_grad=True)
    # A direction with a dominant low-rank part, like a real alignment update.
    direction = torch.randn(d_out, 3, generator=generator, dtype=torch.float64) @ torch.randn(
        3, d_in, generator=generator, dtype=torch.float64
    ) + 0.1 * torch.randn(d_out, d_in, generator=generator, dtype=torch.float64)
    return lora_a, lora_b, direction


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).detach().norm() / expected.detach().norm())


@pytest.mark.parametrize(("d_out", "d_in", "r"), SHAPES)
@pytest.mark.parametrize("scaling", [1.0, 4.0])
def test_value_and_gradients_match_the_naive_formula(
    d_out: int, d_in: int, r: int, scaling: float
) -> None:
    lora_a, lora_b, direction = random_module(d_out, d_in, r, seed=d_out * 1000 + d_in + r)
    ours = asft_penalty(lora_a, lora_b, direction, scaling=scaling)
    grad_a, grad_b = torch.autograd.grad(ours, (lora_a, lora_b))
    naive = naive_asft_penalty(lora_a * scaling, lora_b, direction)
    naive_grad_a, naive_grad_b = torch.autograd.grad(naive, (lora_a, lora_b))
    assert ours.dtype == torch.float64
    assert relative_error(ours, naive) < 1e-10
    assert relative_error(grad_a, naive_grad_a) < 1e-10
    assert relative_error(grad_b, naive_grad_b) < 1e-10


def test_precomputed_norm_and_half_precision_inputs() -> None:
    lora_a, lora_b, direction = (t.detach() for t in random_module(32, 48, 4, seed=1))
    norm = torch.linalg.matrix_norm(direction)
    assert torch.equal(
        asft_penalty(lora_a, lora_b, direction, direction_norm=norm),
        asft_penalty(lora_a, lora_b, direction),
    )
    half = asft_penalty(lora_a.detach().bfloat16(), lora_b.detach().bfloat16(), direction.float())
    assert half.dtype == torch.float32  # computed in fp32 even from bf16 weights
    assert abs(float(half) / float(naive_asft_penalty(lora_a, lora_b, direction)) - 1) < 0.05


def test_penalty_vanishes_only_for_updates_that_c_fixes() -> None:
    # If C B = B (B's columns are eigenvectors of C with eigenvalue 1), the penalty is 0.
    u = torch.linalg.qr(torch.randn(20, 2, dtype=torch.float64))[0]
    w = torch.linalg.qr(torch.randn(30, 2, dtype=torch.float64))[0]
    direction = 2.0**0.5 * u @ w.T  # sigma = (1, 1) scaled so that sigma^2 / ||V||_F = 1
    lora_b = u @ torch.randn(2, 4, dtype=torch.float64)
    lora_a = torch.randn(4, 30, dtype=torch.float64)
    assert float(asft_penalty(lora_a, lora_b, direction)) < 1e-20
    orthogonal_b = torch.randn(20, 4, dtype=torch.float64)
    orthogonal_b -= u @ (u.T @ orthogonal_b)
    expected = float(torch.linalg.matrix_norm(orthogonal_b @ lora_a) ** 2)
    assert abs(float(asft_penalty(lora_a, orthogonal_b, direction)) / expected - 1) < 1e-12


def test_low_rank_at_full_rank_is_exact_and_within_its_bound_below() -> None:
    lora_a, lora_b, direction = (t.detach() for t in random_module(40, 24, 8, seed=3))
    exact = float(naive_asft_penalty(lora_a, lora_b, direction))
    full = low_rank_direction(direction, k=24)
    assert full.spectral_error == 0.0
    assert abs(float(asft_penalty_low_rank(lora_a, lora_b, full)) / exact - 1) < 1e-10
    update_norm_sq = float(torch.linalg.matrix_norm(lora_b @ lora_a) ** 2)
    for k in (1, 3, 6):
        approx = low_rank_direction(direction, k=k)
        error = abs(float(asft_penalty_low_rank(lora_a, lora_b, approx)) - exact)
        assert approx.spectral_error > 0
        assert error <= approx.relative_bound * update_norm_sq
        assert approx.basis.shape == (40, k)


def test_regularizer_sums_modules_times_lambda_and_names_missing_ones() -> None:
    modules = {
        f"layer.{i}.q_proj": tuple(t.detach() for t in random_module(16, 12, 2, seed=10 + i))
        for i in range(3)
    }
    directions = {name: m[2] for name, m in modules.items()}
    weights = {name: (m[0], m[1]) for name, m in modules.items()}
    expected = sum(float(naive_asft_penalty(*m)) for m in modules.values())
    regularizer = AsftRegularizer(directions, lam=0.5)
    assert abs(float(regularizer(weights)) / (0.5 * expected) - 1) < 1e-10
    assert sorted(regularizer.modules) == sorted(directions)
    low_rank = AsftRegularizer(directions, lam=0.5, low_rank=12)
    assert abs(float(low_rank(weights)) / (0.5 * expected) - 1) < 1e-10
    assert set(low_rank.low_rank_bounds) == set(directions)
    with pytest.raises(ValueError, match="no alignment direction"):
        regularizer({"layer.9.q_proj": weights["layer.0.q_proj"]})
    with pytest.raises(ValueError, match="shape"):
        regularizer({"layer.0.q_proj": (torch.zeros(2, 5), torch.zeros(16, 2))})
