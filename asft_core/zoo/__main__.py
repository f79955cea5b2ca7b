"""``python -m asft_core.zoo --cache-dir DIR``: build (or reuse) the tiny zoo; print its paths.

Prints one JSON object (root, base, aligned, eval_suite, datasets) on stdout, so tools that
must not import torch themselves (the API's demo, the CLI) can build the zoo in a subprocess;
a build says its stage and step on stderr (``--quiet``: nothing).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from asft_core.zoo import build_zoo


def main(argv: list[str] | None = None) -> None:
    """Build and print."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache-dir", type=Path, default=Path("var/cache"))
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    zoo = build_zoo(args.cache_dir / "zoo", verbose=not args.quiet)
    print(
        json.dumps(
            {
                "root": str(zoo.root.resolve()),
                "base": str(zoo.base.resolve()),
                "aligned": str(zoo.aligned.resolve()),
                "eval_suite": str(zoo.eval_suite.resolve()),
                "datasets": str(zoo.datasets.resolve()),
            }
        )
    )


if __name__ == "__main__":
    main()
