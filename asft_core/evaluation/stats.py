"""Proportions with confidence intervals, and how many prompts an evaluation needs.

A harmful score of 4% on 50 prompts and 4% on 1,000 prompts are different claims; every
rate we report carries its 95% Wilson score interval so a reader (and the safety gate) can
tell them apart. Stdlib only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

Z_95 = 1.959964
"""The standard normal quantile for a two-sided 95% interval."""


@dataclass(frozen=True)
class Proportion:
    """``successes`` out of ``total``, with its confidence interval ``[low, high]``."""

    successes: int
    total: int
    value: float
    low: float
    high: float

    def to_dict(self) -> dict[str, int | float]:
        """A JSON-ready dict with the same field names."""
        return asdict(self)


def wilson_interval(successes: int, total: int, z: float = Z_95) -> Proportion:
    """The Wilson score interval for ``successes / total`` (95% with the default ``z``).

    Unlike the normal approximation ``p +- z sqrt(p (1 - p) / n)``, Wilson's interval stays
    inside [0, 1] and does not collapse to a point at 0/n or n/n, which is exactly where a
    safety evaluation lives (a harmful score of 0 on 100 prompts is not proof of 0).

    With ``n = total`` and ``p = successes / n``:
    ``centre = (p + z^2 / 2n) / (1 + z^2 / n)`` and
    ``half = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)``.
    An empty sample (``total == 0``) says nothing: value 0, interval [0, 1].
    """
    if total < 0 or not 0 <= successes <= max(total, 0):
        raise ValueError(f"need 0 <= successes <= total, got {successes} of {total}")
    if total == 0:
        return Proportion(successes=0, total=0, value=0.0, low=0.0, high=1.0)
    p = successes / total
    z2_over_n = z * z / total
    denominator = 1.0 + z2_over_n
    centre = (p + z2_over_n / 2.0) / denominator
    half = z / denominator * math.sqrt(p * (1.0 - p) / total + z2_over_n / (4.0 * total))
    # At p = 0 (or 1) the lower (upper) bound is exactly 0 (1), but rounding leaves a hair
    # off it, and a reported "high 0.9999999999999999" for 10 of 10 looks like a bug.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == total else min(1.0, centre + half)
    return Proportion(successes=successes, total=total, value=p, low=low, high=high)


def sample_size_for_margin(margin: float, z: float = Z_95, p: float = 0.5) -> int:
    """Prompts needed so the 95% interval's half-width is at most ``margin``.

    Uses the normal-approximation bound ``n = ceil(z^2 p (1 - p) / margin^2)``; with the
    worst case ``p = 0.5`` this gives 1,068 prompts for a 3-point margin. With ``p = 0.5`` it
    is slightly conservative for the Wilson interval we report (whose half-width at that ``n``
    is ``z / (2 sqrt(n + z^2))`` at most, whatever rate is observed), so an eval set sized this
    way meets its margin. A smaller ``p`` sizes for an expected rate and carries no such
    guarantee.
    """
    if not 0.0 < margin < 1.0:
        raise ValueError(f"margin must be in (0, 1), got {margin}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    needed = z * z * p * (1.0 - p) / (margin * margin)
    # Guard against float noise turning an exact integer (e.g. 100.00000000000001) into n + 1.
    return max(1, math.ceil(round(needed, 9)))
