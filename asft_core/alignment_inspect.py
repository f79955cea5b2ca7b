"""``python -m asft_core.alignment_inspect``: what a model pair's alignment direction looks like.

Prints, per target module, ||V||_F, sigma_1, the top eigenvalue of C = V V^T / ||V||_F, the
stable rank ||V||_F^2 / sigma_1^2, the number k of singular directions holding ``--tau`` of
||V||_F^2 and the share those k hold; then one sentence on what the AsFT penalty does on this
pair (:func:`asft_core.alignment.regime`). The direction comes from the cache
(:func:`~asft_core.alignment.get_or_compute_alignment`), so with the service's cache folder the
worker's artifact is reused, and a k not stored in it is computed once and kept in a sidecar
(:func:`~asft_core.alignment.alignment_subspaces`).

``asft alignment inspect`` runs this module in a subprocess: the API side never imports torch.

    python -m asft_core.alignment_inspect --base PATH --aligned PATH [--cache-dir DIR]
        [--target-modules q_proj,v_proj] [--tau 0.5] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from asft_core.alignment import (
    DEFAULT_SUBSPACE_ENERGY,
    DEFAULT_TARGET_MODULES,
    AlignmentArtifact,
    AlignmentError,
    alignment_subspaces,
    get_or_compute_alignment,
    regime,
)

# The embedded service's cache folder (ASFT_DATA_DIR=var); `asft alignment inspect` passes the
# configured one.
DEFAULT_CACHE_DIR = Path("var/cache/alignment")


def module_rows(artifact: AlignmentArtifact, tau: float) -> dict[str, dict[str, Any]]:
    """Module name -> its facts, with k and the energy of the top k at ``tau``.

    The subspaces come from their sidecar (computed once): the artifact's own k may have been
    stored at another default tau.
    """
    subspaces = alignment_subspaces(artifact.path, tau)
    rows = {}
    for name in artifact.modules:
        stats = artifact.stats[name]
        k, energy = subspaces[name].k, subspaces[name].energy
        rows[name] = {
            "frobenius_norm": stats.frobenius_norm,
            "sigma_1": stats.sigma_1,
            "top_eigenvalue": stats.top_eigenvalue,
            "stable_rank": stats.stable_rank,
            "k": k,
            "energy_top_k": energy,
        }
    return rows


def format_table(rows: dict[str, dict[str, Any]], tau: float) -> str:
    """The per-module facts as an aligned text table."""
    width = max([len("module"), *(len(name) for name in rows)])
    k_header = f"k@{tau:g}"
    header = (
        f"{'module':<{width}}  {'||V||_F':>10}  {'sigma_1':>10}  {'lambda_1(C)':>11}  "
        f"{'stable_rank':>11}  {k_header:>7}  {'energy(k)':>9}"
    )
    lines = [header, "-" * len(header)]
    for name, row in rows.items():
        lines.append(
            f"{name:<{width}}  {row['frobenius_norm']:>10.4g}  {row['sigma_1']:>10.4g}  "
            f"{row['top_eigenvalue']:>11.4g}  {row['stable_rank']:>11.4g}  "
            f"{row['k']:>7d}  {row['energy_top_k']:>9.1%}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command-line grammar."""
    parser = argparse.ArgumentParser(
        prog="python -m asft_core.alignment_inspect", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--base", required=True, help="base model: local folder or hub id")
    parser.add_argument("--aligned", required=True, help="aligned model: local folder or hub id")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=DEFAULT_CACHE_DIR,
        help=f"alignment cache folder (default {DEFAULT_CACHE_DIR})",
    )
    parser.add_argument(
        "--target-modules",
        default=",".join(DEFAULT_TARGET_MODULES),
        help="comma-separated module names (default %(default)s)",
    )
    parser.add_argument(
        "--tau",
        type=float,
        default=DEFAULT_SUBSPACE_ENERGY,
        help="share of ||V||_F^2 the top k directions hold (default %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Print the table (or JSON) and the regime sentence; 1 when the pair cannot be read."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0.0 < args.tau <= 1.0:
        parser.error(f"--tau must be in (0, 1], got {args.tau}")
    target_modules = tuple(m.strip() for m in args.target_modules.split(",") if m.strip())
    try:
        artifact = get_or_compute_alignment(
            args.base, args.aligned, args.cache_dir, target_modules=target_modules
        )
        rows = module_rows(artifact, args.tau)
    except AlignmentError as error:
        print(f"asft alignment inspect: {error} ({error.code})", file=sys.stderr)
        return 1
    sentence = regime(artifact)
    if args.json:
        report = {
            "artifact": str(artifact.path),
            "base_model": artifact.base_model,
            "aligned_model": artifact.aligned_model,
            "tau": args.tau,
            "max_top_eigenvalue": artifact.max_top_eigenvalue,
            "degenerate": artifact.degenerate,
            "regime": sentence,
            "modules": rows,
        }
        print(json.dumps(report, indent=2))
        return 0
    print(f"alignment direction {artifact.path}")
    print(f"  base {artifact.base_model}\n  aligned {artifact.aligned_model}\n")
    print(format_table(rows, args.tau))
    print()
    print(sentence)
    return 0


if __name__ == "__main__":
    sys.exit(main())
