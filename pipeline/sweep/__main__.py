"""`python -m pipeline.sweep <sweep dir> [--no-report]`, `python -m pipeline.sweep --estimate` and
`python -m pipeline.sweep --plan [the arguments of a python -m pipeline command]`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.sweep.callback import summarize
from pipeline.sweep.estimate import estimate_table, print_estimates

PLAN_FLAG = "--plan"


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if PLAN_FLAG in argv:
        # Everything after --plan is a `python -m pipeline` command line (overrides, -m anywhere), so it is
        # handed over whole instead of being parsed here.
        from pipeline.sweep.plan import plan_table, print_plan

        command = argv[argv.index(PLAN_FLAG) + 1 :]
        print_plan(plan_table(command), command)
        return
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
    parser.add_argument(
        PLAN_FLAG,
        action="store_true",
        help="followed by a `python -m pipeline` command's arguments (e.g. +experiment=full_sweep -m): one line "
        "per job it would run (model, heads, budgets, disk, GPU-hours), without running anything",
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
