"""Build figures from a run or sweep directory; the entry point for `python -m analysis` and the pipeline."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from analysis.data import Results, load
from analysis.plots import FIGURES, FORMATS, SkipFigure, output_formats

log = logging.getLogger("analysis")


def build_figures(
    res: Results,
    out_dir: str | Path,
    names: Iterable[str] | None = None,
    strict: bool = False,
    formats: Iterable[str] = FORMATS,
) -> list[Path]:
    """Draw the named figures (all by default) into `out_dir` as PNG and/or PDF; returns the files written.

    A figure whose data is absent is skipped with a logged notice. Any other failure is logged and skipped
    too unless `strict` (tests use strict): at the end of a long pipeline run, one broken plot must not cost
    the rest.
    """
    out_dir = Path(out_dir)
    names = list(FIGURES) if names is None else list(names)
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        raise KeyError(f"unknown figure(s) {unknown}; available: {list(FIGURES)}")
    written: list[Path] = []
    for name in names:
        try:
            with output_formats(formats):
                paths = FIGURES[name](res, out_dir)
        except SkipFigure as why:
            log.info("figure %-22s skipped: %s", name, why)
            continue
        except Exception:
            if strict:
                raise
            log.exception("figure %-22s failed; continuing with the others", name)
            continue
        log.info("figure %-22s -> %s", name, ", ".join(p.name for p in paths))
        written += paths
    return written


def build_all_figures(
    results_dir: str | Path,
    out_dir: str | Path | None = None,
    strict: bool = False,
    formats: Iterable[str] = FORMATS,
) -> list[Path]:
    """Every figure for a run directory (results.csv + tables/) or a sweep directory (summary.*).

    `out_dir` defaults to `<results_dir>/figures`. Returns the PNG and PDF files written.
    """
    results_dir = Path(results_dir)
    out_dir = (
        Path(out_dir)
        if out_dir is not None
        else (results_dir if results_dir.is_dir() else results_dir.parent) / "figures"
    )
    return build_figures(load(results_dir), out_dir, strict=strict, formats=formats)


def show(res: Results, out_dir: str | Path, names: Iterable[str]) -> list[Path]:
    """In a notebook: build the named figures and display their PNGs (a figure without data is reported)."""
    from IPython.display import Image, Markdown, display

    names = list(names)
    paths = build_figures(res, out_dir, names=names)
    if not paths:
        display(Markdown(f"*No data for {', '.join(names)} in these results (see the notebook's intro).*"))
    for path in paths:
        if path.suffix == ".png":
            display(Image(filename=str(path)))
    return paths
