"""The AsFT penalty: lambda * sum over LoRA modules of ||(I - C) B A||_F^2.

For one module with alignment direction V (d_out, d_in), C = V V^T / ||V||_F (d_out, d_out),
as in the paper's released code (divided by the Frobenius norm, not its square). The LoRA
update is B A with A: (r, d_in) and B: (d_out, r).

C is never formed. With X = (I - C) B = B - V (V^T B) / ||V||_F, a (d_out, r) matrix,

    ||X A||_F^2 = trace(A^T X^T X A) = sum((X^T X) * (A A^T)),

which costs two (d x d x r) products per module instead of a d^3 one and d^2 memory.
Everything is computed in float32 at least (float64 inputs stay float64, for the tests).

The study's controls are projector penalties: with U (d_out, k) orthonormal columns,
||(I - U U^T) B A||_F^2 ("outside": only the part of the update outside span U is paid for)
or ||U U^T B A||_F^2 ("inside"). With k = 0, "outside" is plain L2 on the update. The bases
come from the alignment direction's top singular vectors, from random ones among its
singular vectors, or from Haar-random subspaces (``top_basis``, ``random_singular_basis``,
``haar_basis``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import TypeVar

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from asft_core.spec import DIRECTION_STORAGES, DirectionStorage


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def asft_penalty(
    lora_A: Tensor,
    lora_B: Tensor,
    direction: Tensor,
    direction_norm: Tensor | float | None = None,
    scaling: float = 1.0,
) -> Tensor:
    """||(I - C) (scaling * B A)||_F^2 for one module, without a d x d matrix.

    Args:
        lora_A: (r, d_in).
        lora_B: (d_out, r).
        direction: V, (d_out, d_in).
        direction_norm: ||V||_F if already known (saves a pass over V each step).
        scaling: multiplies B A (1.0 is the reference; lora_alpha / r is the option).

    Returns:
        A scalar tensor, differentiable with respect to A and B.
    """
    dtype = _compute_dtype(lora_A, lora_B, direction)
    a, b, v = lora_A.to(dtype), lora_B.to(dtype), direction.to(dtype)
    norm = torch.linalg.matrix_norm(v) if direction_norm is None else direction_norm
    # Work with rows (B^T: (r, d_out)): "row block times V" reads V in its storage order, which
    # is several times faster on CPUs than "V^T times column block", forward and backward.
    b_rows = b.T
    x_rows = b_rows - (b_rows @ v) @ v.T / norm  # X^T = B^T - (B^T V) V^T / ||V||_F
    return (x_rows @ x_rows.T * (a @ a.T)).sum() * scaling**2


def naive_asft_penalty(lora_A: Tensor, lora_B: Tensor, direction: Tensor) -> Tensor:
    """The reference formula with C materialised: for tests and benchmarks only.

    Costs d_out^2 memory and a (d_out x d_out x d_in) product.
    """
    dtype = _compute_dtype(lora_A, lora_B, direction)
    a, b, v = lora_A.to(dtype), lora_B.to(dtype), direction.to(dtype)
    c = v @ v.T / torch.linalg.matrix_norm(v)
    identity = torch.eye(c.shape[0], dtype=dtype, device=c.device)
    return torch.linalg.matrix_norm((identity - c) @ (b @ a)) ** 2


@dataclass(frozen=True)
class LowRankDirection:
    """The top-k eigenpairs of C = V V^T / ||V||_F, standing in for V.

    C is symmetric positive semi-definite with eigenvectors the left singular vectors u_i of
    V and eigenvalues lam_i = sigma_i^2 / ||V||_F. Keeping k of them, C_k = U_k diag(lam) U_k^T
    and ||C - C_k||_2 = lam_{k+1} (``spectral_error``).

    Penalty error bound, with M = B A: write P = (I - C) M and P_k = (I - C_k) M, so
    P_k - P = (C - C_k) M and ||P_k - P||_F <= lam_{k+1} ||M||_F. Then
    | ||P_k||^2 - ||P||^2 | = |<P_k - P, P_k + P>| <= ||P_k - P||_F (||P_k||_F + ||P||_F)
    <= lam_{k+1} ||M||_F * (2 ||P||_F + lam_{k+1} ||M||_F), and ||P||_F <= (1 + lam_1) ||M||_F
    since ||I - C||_2 <= max(1, lam_1 - 1) <= 1 + lam_1. So the error is at most
    ``relative_bound * ||M||_F^2`` with relative_bound = lam_{k+1} (2 (1 + lam_1) + lam_{k+1}).

    Attributes:
        basis: U_k, (d_out, k), orthonormal columns.
        eigenvalues: lam_1..lam_k, (k,), descending.
        spectral_error: lam_{k+1} (0 when k reaches the rank of V).
        top_eigenvalue: lam_1.
    """

    basis: Tensor
    eigenvalues: Tensor
    spectral_error: float
    top_eigenvalue: float

    @property
    def relative_bound(self) -> float:
        """|penalty_k - penalty| <= relative_bound * ||B A||_F^2 (see the class docstring)."""
        tail = self.spectral_error
        return tail * (2.0 * (1.0 + self.top_eigenvalue) + tail)


def low_rank_direction(direction: Tensor, k: int) -> LowRankDirection:
    """Keep the top-``k`` eigenpairs of C for ``direction`` V: (d_out, d_in).

    Uses an exact SVD (in float64 for float64 input, else float32); it runs once per module
    when training starts, not per step.
    """
    dtype = _compute_dtype(direction)
    v = direction.to(dtype)
    norm = torch.linalg.matrix_norm(v)
    u, singular_values, _ = torch.linalg.svd(v, full_matrices=False)
    eigenvalues = singular_values**2 / norm
    k = min(k, eigenvalues.numel())
    tail = float(eigenvalues[k]) if k < eigenvalues.numel() else 0.0
    return LowRankDirection(
        basis=u[:, :k].contiguous(),
        eigenvalues=eigenvalues[:k].contiguous(),
        spectral_error=tail,
        top_eigenvalue=float(eigenvalues[0]),
    )


def asft_penalty_low_rank(
    lora_A: Tensor, lora_B: Tensor, low_rank: LowRankDirection, scaling: float = 1.0
) -> Tensor:
    """||(I - C_k) (scaling * B A)||_F^2 with C_k from :func:`low_rank_direction`.

    Costs (d_out x k x r) per step instead of (d_out x d_in x r).
    """
    dtype = _compute_dtype(lora_A, lora_B, low_rank.basis)
    a, b = lora_A.to(dtype), lora_B.to(dtype)
    basis = low_rank.basis.to(dtype)
    b_rows = b.T
    x_rows = b_rows - (b_rows @ basis) * low_rank.eigenvalues.to(dtype) @ basis.T
    return (x_rows @ x_rows.T * (a @ a.T)).sum() * scaling**2


Call = TypeVar("Call", bound=Callable[..., Tensor])


def outside_autocast(call: Call) -> Call:
    """Run ``call`` with autocast off: an outer ``torch.autocast`` would run the penalty's
    products in bf16 or fp16 and undo its fp32 casts."""

    @functools.wraps(call)
    def without_autocast(*args: object, **kwargs: object) -> Tensor:
        with ExitStack() as stack:
            for device_type in ("cpu", "cuda"):
                if torch.is_autocast_enabled(device_type):
                    stack.enter_context(torch.autocast(device_type, enabled=False))
            return call(*args, **kwargs)

    return without_autocast  # type: ignore[return-value]


class AsftRegularizer:
    """lambda * sum over modules of the AsFT penalty, ready to add to the task loss.

    Directions are moved to the device and cast once, and ||V||_F is computed once, so a
    training step only does the two skinny products per module. With ``low_rank`` set, each
    V is replaced by the top-k eigenpairs of its C, which also saves memory on large models;
    a module given as a :class:`LowRankDirection` already is (read from the artifact's
    stored spectrum), so its V never exists here.

    ``storage`` says where an exact V is kept (``DirectionStorage``): ``fp32`` on the device;
    ``bf16`` on the device in bf16; ``host`` where it was given (the host), copied to the
    device for each use. For the last two the fp32 device copy is made inside a checkpoint,
    so autograd keeps none of them: one module's copy exists at a time, remade in backward.
    """

    def __init__(
        self,
        directions: Mapping[str, Tensor | LowRankDirection],
        lambda_: float = 1.0,
        scaling: float = 1.0,
        low_rank: int | None = None,
        device: torch.device | str | None = None,
        storage: DirectionStorage = "fp32",
    ) -> None:
        """Prepare per-module state. ``directions`` maps module name -> V: (d_out, d_in), or
        to its low-rank factors."""
        if storage not in DIRECTION_STORAGES:
            raise ValueError(f"storage must be one of {DIRECTION_STORAGES}, got {storage!r}")
        self.lambda_ = lambda_
        self.scaling = scaling
        self.storage = storage
        self._device = torch.device(device) if device is not None else None
        self._exact: dict[str, tuple[Tensor, Tensor]] = {}
        self._low_rank: dict[str, LowRankDirection] = {}
        for name, direction in directions.items():
            if isinstance(direction, LowRankDirection):
                factors = direction
            elif low_rank is None:
                self._exact[name] = self._keep(direction)
                continue
            else:
                # Factored where V is (the host, for training), so V never reaches the device.
                factors = low_rank_direction(direction, low_rank)
            target = device or factors.basis.device
            self._low_rank[name] = replace(
                factors,
                basis=factors.basis.to(target),
                eigenvalues=factors.eigenvalues.to(target),
            )

    def _keep(self, direction: Tensor) -> tuple[Tensor, Tensor]:
        """V as ``storage`` keeps it, and ||V||_F (on the training device)."""
        target = self._device or direction.device
        dtype = _compute_dtype(direction)
        norm = torch.linalg.matrix_norm(direction.to(dtype)).to(target)
        if self.storage == "fp32":
            return direction.to(device=target, dtype=dtype), norm
        if self.storage == "bf16":
            return direction.to(device=target, dtype=torch.bfloat16), norm
        kept = direction.to(dtype)
        if target.type == "cuda" and not kept.is_pinned():
            kept = kept.pin_memory()  # page-locked: the per-step copies run at full speed
        return kept, norm

    @property
    def modules(self) -> list[str]:
        """Module names this regularizer has a direction for."""
        return [*self._exact, *self._low_rank]

    @property
    def low_rank_bounds(self) -> dict[str, float]:
        """Per module: the bound on |approximate - exact| relative to ||B A||_F^2."""
        return {name: lr.relative_bound * self.scaling**2 for name, lr in self._low_rank.items()}

    @outside_autocast
    def __call__(self, lora_weights: Mapping[str, tuple[Tensor, Tensor]]) -> Tensor:
        """Sum the penalty over ``lora_weights`` (module name -> (A: (r, d_in), B: (d_out, r)))."""
        if not lora_weights:
            raise ValueError("no LoRA modules were given to the AsFT penalty")
        terms = []
        for name, (lora_A, lora_B) in lora_weights.items():
            if name in self._exact:
                v, norm = self._exact[name]
                if v.shape != (lora_B.shape[0], lora_A.shape[1]):
                    raise ValueError(
                        f"{name}: alignment direction has shape {tuple(v.shape)} but the LoRA "
                        f"update is {lora_B.shape[0]} x {lora_A.shape[1]}"
                    )
                if self.storage == "fp32":
                    terms.append(asft_penalty(lora_A, lora_B, v, norm, self.scaling))
                else:
                    terms.append(
                        checkpoint(
                            _penalty_from_stored,
                            lora_A,
                            lora_B,
                            v,
                            norm,
                            self.scaling,
                            use_reentrant=False,
                        )
                    )
            elif name in self._low_rank:
                low_rank = self._low_rank[name]
                if low_rank.basis.shape[0] != lora_B.shape[0]:
                    raise ValueError(f"{name}: alignment direction does not fit the LoRA update")
                terms.append(asft_penalty_low_rank(lora_A, lora_B, low_rank, self.scaling))
            else:
                raise ValueError(f"no alignment direction for LoRA module {name!r}")
        return self.lambda_ * torch.stack(terms).sum()


def _penalty_from_stored(
    lora_A: Tensor, lora_B: Tensor, stored: Tensor, norm: Tensor, scaling: float
) -> Tensor:
    """The exact penalty from a V kept in bf16 or on the host: an fp32 copy on A's device."""
    v = stored.to(device=lora_A.device, dtype=_compute_dtype(stored), non_blocking=True)
    return asft_penalty(lora_A, lora_B, v, norm, scaling)


def projector_penalty(
    lora_A: Tensor,
    lora_B: Tensor,
    basis: Tensor,
    scaling: float = 1.0,
    inside: bool = False,
) -> Tensor:
    """||(I - U U^T) dW||_F^2 (or ||U U^T dW||_F^2 with ``inside``), dW = scaling * B A.

    Never forms a d x d matrix: with G = A A^T (r, r) and X = (I - U U^T) B = B - U (U^T B)
    (d_out, r), the outside penalty is sum((X^T X) * G) and the inside one is
    sum(((U^T B)^T (U^T B)) * G), O(d r k + d r^2) per module. The outside residual X is
    formed rather than B^T B - (U^T B)^T (U^T B): same cost, but the difference of the two
    Gram matrices cancels when span U holds most of B (at k = d_out it came out negative,
    about -1e-12 ||dW||^2, where the residual form gives 1e-26, like the materialised one).

    Args:
        lora_A: (r, d_in).
        lora_B: (d_out, r).
        basis: U, (d_out, k) with orthonormal columns; k may be 0 (then outside is plain L2
            ||dW||_F^2 and inside is 0).
        scaling: multiplies B A.
        inside: penalise the part of the update inside span U instead of outside it.

    Returns:
        A scalar tensor in float32 at least (float64 if any input is), differentiable with
        respect to A and B.
    """
    dtype = _compute_dtype(lora_A, lora_B, basis)
    a, b, u = lora_A.to(dtype), lora_B.to(dtype), basis.to(dtype)
    coefficients = u.T @ b  # (k, r): B in the basis U
    if inside:
        gram_b = coefficients.T @ coefficients
    else:
        residual = b - u @ coefficients  # (d_out, r)
        gram_b = residual.T @ residual
    return (gram_b * (a @ a.T)).sum() * scaling**2


def naive_projector_penalty(
    lora_A: Tensor,
    lora_B: Tensor,
    basis: Tensor,
    scaling: float = 1.0,
    inside: bool = False,
) -> Tensor:
    """:func:`projector_penalty` with the (d_out, d_out) projector materialised.

    For tests and benchmarks only: d_out^2 memory and a (d_out x d_out x d_in) product.
    """
    dtype = _compute_dtype(lora_A, lora_B, basis)
    a, b, u = lora_A.to(dtype), lora_B.to(dtype), basis.to(dtype)
    projector = u @ u.T
    if not inside:
        projector = torch.eye(projector.shape[0], dtype=dtype, device=projector.device) - projector
    return torch.linalg.matrix_norm(projector @ (scaling * b @ a)) ** 2


def energy_rank(singular_values: Tensor, tau: float) -> int:
    """The smallest k >= 1 with sum_{i<k} sigma_i^2 >= tau * sum_i sigma_i^2.

    Args:
        singular_values: (m,), descending (as ``torch.linalg.svdvals`` returns them).
        tau: the share of the energy to hold, in (0, 1].

    Returns:
        k, or 0 for an all-zero (or empty) spectrum.
    """
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    if singular_values.ndim != 1:
        raise ValueError(f"singular_values must be 1-D, got shape {tuple(singular_values.shape)}")
    cumulative = torch.cumsum(singular_values.detach().double() ** 2, dim=0)
    if cumulative.numel() == 0 or float(cumulative[-1]) == 0.0:
        return 0
    # The total is the last cumulative sum (not a separate sum), so tau = 1 reaches it exactly.
    target = tau * cumulative[-1]
    return int(torch.searchsorted(cumulative, target.reshape(1)).item()) + 1


def haar_basis(d_out: int, k: int, generator: torch.Generator) -> Tensor:
    """A Haar-random k-dimensional subspace of R^d_out: U (d_out, k), float64, orthonormal.

    QR of a Gaussian matrix, with each column's sign fixed by R's diagonal so the result is
    exactly Haar distributed and depends on the generator alone.
    """
    if not 0 <= k <= d_out:
        raise ValueError(f"k must be in [0, {d_out}], got {k}")
    gaussian = torch.randn(d_out, k, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return q * signs


def random_singular_basis(
    left_singular_vectors: Tensor, k: int, generator: torch.Generator
) -> Tensor:
    """k of V's own left singular vectors, chosen uniformly at random (any of the m).

    Args:
        left_singular_vectors: (d_out, m), orthonormal columns (all of V's, or its top m).
        k: how many to keep, 0 <= k <= m.

    Returns:
        (d_out, k) float64, the chosen columns in their original order.
    """
    m = left_singular_vectors.shape[1]
    if not 0 <= k <= m:
        raise ValueError(f"k must be in [0, {m}], got {k}")
    chosen = torch.randperm(m, generator=generator)[:k].sort().values
    return left_singular_vectors[:, chosen.to(left_singular_vectors.device)].double()


def top_basis(direction: Tensor, k: int) -> Tensor:
    """The top-k left singular vectors of ``direction`` V: (d_out, d_in) -> (d_out, k) float64.

    Exact SVD in float64; k may exceed min(d_out, d_in) (up to d_out), in which case the
    complement comes from the full SVD.
    """
    d_out = direction.shape[0]
    if not 0 <= k <= d_out:
        raise ValueError(f"k must be in [0, {d_out}], got {k}")
    full = k > min(direction.shape)
    u, _, _ = torch.linalg.svd(direction.double(), full_matrices=full)
    return u[:, :k].contiguous()


class ProjectorRegularizer:
    """lambda * sum over modules of :func:`projector_penalty`, ready to add to the task loss.

    ``bases`` maps module name -> U: (d_out, k). A basis is moved to the device once and cast
    per step to the weights' compute dtype (float32 at least; float64 for float64 weights),
    which costs O(d_out k), nothing next to the penalty itself. Plain L2 is this class with
    k = 0 bases: see :func:`l2_regularizer`.
    """

    def __init__(
        self,
        bases: Mapping[str, Tensor],
        lambda_: float,
        scaling: float = 1.0,
        inside: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        """Check and store the bases (each 2-D with k <= d_out)."""
        self.lambda_ = lambda_
        self.scaling = scaling
        self.inside = inside
        self._bases: dict[str, Tensor] = {}
        for name, basis in bases.items():
            if basis.ndim != 2 or basis.shape[1] > basis.shape[0]:
                raise ValueError(
                    f"{name}: a basis must be (d_out, k) with k <= d_out, got {tuple(basis.shape)}"
                )
            self._bases[name] = basis.to(device=device or basis.device)

    @property
    def modules(self) -> list[str]:
        """Module names this regularizer has a basis for."""
        return list(self._bases)

    @outside_autocast
    def __call__(self, lora_weights: Mapping[str, tuple[Tensor, Tensor]]) -> Tensor:
        """Sum the penalty over ``lora_weights`` (module name -> (A: (r, d_in), B: (d_out, r)))."""
        if not lora_weights:
            raise ValueError("no LoRA modules were given to the projector penalty")
        terms = []
        for name, (lora_A, lora_B) in lora_weights.items():
            if name not in self._bases:
                raise ValueError(f"no projector basis for LoRA module {name!r}")
            basis = self._bases[name]
            if basis.shape[0] != lora_B.shape[0]:
                raise ValueError(
                    f"{name}: the basis has d_out = {basis.shape[0]} but the LoRA update has "
                    f"{lora_B.shape[0]} rows"
                )
            basis = basis.to(_compute_dtype(lora_A, lora_B))
            terms.append(projector_penalty(lora_A, lora_B, basis, self.scaling, self.inside))
        return self.lambda_ * torch.stack(terms).sum()


def l2_regularizer(
    module_names_to_d_out: Mapping[str, int],
    lambda_: float,
    scaling: float = 1.0,
    device: torch.device | str | None = None,
) -> ProjectorRegularizer:
    """lambda * sum over modules of ||scaling * B A||_F^2: a projector penalty with k = 0."""
    bases = {
        name: torch.zeros(d_out, 0, dtype=torch.float32)
        for name, d_out in module_names_to_d_out.items()
    }
    return ProjectorRegularizer(bases, lambda_, scaling, inside=False, device=device)
