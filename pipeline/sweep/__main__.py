"""`python -m pipeline.sweep <sweep dir> [--no-report]` and `python -m pipeline.sweep --estimate`."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from pipeline.sweep.callback import summarize
from pipeline.sweep.estimate import estimate_table, print_estimates


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.sweep",
        description="Collect a Hydra multirun's results into one summary, compare models, build the report.",
    )
    parser.add_argument("sweep_dir", nargs="?", type=Path, help="a Hydra multirun directory")
    parser.add_argument("--no-report", action="store_true", help="write the summary only")
    parser.add_argument(
        "--estimate",
        action="store_true",
        help="print disk and GPU-time estimates for the full_sweep sizes and exit",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.estimate:
        print_estimates(estimate_table())
        return
    if args.sweep_dir is None or not args.sweep_dir.is_dir():
        parser.error("give a sweep directory (e.g. outputs/multirun/smoke/<date>) or --estimate")
    summarize(args.sweep_dir, report=not args.no_report)


if __name__ == "__main__":
    main()
