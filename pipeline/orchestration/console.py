"""What a run prints on the console, and what goes to its log file only.

The console of `python -m pipeline` shows one line per stage start and finish, progress bars, the project's
warnings, errors from anywhere and the final table. Everything else — the stages' detail lines, the libraries'
INFO and WARNING records (lm-eval's per-task setup, Lightning's tips, fontTools' font subsetting while figures
are saved), Python warnings — goes only to the run's log file (`<run dir>/pipeline.log`, Hydra's file
handler), which keeps every record at `log_level`. The last console line counts the library warnings left
there, so none is lost silently.

Hydra's job logging creates the handlers; `quiet_console` filters its console handler afterwards. The
libraries' own progress bars are off by default (`TQDM_DISABLE=1`, set by `python -m pipeline` before tqdm is
imported): they pass no `disable=` to tqdm, while the pipeline's bars (and Lightning's) pass
`disable=not progress`. `TQDM_DISABLE= python -m pipeline` shows them again.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Iterator

# Loggers whose INFO lines reach the console: the run's own summary lines (`pipeline`, from __main__), one
# line per stage start/finish (the runner) and the rehearsal model's build (a minute before the first stage)
# — not the stages' detail lines, which go to the log file...
CONSOLE_INFO_LOGGERS = ("pipeline", "pipeline.orchestration.runner", "pipeline.models.rehearsal")
# ...and, with their children, the sweep's end-of-multirun summary and Hydra's launcher (which job starts).
CONSOLE_INFO_PREFIXES = ("pipeline.sweep", "hydra")
# Loggers whose warnings are the project's own and reach the console.
PROJECT_LOGGERS = ("pipeline", "analysis", "__main__")
# Libraries that attach a console handler to their own logger when imported.
SELF_PRINTING_LIBRARIES = ("lightning", "transformers")


def _in(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


class ConsoleFilter(logging.Filter):
    """Lets a record through to the console if it is an error, a project warning, or an INFO line of a
    console logger; counts the library warnings it holds back (they are in the log file)."""

    def __init__(self) -> None:
        super().__init__()
        self.library_warnings = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        if record.levelno >= logging.WARNING:
            if _in(record.name, PROJECT_LOGGERS):
                return True
            self.library_warnings += 1
            return False
        return record.name in CONSOLE_INFO_LOGGERS or _in(record.name, CONSOLE_INFO_PREFIXES)


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


def _console_handlers() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if _is_console(h)]


def quiet_console() -> ConsoleFilter:
    """Filter the root logger's console handlers (not its file handler) with one `ConsoleFilter`, and route
    Python warnings into logging, so they reach the log file instead of stderr. Idempotent per handler."""
    logging.captureWarnings(True)
    console_filter = ConsoleFilter()
    for handler in _console_handlers():
        for old in [f for f in handler.filters if isinstance(f, ConsoleFilter)]:
            handler.removeFilter(old)
        handler.addFilter(console_filter)
    return console_filter


def route_library_logging() -> None:
    """Lightning and transformers print through console handlers of their own (Lightning's tips, transformers'
    warnings) instead of leaving that to the root logger: detach those handlers and let the records
    propagate, so the console filter and the log file see them. Called before a stage computes (every stage
    that computes loads a model, so importing transformers here costs nothing extra) and by the heads stage
    once it has imported Lightning."""
    import transformers.utils.logging  # noqa: F401  (creates transformers' handler, so it can be detached)

    for name in SELF_PRINTING_LIBRARIES:
        if name not in sys.modules:
            continue
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if _is_console(h)]:
            logger.removeHandler(handler)
        logger.propagate = True


def log_files() -> list[str]:
    """The root logger's log files (Hydra's `<run dir>/pipeline.log`)."""
    return [h.baseFilename for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]


class _LogLines(io.TextIOBase):
    """A text stream that logs each complete line it is written (at INFO) instead of printing it."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        lines = (self.pending + text).split("\n")
        self.pending = lines.pop()
        for line in lines:
            if line.strip():
                self.logger.info("%s", line)
        return len(text)

    def flush(self) -> None:
        if self.pending.strip():
            self.logger.info("%s", self.pending)
        self.pending = ""


@contextlib.contextmanager
def stdout_to_log(logger: logging.Logger) -> Iterator[None]:
    """Inside, what a library `print`s goes to `logger` (the log file) instead of the console: lm-eval prints
    a notice per bootstrapped metric."""
    stream = _LogLines(logger)
    with contextlib.redirect_stdout(stream):
        try:
            yield
        finally:
            stream.flush()
