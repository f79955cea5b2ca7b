"""Fine-tuning methods and their defaults, in one place; stdlib only (the API and CLI use it).

Lambdas of ``asft_projector`` and ``l2`` weigh the effective update dW = (alpha / r) B A;
``asft`` keeps the reference code's lambda on the unscaled B A (the paper's 1).
"""

from __future__ import annotations

from typing import Literal, get_args

Method = Literal["supervised", "asft", "asft_projector", "l2", "safelora", "asft+safelora"]
METHODS: tuple[str, ...] = get_args(Method)
# The method a job gets when it names none: the frontier study's decision (README).
DEFAULT_METHOD: Method = "l2"
# Lambda when a job gives none: l2's is the frontier study's decision (README), the others the
# paper's 1.
DEFAULT_LAMBDA: dict[str, float] = {"asft": 1.0, "asft_projector": 1.0, "l2": 0.1}
# The share of ||V||_F^2 that asft_projector's free subspace holds per module (the frontier
# study's registered value).
DEFAULT_SUBSPACE_ENERGY = 0.8
