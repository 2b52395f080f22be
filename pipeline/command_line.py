"""The `python -m pipeline` command line: argument order as users type it, and a dry run of a command.

Hydra's argument parser takes the overrides as one contiguous run of positional arguments, so a flag between
two overrides (`+experiment=full_sweep -m model=pythia-410m`) used to end the run and leave the rest
"unrecognized". `normalize_argv` moves Hydra's flags in front of the overrides, keeping every override's
order (a later override of the same key still wins).

`compose_jobs` answers "what would this command run?" without running anything: the config of a single run,
or the config of every job of a multirun sweep, composed exactly as Hydra's basic sweeper and launcher would
compose them. tests/test_documented_commands.py feeds it every command shown in README.md and docs/.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")
CONFIG_NAME = "config"

# Hydra's flags (hydra/_internal/utils.py: get_args_parser). Switches take no value; the others take exactly
# one, either as the next argument or attached (`--cfg=job`). `--info` takes an optional value and stays put.
SWITCHES = frozenset(
    {
        "-m",
        "--multirun",
        "-r",
        "--run",
        "--resolve",
        "-h",
        "--help",
        "--hydra-help",
        "-sc",
        "--shell-completion",
    }
)
WITH_VALUE = frozenset(
    {
        "-c",
        "--cfg",
        "-p",
        "--package",
        "-cp",
        "--config-path",
        "-cn",
        "--config-name",
        "-cd",
        "--config-dir",
        "--experimental-rerun",
    }
)


def normalize_argv(argv: Sequence[str]) -> list[str]:
    """Hydra's flags first (with their values), then the overrides in the order given.

    >>> normalize_argv(["+experiment=full_sweep", "-m", "model=pythia-410m"])
    ['-m', '+experiment=full_sweep', 'model=pythia-410m']
    """
    flags: list[str] = []
    rest: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        attached_value = (
            "=" in arg and arg.startswith("--") and arg.split("=", 1)[0] in WITH_VALUE
        )  # --cfg=job
        if arg in SWITCHES or attached_value:
            flags.append(arg)
        elif arg in WITH_VALUE and i + 1 < len(args):
            flags += [arg, args[i + 1]]
            i += 1
        else:
            rest.append(arg)
        i += 1
    return flags + rest


def compose_jobs(argv: Sequence[str], config_dir: str = CONFIG_DIR) -> list[DictConfig]:
    """The composed config of every job `python -m pipeline <argv>` would run, in launch order; nothing runs
    and nothing is written. Each config includes its `hydra` node (sweep dir, job number, launcher).

    Raises what Hydra would raise for the same command line: `SystemExit` for an argument it cannot parse,
    `hydra.errors.ConfigCompositionException` / `OverrideParseException` for a bad override."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path, get_args_parser
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    args = get_args_parser().parse_args(normalize_argv(argv))
    overrides = list(args.overrides)
    GlobalHydra.instance().clear()
    hydra = Hydra.create_main_hydra2(
        task_name="pipeline", config_search_path=create_config_search_path(config_dir)
    )
    try:
        # The mode as hydra.main decides it: the config's hydra.mode, else -m, else a single run.
        mode = hydra.get_mode(config_name=CONFIG_NAME, overrides=overrides)
        if args.multirun:
            mode = RunMode.MULTIRUN
        elif mode is None:
            mode = RunMode.RUN
        if mode == RunMode.RUN:
            return [hydra.compose_config(CONFIG_NAME, overrides, run_mode=RunMode.RUN)]
        master = hydra.compose_config(CONFIG_NAME, overrides, run_mode=RunMode.MULTIRUN)
        sweeper = master.hydra.sweeper.get("_target_", "")
        if not sweeper.endswith("BasicSweeper"):
            raise NotImplementedError(f"dry runs expand only Hydra's basic sweeper, not {sweeper}")
        # BasicSweeper.sweep: the config's sweeper params first, the command line's overrides after them.
        params = [f"{key}={value}" for key, value in (master.hydra.sweeper.params or {}).items()]
        task_overrides = list(OmegaConf.to_container(master.hydra.overrides.task, resolve=False))
        parsed = OverridesParser.create(config_loader=hydra.config_loader).parse_overrides(
            params + task_overrides
        )
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
        configs = []
        for number, job_overrides in enumerate(jobs):
            job = hydra.config_loader.load_sweep_config(
                master_config=master, sweep_overrides=list(job_overrides)
            )
            with open_dict(job):
                job.hydra.job.num = number
                job.hydra.job.id = f"dry_run_{number}"
            configs.append(job)
        return configs
    finally:
        GlobalHydra.instance().clear()
