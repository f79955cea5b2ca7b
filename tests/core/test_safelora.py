"""Safe LoRA projection: the math on small matrices and both selection modes."""

from __future__ import annotations

import pytest
import torch

from asft_core.safelora import alignment_similarity, project_onto_alignment, safelora_project


def modules(count: int, seed: int = 0) -> tuple[dict, dict]:
    generator = torch.Generator().manual_seed(seed)
    weights, directions = {}, {}
    for index in range(count):
        name = f"model.layers.{index}.self_attn.v_proj"
        directions[name] = torch.randn(12, 10, generator=generator, dtype=torch.float64)
        weights[name] = (
            torch.randn(3, 10, generator=generator, dtype=torch.float64),
            torch.randn(12, 3, generator=generator, dtype=torch.float64),
        )
    return weights, directions


def naive_similarity(a: torch.Tensor, b: torch.Tensor, v: torch.Tensor) -> float:
    c = v @ v.T / torch.linalg.matrix_norm(v)
    update = (b @ a).flatten()
    projected = (c @ b @ a).flatten()
    return float(torch.nn.functional.cosine_similarity(projected, update, dim=0))


def test_projection_and_similarity_match_the_materialised_formulas() -> None:
    weights, directions = modules(1)
    ((name, (a, b)),) = weights.items()
    v = directions[name]
    c = v @ v.T / torch.linalg.matrix_norm(v)
    assert torch.allclose(project_onto_alignment(b, v), c @ b, rtol=1e-12, atol=1e-12)
    assert abs(alignment_similarity(a, b, v) - naive_similarity(a, b, v)) < 1e-10


def test_threshold_mode_projects_exactly_the_modules_below_it() -> None:
    weights, directions = modules(6)
    similarities = {n: naive_similarity(*weights[n], directions[n]) for n in weights}
    ordered = sorted(similarities.values())
    threshold = (ordered[2] + ordered[3]) / 2  # between the 3rd and 4th: 3 modules below
    result = safelora_project(weights, directions, threshold=threshold)
    assert sorted(result.projected) == sorted(n for n, s in similarities.items() if s < threshold)
    assert len(result.projected) == 3
    for name, (_, b) in weights.items():
        if name in result.projected:
            v = directions[name]
            expected = v @ v.T @ b / torch.linalg.matrix_norm(v)
            assert torch.allclose(result.lora_B[name], expected, rtol=1e-12, atol=1e-12)
        else:
            assert result.lora_B[name] is b
        assert abs(result.similarities[name] - similarities[name]) < 1e-10


def test_count_mode_projects_the_least_similar_and_leaves_inputs_alone() -> None:
    weights, directions = modules(5, seed=4)
    before = {n: (a.clone(), b.clone()) for n, (a, b) in weights.items()}
    result = safelora_project(weights, directions, num_modules=2)
    ranked = sorted(weights, key=lambda n: naive_similarity(*weights[n], directions[n]))
    assert result.projected == ranked[:2]
    for name, (a, b) in weights.items():
        assert torch.equal(a, before[name][0]) and torch.equal(b, before[name][1])
    assert result.to_dict()["projected"] == ranked[:2]


def test_zero_update_is_never_projected_and_modes_are_exclusive() -> None:
    weights, directions = modules(2)
    name = next(iter(weights))
    weights[name] = (weights[name][0], torch.zeros(12, 3, dtype=torch.float64))
    result = safelora_project(weights, directions, threshold=0.99)
    assert result.similarities[name] == 1.0 and name not in result.projected
    with pytest.raises(ValueError, match="exactly one"):
        safelora_project(weights, directions)
    with pytest.raises(ValueError, match="exactly one"):
        safelora_project(weights, directions, threshold=0.5, num_modules=1)
    with pytest.raises(ValueError, match="no alignment direction"):
        safelora_project(weights, {}, threshold=0.5)
