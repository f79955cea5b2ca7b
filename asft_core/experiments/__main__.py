"""``python -m asft_core.experiments``: run the miniature reproduction and save its table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from asft_core.experiments import MiniatureConfig, format_table, run_grid, save_table


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run the grid, print and save the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="full", help="full (default), ci or test")
    parser.add_argument("--data-dir", type=Path, default=Path("var"))
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: <data-dir>/cache")
    parser.add_argument("--out", type=Path, default=None, help="default: <data-dir>/miniature")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting for investigation (JSON value), e.g. --set lambda=10",
    )
    args = parser.parse_args(argv)

    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    config = MiniatureConfig.load(args.profile, overrides)
    name = config.profile + ("-" + "-".join(config.overrides) if config.overrides else "")
    out = args.out or args.data_dir / "miniature" / name
    table = run_grid(config, args.cache_dir or args.data_dir / "cache", out / "runs")
    print()
    print(format_table(table))
    for path in save_table(table, out):
        print(f"wrote {path}")
    print(f"{table.seconds:.0f}s in all")


if __name__ == "__main__":
    main()
