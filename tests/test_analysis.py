"""Analysis notebooks and figures: every notebook runs on a results directory and every expected figure appears;
the same figures come out byte-identical from two separate executions (notebook kernels vs the CLI); a figure
whose data is absent is skipped, not a crash.

Results come from tests/fixtures_results.py (synthetic, two models). To run the same checks on a real run set
ANALYSIS_RESULTS=<run or sweep dir>; the expected-figure check then covers the figures that run has data for.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jupytext
import pandas as pd
import pytest

from analysis import build_figures, load
from analysis.notebooks import REPO_ROOT, ensure_kernel, execute, notebook_paths
from analysis.plots import FIGURES, FORMATS
from pipeline.orchestration.results import COLUMNS
from tests.fixtures_results import MODELS, write_run, write_sweep

PER_MODEL = ["confidence_hist", "calibration", "decoding", "decoding_speed"]
GLOBAL = [
    "confidence_auroc",
    "heads_depth",
    "exit_distribution",
    "accuracy_compute",
    "size_scaling",
    "decoding_summary",
]


def expected_files(models: list[str]) -> set[str]:
    stems = [f"{kind}_{model}" for kind in PER_MODEL for model in models] + GLOBAL
    return {f"{stem}.{fmt}" for stem in stems for fmt in FORMATS}


def figure_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.suffix.lstrip(".") in FORMATS}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.environ.get("ANALYSIS_RESULTS"):
        return Path(os.environ["ANALYSIS_RESULTS"]).resolve()
    return write_sweep(tmp_path_factory.mktemp("sweep"))


@pytest.fixture(scope="module")
def executions(sweep: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two independent executions on the same results: every notebook (each in its own kernel) and
    `python -m analysis`. They run concurrently (the CLI alongside two notebooks at a time) to keep the
    suite short; each writes its own folder. Returns (notebook figures, CLI figures)."""
    nb_out, cli_out = tmp_path_factory.mktemp("nb_figures"), tmp_path_factory.mktemp("cli_figures")
    cli = subprocess.Popen(
        [sys.executable, "-m", "analysis", str(sweep), "--out", str(cli_out), "--strict", "-q"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ensure_kernel()  # once, before the threads could race to install it
        params = {"results": str(sweep), "out_dir": str(nb_out)}
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(
                pool.map(
                    lambda nb: execute(nb, params, output=nb_out / "notebooks" / f"{nb.stem}.ipynb"),
                    notebook_paths(),
                )
            )
        _, stderr = cli.communicate(timeout=300)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 0, stderr
    return nb_out, cli_out


@pytest.fixture(scope="module")
def notebook_figures(executions: tuple[Path, Path]) -> Path:
    return executions[0]


@pytest.fixture(scope="module")
def cli_figures(executions: tuple[Path, Path]) -> Path:
    return executions[1]


def test_analysis_and_the_results_format_import_without_torch() -> None:
    """Notebooks start fast: analysis needs only pandas/matplotlib and the pipeline's results module."""
    code = "import sys, analysis, analysis.plots; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_notebooks_are_percent_scripts_with_parameters() -> None:
    names = {p.stem for p in notebook_paths()}
    assert {
        "nb_confidence_metrics",
        "nb_heads_depth",
        "nb_calibration",
        "nb_accuracy_compute",
        "nb_decoding",
    } <= names
    for path in notebook_paths():
        nb = jupytext.read(path)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: expected one cell tagged 'parameters'"
        assert "results =" in tagged[0].source and "out_dir =" in tagged[0].source


def test_notebooks_write_every_figure(notebook_figures: Path, sweep: Path) -> None:
    models = load(sweep).models
    if not os.environ.get("ANALYSIS_RESULTS"):
        assert models == list(MODELS)  # ordered by size
    written = figure_files(notebook_figures)
    missing = expected_files(models) - written if not os.environ.get("ANALYSIS_RESULTS") else set()
    assert not missing, f"notebooks did not write {sorted(missing)}"
    assert written, "no figures at all"
    for name in written:
        assert (notebook_figures / name).stat().st_size > 1000, f"{name} is (nearly) empty"
    # The notebooks' own outputs: every one displayed at least one figure.
    for path in notebook_paths():
        nb = jupytext.reads((notebook_figures / "notebooks" / f"{path.stem}.ipynb").read_text(), fmt="ipynb")
        images = [
            o
            for c in nb.cells
            if c.cell_type == "code"
            for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})
        ]
        assert images, f"{path.name} displayed no figure"


def test_cli_builds_all_figures_byte_identical_to_notebooks(
    cli_figures: Path, notebook_figures: Path, sweep: Path
) -> None:
    cli = figure_files(cli_figures)
    if not os.environ.get("ANALYSIS_RESULTS"):
        assert cli == expected_files(list(MODELS))
    assert cli == figure_files(notebook_figures)
    different = [
        n for n in sorted(cli) if (cli_figures / n).read_bytes() != (notebook_figures / n).read_bytes()
    ]
    assert not different, f"not byte-identical across executions: {different}"


def test_build_is_deterministic_in_process(tmp_path: Path) -> None:
    """Same process, built twice: no state leaks from one build into the next (style, caches, counters)."""
    res = load(write_run(tmp_path / "run", "pythia-70m"))
    first = build_figures(res, tmp_path / "a", names=["confidence_auroc", "heads_depth"], strict=True)
    second = build_figures(res, tmp_path / "b", names=["confidence_auroc", "heads_depth"], strict=True)
    assert [p.name for p in first] == [p.name for p in second] and first
    for a, b in zip(first, second, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_partial_results_skip_missing_figures(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A run that stopped after the metrics stage: the figures it has data for, and a notice for the rest."""
    run = write_run(tmp_path / "run", "pythia-70m")
    frame = pd.read_csv(run / "results.csv")
    frame[frame["stage"].isin(["backbone", "heads", "metrics"])].to_csv(run / "results.csv", index=False)
    (run / "tables" / "metrics" / "token_metrics.parquet").unlink()
    with caplog.at_level(logging.INFO, logger="analysis"):
        paths = build_figures(load(run), tmp_path / "fig", strict=True)
    assert {p.stem for p in paths} == {"confidence_auroc", "heads_depth"}
    skipped = {name for name in FIGURES if f"figure {name:<22} skipped" in caplog.text}
    assert skipped == set(FIGURES) - {"confidence_auroc", "heads_depth"}


def test_missing_columns_and_empty_tables(tmp_path: Path) -> None:
    """No `layer` or `draft_len` columns, an empty results file: degrade, never crash."""
    run = write_run(tmp_path / "run", "pythia-70m")
    frame = pd.read_csv(run / "results.csv").drop(columns=["layer", "draft_len"])
    frame.to_csv(run / "results.csv", index=False)
    paths = build_figures(load(run), tmp_path / "fig", names=["heads_depth", "decoding"], strict=True)
    assert {p.stem for p in paths} == {"heads_depth", "decoding_pythia-70m"}

    empty = tmp_path / "empty"
    empty.mkdir()
    pd.DataFrame(columns=COLUMNS).to_csv(empty / "results.csv", index=False)
    assert build_figures(load(empty), tmp_path / "fig_empty", strict=True) == []


def test_loading_sweep_forms_agree(tmp_path: Path) -> None:
    """summary.parquet, summary.csv and a multirun folder without a summary load to the same table."""
    root = write_sweep(tmp_path / "sweep")
    from_parquet = load(root).frame
    from_csv = load(root / "summary.csv").frame
    shutil.copytree(root, tmp_path / "bare", ignore=shutil.ignore_patterns("summary.*"))
    from_runs = load(tmp_path / "bare")
    pd.testing.assert_frame_equal(from_parquet, from_csv)
    pd.testing.assert_frame_equal(from_parquet, from_runs.frame)
    assert set(from_runs.token_tables) == set(MODELS)
    assert set(from_parquet["head"].dropna()) == {"0", "1", "2", "3", "all"}


def test_cli_reports_a_missing_directory(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "analysis", str(tmp_path / "nope")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_png_only_and_latest_run(tmp_path: Path) -> None:
    """`formats` narrows the output (PNG for committed figures); an empty `results` parameter finds the newest
    run under outputs/runs."""
    from analysis.data import latest_run

    old = write_run(tmp_path / "outputs" / "runs" / "old", "pythia-70m")
    new = write_run(tmp_path / "outputs" / "runs" / "new", "pythia-160m")
    os.utime(old / "results.csv", (1_000_000, 1_000_000))
    assert latest_run(tmp_path / "outputs") == new
    paths = build_figures(
        load(new), tmp_path / "fig", names=["confidence_auroc"], formats=["png"], strict=True
    )
    assert [p.name for p in paths] == ["confidence_auroc.png"]


def test_pick_eps_skips_an_eps_at_which_the_method_never_drafts():
    import pandas as pd

    from analysis.plots.speculative import pick_eps

    # At ε=0.6 no head is consulted (greedy under another name, fastest); at ε=0.9 the method drafts.
    rows = pd.DataFrame(
        [
            {"eps": 0.6, "metric": "speedup_vs_generate", "value": 1.30},
            {"eps": 0.6, "metric": "acceptance_rate", "value": float("nan")},
            {"eps": 0.9, "metric": "speedup_vs_generate", "value": 1.20},
            {"eps": 0.9, "metric": "acceptance_rate", "value": 0.95},
        ]
    )
    assert pick_eps(rows) == 0.9
    assert pick_eps(rows[rows["metric"] != "acceptance_rate"]) == 0.6  # no acceptance rows: fastest ε
