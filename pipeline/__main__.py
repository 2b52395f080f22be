"""Entry point: `python -m pipeline [overrides]` (Hydra app; `-m` for multirun sweeps, anywhere on the line)."""

from __future__ import annotations

import os

# Idle OpenMP threads must sleep, not spin: with any other process on the machine, spinning threads made
# 2-thread CPU training up to 7x slower. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The libraries' own progress bars (transformers' weight loading, datasets, lm-eval's task setup) stay off;
# the pipeline's bars pass `disable=` explicitly and follow `progress`. tqdm reads this when first imported.
# Details: pipeline/orchestration/console.py.
os.environ.setdefault("TQDM_DISABLE", "1")

import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pipeline.command_line import normalize_argv  # noqa: E402
from pipeline.orchestration.console import log_files, quiet_console  # noqa: E402
from pipeline.orchestration.errors import USER_ERRORS  # noqa: E402
from pipeline.orchestration.validation import ConfigError  # noqa: E402

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")
log = logging.getLogger("pipeline")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    from pipeline.orchestration.runner import run_pipeline

    hydra_cfg = HydraConfig.get()
    logging.getLogger().setLevel(str(cfg.get("log_level", "INFO")).upper())
    # The console shows stage starts/finishes, warnings and the table; the rest goes to the log file only.
    console = quiet_console()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    group = Path(hydra_cfg.sweep.dir if multirun else hydra_cfg.run.dir).name
    try:
        if cfg.get("figures", True):
            figure_formats(cfg)  # a typo fails now, not after the stages ran
        run_dir = Path(hydra_cfg.runtime.output_dir)
        if cfg.get("rehearsal"):  # +experiment=pythia_rehearsal: build its local model directory first
            from pipeline.models.rehearsal import ensure_rehearsal_model

            ensure_rehearsal_model(cfg)
        run_pipeline(cfg, run_dir=run_dir, group=group)
        if cfg.get("figures", True):
            from analysis import build_all_figures

            figures = build_all_figures(run_dir, run_dir / "figures", formats=figure_formats(cfg))
            log.info(
                "%d figure files in %s (rebuild: python -m analysis %s)",
                len(figures),
                run_dir / "figures",
                run_dir,
            )
    except USER_ERRORS as err:
        log.error("%s: %s", type(err).__name__, err)
        if multirun:
            raise
        sys.exit(2)
    finally:
        if console.library_warnings:
            log.info(
                "%d library warnings (not shown) in %s", console.library_warnings, ", ".join(log_files())
            )


def figure_formats(cfg: DictConfig) -> list[str]:
    """`figure_formats`, checked against the formats the figures can be saved in."""
    from analysis.plots import FORMATS

    value = cfg.get("figure_formats") or ["png"]
    formats = [value] if isinstance(value, str) else [str(f) for f in value]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ConfigError(f"figure_formats {unknown} unknown; choose from {list(FORMATS)}")
    return formats


if __name__ == "__main__":
    # Hydra parses sys.argv itself and takes overrides only as one contiguous run: flags typed between
    # overrides (`+experiment=full_sweep -m model=pythia-410m`) go in front first.
    sys.argv[1:] = normalize_argv(sys.argv[1:])
    main()
