"""The AsFT and projector penalties equal their materialised reference formulas, in value and
gradient; the control bases are orthonormal and reproducible."""

from __future__ import annotations

import pytest
import torch

from asft_core.penalty import (
    AsftRegularizer,
    ProjectorRegularizer,
    asft_penalty,
    asft_penalty_low_rank,
    energy_rank,
    haar_basis,
    l2_regularizer,
    low_rank_direction,
    naive_asft_penalty,
    naive_projector_penalty,
    projector_penalty,
    random_singular_basis,
    top_basis,
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
    regularizer = AsftRegularizer(directions, lambda_=0.5)
    assert abs(float(regularizer(weights)) / (0.5 * expected) - 1) < 1e-10
    assert sorted(regularizer.modules) == sorted(directions)
    low_rank = AsftRegularizer(directions, lambda_=0.5, low_rank=12)
    assert abs(float(low_rank(weights)) / (0.5 * expected) - 1) < 1e-10
    assert set(low_rank.low_rank_bounds) == set(directions)
    with pytest.raises(ValueError, match="no alignment direction"):
        regularizer({"layer.9.q_proj": weights["layer.0.q_proj"]})
    with pytest.raises(ValueError, match="shape"):
        regularizer({"layer.0.q_proj": (torch.zeros(2, 5), torch.zeros(16, 2))})


def test_a_low_rank_penalty_moves_only_v_s_factors_to_the_device() -> None:
    v = random_module(64, 48, 4, seed=5)[2].detach()
    # "meta" stands in for a GPU: whatever reaches it is visible, and V itself never does.
    regularizer = AsftRegularizer({"q_proj": v}, lambda_=1.0, low_rank=6, device="meta")
    factors = regularizer._low_rank["q_proj"]
    assert factors.basis.device.type == "meta" and tuple(factors.basis.shape) == (64, 6)
    assert tuple(factors.eigenvalues.shape) == (6,)
    assert regularizer._exact == {}
    exact = AsftRegularizer({"q_proj": v}, lambda_=1.0, device="meta")
    assert exact._exact["q_proj"][0].device.type == "meta"


def test_an_outer_autocast_does_not_lower_the_penalty_s_precision() -> None:
    lora_A, lora_B, v = (t.detach().float() for t in random_module(64, 48, 4, seed=3))
    regularizer = AsftRegularizer({"q_proj": v}, lambda_=1.0)
    projector = l2_regularizer({"q_proj": 64}, lambda_=1.0)
    plain = (regularizer({"q_proj": (lora_A, lora_B)}), projector({"q_proj": (lora_A, lora_B)}))
    # A training loop under bf16 autocast: its products would run in bf16 otherwise.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.mm(lora_B, lora_A).dtype == torch.bfloat16
        cast = (regularizer({"q_proj": (lora_A, lora_B)}), projector({"q_proj": (lora_A, lora_B)}))
    for before, under in zip(plain, cast, strict=True):
        assert under.dtype == torch.float32 and torch.equal(before, under)


# (d_out, d_in, r, k): k = 0 (plain L2), k = 1, k = d_out (the whole space), r = 1.
PROJECTOR_SHAPES = [
    (16, 12, 4, 0),
    (16, 12, 4, 1),
    (24, 40, 4, 5),
    (12, 20, 3, 12),
    (30, 18, 1, 7),
    (9, 7, 1, 9),
]


def lora_pair(d_out: int, d_in: int, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    lora_a = torch.randn(r, d_in, generator=generator, dtype=torch.float64, requires_grad=True)
    lora_b = torch.randn(d_out, r, generator=generator, dtype=torch.float64, requires_grad=True)
    return lora_a, lora_b


def update_norm_sq(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> float:
    return float(torch.linalg.matrix_norm(scaling * lora_b.detach() @ lora_a.detach()) ** 2)


@pytest.mark.parametrize(("d_out", "d_in", "r", "k"), PROJECTOR_SHAPES)
@pytest.mark.parametrize("scaling", [1.0, 4.0])
@pytest.mark.parametrize("inside", [False, True])
def test_projector_penalty_matches_the_materialised_projector(
    d_out: int, d_in: int, r: int, k: int, scaling: float, inside: bool
) -> None:
    lora_a, lora_b = lora_pair(d_out, d_in, r, seed=d_out * 100 + r * 10 + k)
    basis = haar_basis(d_out, k, torch.Generator().manual_seed(k))
    ours = projector_penalty(lora_a, lora_b, basis, scaling=scaling, inside=inside)
    grad_a, grad_b = torch.autograd.grad(ours, (lora_a, lora_b))
    naive = naive_projector_penalty(lora_a, lora_b, basis, scaling=scaling, inside=inside)
    naive_grad_a, naive_grad_b = torch.autograd.grad(naive, (lora_a, lora_b))
    assert ours.dtype == torch.float64
    total = update_norm_sq(lora_a, lora_b, scaling)
    vanishes = (k == 0 and inside) or (k == d_out and not inside)
    if vanishes:
        # The exact value is 0: compare with the size of the update, not relatively.
        assert 0.0 <= float(ours.detach()) < 1e-20 * total
        assert abs(float(naive.detach())) < 1e-20 * total
        for grad in (grad_a, grad_b):
            assert float(grad.norm()) < 1e-10 * total**0.5
    else:
        assert float(ours.detach()) > 1e-3 * total  # a real, non-trivial penalty
        assert relative_error(ours, naive) < 1e-10
        assert relative_error(grad_a, naive_grad_a) < 1e-10
        assert relative_error(grad_b, naive_grad_b) < 1e-10


@pytest.mark.parametrize(("d_out", "d_in", "r", "k"), PROJECTOR_SHAPES)
@pytest.mark.parametrize("scaling", [1.0, 4.0])
def test_outside_plus_inside_is_plain_l2(
    d_out: int, d_in: int, r: int, k: int, scaling: float
) -> None:
    lora_a, lora_b = (t.detach() for t in lora_pair(d_out, d_in, r, seed=7 + k))
    basis = haar_basis(d_out, k, torch.Generator().manual_seed(3))
    outside = projector_penalty(lora_a, lora_b, basis, scaling=scaling)
    inside = projector_penalty(lora_a, lora_b, basis, scaling=scaling, inside=True)
    l2 = update_norm_sq(lora_a, lora_b, scaling)
    assert abs(float(outside + inside) / l2 - 1) < 1e-12
    if k == 0:
        assert abs(float(outside) / l2 - 1) < 1e-12 and float(inside) == 0.0


def test_projector_penalty_in_half_precision_is_computed_in_float32() -> None:
    lora_a, lora_b = (t.detach() for t in lora_pair(32, 24, 4, seed=5))
    basis = haar_basis(32, 6, torch.Generator().manual_seed(0))
    half = projector_penalty(lora_a.bfloat16(), lora_b.bfloat16(), basis.float())
    assert half.dtype == torch.float32
    assert abs(float(half) / float(naive_projector_penalty(lora_a, lora_b, basis)) - 1) < 0.05


@pytest.mark.parametrize(
    ("singular_values", "tau", "expected"),
    [
        ([3.0, 1.0], 0.75, 1),  # sigma^2 = (9, 1): the first holds 90%
        ([3.0, 1.0], 0.95, 2),
        ([1.0, 1.0, 1.0, 1.0], 0.5, 2),  # exactly half after two
        ([1.0, 1.0, 1.0, 1.0], 0.51, 3),
        ([1.0, 1.0, 1.0, 1.0], 1.0, 4),
        ([2.0, 1.0, 0.0, 0.0], 1.0, 2),  # zero tail: tau = 1 stops at the rank
        ([5.0], 0.01, 1),
        ([0.0, 0.0, 0.0], 0.5, 0),
        ([], 0.5, 0),
    ],
)
def test_energy_rank_on_known_spectra(
    singular_values: list[float], tau: float, expected: int
) -> None:
    assert energy_rank(torch.tensor(singular_values, dtype=torch.float64), tau) == expected


@pytest.mark.parametrize("tau", [0.0, -0.1, 1.5])
def test_energy_rank_rejects_tau_outside_zero_one(tau: float) -> None:
    with pytest.raises(ValueError, match="tau"):
        energy_rank(torch.ones(3), tau)


def max_abs(tensor: torch.Tensor) -> float:
    return float(tensor.abs().max()) if tensor.numel() else 0.0


def assert_orthonormal(basis: torch.Tensor, d_out: int, k: int) -> None:
    assert basis.shape == (d_out, k) and basis.dtype == torch.float64
    identity = torch.eye(k, dtype=torch.float64)
    assert max_abs(basis.T @ basis - identity) < 1e-12


@pytest.mark.parametrize(("d_out", "k"), [(16, 0), (16, 1), (16, 5), (16, 16), (3, 2)])
def test_haar_basis_is_orthonormal_and_reproducible(d_out: int, k: int) -> None:
    basis = haar_basis(d_out, k, torch.Generator().manual_seed(11))
    assert_orthonormal(basis, d_out, k)
    assert torch.equal(basis, haar_basis(d_out, k, torch.Generator().manual_seed(11)))
    if k > 0:
        assert not torch.equal(basis, haar_basis(d_out, k, torch.Generator().manual_seed(12)))


def test_random_singular_basis_picks_the_directions_own_singular_vectors() -> None:
    _, _, direction = random_module(20, 14, 2, seed=4)
    u = torch.linalg.svd(direction, full_matrices=False)[0]  # (20, 14)
    for k in (0, 1, 6, 14):
        basis = random_singular_basis(u, k, torch.Generator().manual_seed(k))
        assert_orthonormal(basis, 20, k)
        # Every column is one of V's singular vectors, none twice.
        matches = (basis.T @ u).abs() > 1 - 1e-12
        assert matches.sum(dim=1).tolist() == [1] * k
        assert len(set(matches.nonzero()[:, 1].tolist())) == k
        assert torch.equal(basis, random_singular_basis(u, k, torch.Generator().manual_seed(k)))
    picks = {
        tuple(random_singular_basis(u, 3, torch.Generator().manual_seed(s))[0].tolist())
        for s in range(8)
    }
    assert len(picks) > 1  # the choice depends on the seed
    with pytest.raises(ValueError, match="k must be"):
        random_singular_basis(u, 15, torch.Generator().manual_seed(0))


def test_top_basis_spans_the_top_singular_vectors() -> None:
    _, _, direction = random_module(20, 14, 2, seed=6)
    u, _, _ = torch.linalg.svd(direction, full_matrices=True)
    for k in (0, 1, 3, 14, 20):  # 20 > min(d_out, d_in) needs the full SVD
        basis = top_basis(direction, k)
        assert_orthonormal(basis, 20, k)
        expected = u[:, :k] @ u[:, :k].T
        assert max_abs(basis @ basis.T - expected) < 1e-10
    # The top-3 basis holds V's three largest singular directions: inside keeps most of V.
    top3 = top_basis(direction, 3)
    kept = torch.linalg.matrix_norm(top3.T @ direction) ** 2
    assert float(kept / torch.linalg.matrix_norm(direction) ** 2) > 0.9


def test_projector_regularizer_sums_modules_times_lambda_and_checks_them() -> None:
    names = [f"layer.{i}.q_proj" for i in range(3)]
    weights = {
        name: tuple(t.detach() for t in lora_pair(16, 12, 2, seed=i))
        for i, name in enumerate(names)
    }
    bases = {
        name: haar_basis(16, 1 + i, torch.Generator().manual_seed(i))
        for i, name in enumerate(names)
    }
    for inside in (False, True):
        regularizer = ProjectorRegularizer(bases, lambda_=0.5, scaling=2.0, inside=inside)
        expected = sum(
            float(naive_projector_penalty(*weights[n], bases[n], scaling=2.0, inside=inside))
            for n in names
        )
        assert abs(float(regularizer(weights)) / (0.5 * expected) - 1) < 1e-10
        assert regularizer.modules == names
    regularizer = ProjectorRegularizer(bases, lambda_=0.5)
    with pytest.raises(ValueError, match="no projector basis"):
        regularizer({"layer.9.q_proj": weights[names[0]]})
    with pytest.raises(ValueError, match="d_out"):
        regularizer({names[0]: (torch.zeros(2, 12), torch.zeros(8, 2))})
    with pytest.raises(ValueError, match="no LoRA modules"):
        regularizer({})
    with pytest.raises(ValueError, match="k <= d_out"):
        ProjectorRegularizer({"wide": torch.zeros(3, 4)}, lambda_=1.0)


def test_l2_regularizer_is_lambda_times_the_update_norm() -> None:
    weights = {
        "a": tuple(t.detach() for t in lora_pair(16, 12, 2, seed=1)),
        "b": tuple(t.detach() for t in lora_pair(8, 12, 3, seed=2)),
    }
    regularizer = l2_regularizer({"a": 16, "b": 8}, lambda_=0.25, scaling=4.0)
    expected = sum(update_norm_sq(a, b, 4.0) for a, b in weights.values())
    value = regularizer(weights)
    assert value.dtype == torch.float64  # float64 weights keep float64 with float32 k = 0 bases
    assert abs(float(value) / (0.25 * expected) - 1) < 1e-12
    with pytest.raises(ValueError, match="d_out"):
        regularizer({"a": weights["b"]})
