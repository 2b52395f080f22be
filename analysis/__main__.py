"""`python -m analysis <run or sweep dir> [--out DIR] [--notebooks]`: rebuild every figure from the results."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from analysis.build import build_all_figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__)
    parser.add_argument(
        "results",
        type=Path,
        help="a run directory (results.csv + tables/) or a sweep directory (summary.parquet/csv)",
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <results>/figures)")
    parser.add_argument(
        "--notebooks",
        action="store_true",
        help="also execute every analysis notebook on these results; executed .ipynb files go "
        "to <out>/notebooks (slower: one Jupyter kernel per notebook)",
    )
    parser.add_argument(
        "--formats",
        default="png,pdf",
        help="comma-separated subset of png,pdf (e.g. png for the figures committed to the repo)",
    )
    parser.add_argument(
        "--strict", action="store_true", help="fail on the first figure error instead of skipping"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    args = parser.parse_args(argv)
    # Root at WARNING: fontTools logs every PDF font subset at INFO.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("analysis").setLevel(logging.WARNING if args.quiet else logging.INFO)

    if not args.results.exists():
        print(f"error: {args.results} does not exist", file=sys.stderr)
        return 2
    out = (
        args.out
        if args.out is not None
        else (args.results if args.results.is_dir() else args.results.parent) / "figures"
    )
    try:
        paths = build_all_figures(
            args.results,
            out,
            strict=args.strict,
            formats=[f.strip() for f in args.formats.split(",") if f.strip()],
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.notebooks:
        from analysis.notebooks import execute, notebook_paths

        for nb in notebook_paths():
            logging.getLogger("analysis").info("notebook %s", nb.name)
            execute(
                nb,
                {"results": str(args.results.resolve()), "out_dir": str(out.resolve())},
                output=out / "notebooks" / f"{nb.stem}.ipynb",
            )
    print(f"{len(paths)} figure files in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
