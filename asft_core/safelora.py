"""Safe LoRA (Hsu et al., 2024): a post-hoc projection baseline.

For each LoRA module, compare the update B A with its projection C B A onto the alignment
subspace, C = V V^T / ||V||_F. Modules whose cosine similarity
cos(vec(C B A), vec(B A)) is low have drifted away from alignment; for them B is replaced by
C B. Modules are chosen by a similarity threshold or as the N least similar, the two modes of
the Safe LoRA paper. C B is computed as V (V^T B) / ||V||_F, never forming C.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


@dataclass
class SafeLoraResult:
    """What the projection did.

    Attributes:
        lora_B: module name -> the B to use afterwards, (d_out, r); a new tensor where
            projected, the input tensor otherwise.
        projected: names of projected modules, least similar first.
        similarities: module name -> cos(vec(C B A), vec(B A)) before projection.
    """

    lora_B: dict[str, Tensor]
    projected: list[str]
    similarities: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready report (no tensors)."""
        return {"projected": list(self.projected), "similarities": dict(self.similarities)}


def project_onto_alignment(lora_B: Tensor, direction: Tensor) -> Tensor:
    """C B = V (V^T B) / ||V||_F. B: (d_out, r), V: (d_out, d_in) -> (d_out, r)."""
    return direction @ (direction.T @ lora_B) / torch.linalg.matrix_norm(direction)


def alignment_similarity(lora_A: Tensor, lora_B: Tensor, direction: Tensor) -> float:
    """cos(vec(C B A), vec(B A)), via r x r Gram matrices: no d x d matrix is formed.

    With P = C B: <P A, B A> = sum((P^T B) * (A A^T)) and ||M A||^2 = sum((M^T M) * (A A^T)).
    A zero update has similarity 1.0: there is nothing to project, so it is never chosen.
    """
    a, b, v = lora_A.double(), lora_B.double(), direction.double()
    projected = project_onto_alignment(b, v)
    gram_a = a @ a.T
    inner = float((projected.T @ b * gram_a).sum())
    norm_update = float((b.T @ b * gram_a).sum()) ** 0.5
    norm_projected = float((projected.T @ projected * gram_a).sum().clamp_min(0)) ** 0.5
    if norm_update == 0.0 or norm_projected == 0.0:
        return 1.0 if norm_update == 0.0 else 0.0
    return inner / (norm_update * norm_projected)


def safelora_project(
    lora_weights: Mapping[str, tuple[Tensor, Tensor]],
    directions: Mapping[str, Tensor],
    threshold: float | None = None,
    num_modules: int | None = None,
) -> SafeLoraResult:
    """Project the B of the modules least similar to their alignment projection.

    Args:
        lora_weights: module name -> (A: (r, d_in), B: (d_out, r)); not modified.
        directions: module name -> V: (d_out, d_in).
        threshold: project every module whose similarity is below this.
        num_modules: or project the ``num_modules`` least similar modules.

    Exactly one of ``threshold`` and ``num_modules`` must be given.
    """
    if (threshold is None) == (num_modules is None):
        raise ValueError("give exactly one of threshold or num_modules")
    if num_modules is not None and num_modules < 0:
        raise ValueError("num_modules must be >= 0")
    missing = sorted(set(lora_weights) - set(directions))
    if missing:
        raise ValueError(f"no alignment direction for modules: {', '.join(missing)}")
    similarities = {
        name: alignment_similarity(a, b, directions[name]) for name, (a, b) in lora_weights.items()
    }
    ranked = sorted(similarities, key=lambda name: similarities[name])
    if threshold is not None:
        chosen = [name for name in ranked if similarities[name] < threshold]
    else:
        chosen = ranked[:num_modules]
    new_b: dict[str, Tensor] = {name: b for name, (_, b) in lora_weights.items()}
    for name in chosen:
        b = lora_weights[name][1]
        v = directions[name].to(device=b.device, dtype=torch.promote_types(b.dtype, torch.float32))
        new_b[name] = project_onto_alignment(b.to(v.dtype), v).to(b.dtype)
    return SafeLoraResult(lora_B=new_b, projected=chosen, similarities=similarities)


ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


@torch.no_grad()
def project_adapter(
    adapter_dir: Path,
    alignment_path: Path,
    threshold: float | None = None,
    num_modules: int | None = None,
) -> dict[str, Any]:
    """Safe LoRA on a saved PEFT adapter: rewrite its file with the projected B; the report.

    Module names are the adapter's keys without PEFT's prefix, as in the alignment artifact.
    The file is replaced atomically.
    """
    from safetensors.torch import load_file, save_file

    from asft_core.alignment import DirectionReader

    path = adapter_dir / ADAPTER_WEIGHTS
    tensors = load_file(path)
    names = sorted(
        key.removeprefix(_PEFT_PREFIX).removesuffix(".lora_A.weight")
        for key in tensors
        if key.endswith(".lora_A.weight")
    )

    def key(name: str, matrix: str) -> str:
        return f"{_PEFT_PREFIX}{name}.lora_{matrix}.weight"

    pairs = {
        name: (tensors[key(name, "A")].float(), tensors[key(name, "B")].float()) for name in names
    }
    # Read one V at a time, when its module is measured or projected, never all at once.
    directions = DirectionReader(alignment_path, modules=names)
    result = safelora_project(pairs, directions, threshold=threshold, num_modules=num_modules)
    for name in result.projected:
        original = tensors[key(name, "B")]
        tensors[key(name, "B")] = result.lora_B[name].to(original.dtype).contiguous()
    staging = path.with_name(f".{path.name}.tmp")
    save_file(tensors, staging, metadata={"format": "pt"})
    os.replace(staging, path)
    return result.to_dict()
