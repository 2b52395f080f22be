"""A run's console holds stage starts/finishes, warnings and the final table; the libraries' chatter goes to
the run's log file only (pipeline/orchestration/console.py)."""

from __future__ import annotations

import logging
import re

import pytest

from pipeline.orchestration.console import ConsoleFilter

from .micro import run_micro

# A log record on the console, as Hydra's formatter writes it: [time][logger][LEVEL] message
RECORD = re.compile(r"^\[[^\]]+\]\[(?P<name>[^\]]+)\]\[(?P<level>[A-Z]+)\] ")
# A micro run that recomputes heads and early_exit and draws every figure: 7 stage lines (start or reuse)
# plus 2 finish lines, the project's calibration warnings (about 10), the final table (at most 80 rows and
# 8 lines of frame), the figures line and the library-warnings line, plus lm-eval's own progress bars
# (explicitly enabled by lm-eval: 2 per evaluation). Before the quiet console: 1,322 lines.
MAX_CONSOLE_LINES = 130


def _record(name: str, level: int) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, "message", None, None)


@pytest.mark.parametrize(
    "name, level, shown",
    [
        ("pipeline", logging.INFO, True),  # the run's summary lines (__main__)
        ("pipeline.orchestration.runner", logging.INFO, True),  # stage start / finish
        ("hydra.core.utils", logging.INFO, True),  # which multirun job starts
        ("pipeline.stages.heads", logging.INFO, False),  # a stage's detail lines: log file only
        ("pipeline.exits.calibration", logging.WARNING, True),
        ("analysis", logging.WARNING, True),
        ("fontTools.subset", logging.INFO, False),
        ("lm_eval.evaluator", logging.INFO, False),
        ("lm_eval.evaluator", logging.WARNING, False),
        ("lightning.pytorch.utilities.rank_zero", logging.INFO, False),
        ("py.warnings", logging.WARNING, False),
        ("lm_eval.evaluator", logging.ERROR, True),  # errors from anywhere
    ],
)
def test_console_filter(name, level, shown):
    console = ConsoleFilter()
    assert console.filter(_record(name, level)) is shown
    held_back_warning = level == logging.WARNING and not shown
    assert console.library_warnings == int(held_back_warning)


def test_a_cli_run_prints_no_library_chatter(micro_copy):
    result = run_micro(micro_copy, "force=[heads,early_exit]", "figures=true")
    assert result.returncode == 0, result.stderr[-4000:]
    console = (result.stdout + result.stderr).splitlines()
    records = [m for m in map(RECORD.match, console) if m]
    info_loggers = {m["name"] for m in records if m["level"] == "INFO"}
    assert info_loggers <= {"pipeline", "pipeline.orchestration.runner"}, info_loggers
    text = "\n".join(console)
    for chatter in ("fontTools", "lm_eval", "litlogger", "bootstrapping for stddev", "Loading weights"):
        assert chatter not in text, chatter
    assert sum("stage " in line and "done in" in line for line in console) == 2  # heads, early_exit
    assert len(console) <= MAX_CONSOLE_LINES, text
    # Held back from the console, not lost: the run's log file has the libraries' lines.
    (log_file,) = (micro_copy / "runs").rglob("pipeline.log")
    logged = log_file.read_text()
    assert "lm_eval" in logged and "litlogger" in logged
    assert "fontTools" not in logged  # font subsetting is not worth a line anywhere
