"""Every `python -m pipeline ...` command shown in README.md, docs/*.md and the conf/ comments parses and
composes: a dry run of each (every job of a sweep composed, nothing run). The commands are read from the
docs when the test runs, so an edited doc is checked as written."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from pipeline.command_line import compose_jobs, normalize_argv

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONF_FILES = sorted((ROOT / "conf").rglob("*.yaml"))
SHELL_FENCES = {"bash", "sh", "shell", "console"}
# `python -m pipeline` itself (not `python -m pipeline.sweep`), up to a comment or the next shell command.
COMMAND = re.compile(r"python -m pipeline(?![.\w])(?P<args>[^#;&|]*)")


def _substitute(line: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), m.group(0)), line)


def _shell_block_commands(block: str) -> list[str]:
    """Commands in a fenced shell block; `\\` continuations joined, loop variables bound to their first value
    and `NAME=value` assignments substituted."""
    text = block.replace("\\\n", " ")
    variables: dict[str, str] = {}
    commands = []
    for line in text.splitlines():
        line = re.sub(r"\$\([^)]*\)", "X", line)  # command substitution, e.g. $(date +%F)
        if loop := re.match(r"\s*for (\w+) in (\S+)", line):
            variables[loop.group(1)] = loop.group(2)
        if assignment := re.match(r"\s*(\w+)=(\S+)\s*$", line):
            variables[assignment.group(1)] = _substitute(assignment.group(2), variables)
        commands += [m.group(0) for m in COMMAND.finditer(_substitute(line, variables))]
    return commands


def documented_commands() -> list[tuple[str, str]]:
    """(where, command) for every `python -m pipeline` command in shell blocks and inline code spans."""
    found = []
    for path in DOC_FILES + CONF_FILES:
        text = path.read_text()
        where = path.relative_to(ROOT).as_posix()
        if path.suffix == ".md":
            fences = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
            for fence in fences.finditer(text):
                if fence.group(1) in SHELL_FENCES:
                    found += [(where, command) for command in _shell_block_commands(fence.group(2))]
            text = fences.sub("", text)
        for span in re.findall(r"`([^`\n]+)`", text):
            if match := COMMAND.fullmatch(span.strip()):
                found.append((where, match.group(0)))
    unique: dict[str, str] = {}
    for where, command in found:
        unique.setdefault(" ".join(command.split()), where)
    return [(where, command) for command, where in unique.items()]


COMMANDS = documented_commands()


def test_the_docs_show_the_commands_users_type():
    shown = {command for _, command in COMMANDS}
    assert "python -m pipeline" in shown
    assert any(" -m" in command and "+experiment=full_sweep" in command for command in shown)
    assert len(COMMANDS) >= 8, COMMANDS


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["+experiment=full_sweep", "-m", "model=pythia-410m"],
            ["-m", "+experiment=full_sweep", "model=pythia-410m"],
        ),
        (["a=1", "--multirun", "b=2", "a=3"], ["--multirun", "a=1", "b=2", "a=3"]),
        (["a=1", "--cfg", "job", "b=2"], ["--cfg", "job", "a=1", "b=2"]),
        (["a=1", "--cfg=job", "--resolve", "b=2"], ["--cfg=job", "--resolve", "a=1", "b=2"]),
        (["-m", "a=1"], ["-m", "a=1"]),
        ([], []),
    ],
)
def test_normalize_argv_moves_flags_before_overrides(argv, expected):
    assert normalize_argv(argv) == expected


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[f"{w}: {c}" for w, c in COMMANDS])
def test_documented_command_composes(where, command):
    argv = shlex.split(command)[3:]  # drop `python -m pipeline`
    jobs = compose_jobs(argv)
    assert jobs, f"{where}: `{command}` composes no job"
    for job in jobs:
        # Every value resolves (interpolations such as model.source='/dir/${model.name}' included), and so
        # does the job's output directory.
        HydraConfig.instance().set_config(job)
        task = OmegaConf.masked_copy(job, [key for key in job if key != "hydra"])
        OmegaConf.to_container(task, resolve=True)
        if job.hydra.mode == RunMode.MULTIRUN:
            assert job.hydra.sweep.dir and job.hydra.sweep.subdir
        else:
            assert job.hydra.run.dir
        assert job.model.name and job.stages


def test_a_sweep_expands_into_its_jobs():
    grid = compose_jobs(["+experiment=full_sweep", "-m"])
    assert [job.model.name for job in grid] == [
        "pythia-70m",
        "pythia-160m",
        "pythia-410m",
        "pythia-1b",
        "pythia-1.4b",
        "pythia-2.8b",
    ]
    narrowed = compose_jobs(["+experiment=full_sweep", "-m", "model=pythia-410m"])
    assert [job.model.name for job in narrowed] == ["pythia-410m"]
    assert [job.hydra.job.num for job in compose_jobs(["+experiment=smoke", "seed=0,1"])] == [0, 1, 2, 3]
    (single,) = compose_jobs(["model=tiny", "seed=3"])
    assert single.seed == 3


def test_a_bad_override_fails_the_dry_run():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_jobs(["+experiment=full_sweep", "-m", "model=pythia-12m"])
    with pytest.raises(ConfigCompositionException):
        compose_jobs(["no_such_key=1"])


def test_flag_between_overrides_reaches_hydra():
    """The real entry point: `-m` after an override used to stop with "unrecognized arguments"."""
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "+experiment=full_sweep", "-m", "model=pythia-410m", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "unrecognized arguments" not in result.stderr
    assert "Powered by Hydra" in result.stdout
