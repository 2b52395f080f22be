"""The sweep experiments and launchers compose into the intended jobs, without running or downloading anything."""

from __future__ import annotations

import itertools

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pipeline.__main__ import CONFIG_DIR
from pipeline.orchestration.validation import validate_config
from pipeline.stages.extract import bytes_needed

PYTHIA = ["pythia-70m", "pythia-160m", "pythia-410m", "pythia-1b", "pythia-1.4b", "pythia-2.8b"]
D_MODEL = {
    "pythia-70m": 512,
    "pythia-160m": 768,
    "pythia-410m": 1024,
    "pythia-1b": 2048,
    "pythia-1.4b": 2048,
    "pythia-2.8b": 2560,
}


@pytest.fixture(autouse=True)
def _outputs(tmp_path, monkeypatch):
    # paths.root reads PIPELINE_OUTPUTS; nothing is written there by composition.
    monkeypatch.setenv("PIPELINE_OUTPUTS", str(tmp_path / "outputs"))


def _compose(overrides: list[str], hydra: bool = False) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=hydra)


def sweep_jobs(experiment: str, extra: list[str] = ()) -> list[list[str]]:
    """The per-job override lists Hydra's BasicSweeper would launch for `+experiment=<experiment> -m extra`:
    the experiment's `hydra.sweeper.params` first, command-line arguments after (they replace an axis)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        # The master config exactly as `python -m pipeline ... -m` composes it (sweep values left out).
        master = (
            GlobalHydra.instance()
            .config_loader()
            .load_configuration("config", [f"+experiment={experiment}", *extra], run_mode=RunMode.MULTIRUN)
        )
    params = [f"{k}={v}" for k, v in master.hydra.sweeper.params.items()]
    parser = OverridesParser.create()
    batches = BasicSweeper.split_arguments(parser.parse_overrides(params + list(extra)), max_batch_size=None)
    return [list(job) for job in itertools.chain.from_iterable(batches)]


def _job_config(experiment: str, job: list[str]) -> DictConfig:
    return _compose([f"+experiment={experiment}", *job])


# --- full_sweep -------------------------------------------------------------------------------------------


def test_full_sweep_is_a_multirun_over_six_pythia_sizes_and_one_seed():
    master = _compose(["+experiment=full_sweep"], hydra=True)
    assert master.hydra.mode == RunMode.MULTIRUN
    assert master.hydra.runtime.choices["hydra/launcher"] == "local"
    assert "sweep_summary" in master.hydra.callbacks
    jobs = sweep_jobs("full_sweep")
    assert len(jobs) == 6
    assert [dict(o.split("=", 1) for o in job)["model"] for job in jobs] == PYTHIA
    assert all("seed=0" in job for job in jobs)


def test_full_sweep_loops_live_inside_jobs_not_on_sweep_axes():
    master = _compose(["+experiment=full_sweep"], hydra=True)
    assert set(master.hydra.sweeper.params) == {"model", "seed"}
    cfg = _job_config("full_sweep", ["model=pythia-410m", "seed=0"])
    assert len(cfg.calibrate.eps) > 1 and len(cfg.metrics.metrics) > 1
    assert len(cfg.decoding.layerskip_d) > 1
    assert cfg.early_exit.tasks == "pythia" and len(cfg.early_exit.pythia) == 8  # the zero-shot suite


@pytest.mark.parametrize("model", PYTHIA)
def test_full_sweep_job_settings_fit_one_80gb_gpu_and_100gb_of_shards(model):
    cfg = _job_config("full_sweep", [f"model={model}", "seed=0"])
    OmegaConf.resolve(cfg)  # every interpolation (the per-size table) resolves
    validate_config(cfg)  # the runner's own checks, before any stage
    assert cfg.model.name == model and cfg.model.source == f"EleutherAI/{model}"
    assert cfg.model.d_model == D_MODEL[model]
    assert cfg.data.kind == "minipile" and cfg.data.seq_len == 512
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.devices == 1
    # Big models run in bf16 (fp32 2.8b would still fit, but halves extraction and decoding throughput).
    if model in ("pythia-1b", "pythia-1.4b", "pythia-2.8b"):
        assert cfg.model.dtype == "bfloat16"
    per_token = (len(cfg.model.head_layers) + 1) * cfg.model.d_model * 2 + 4
    assert bytes_needed(cfg) == per_token * sum(cfg.data.budgets.values())
    assert 50e9 < bytes_needed(cfg) <= 100e9
    # Head training makes about one pass over the extracted train tokens.
    steps_tokens = cfg.heads.max_steps * cfg.heads.batch_tokens
    assert 0.95 <= steps_tokens / cfg.data.budgets.train <= 1.05
    assert cfg.size.gpus == 1 and cfg.size.timeout_min > 0 and cfg.size.mem_gb >= 64


@pytest.mark.parametrize("model", PYTHIA)
def test_full_sweep_jobs_plan_and_pass_stage_checks(model):
    """The runner plans every present stage's cache key and the stages' own config checks pass; the
    backbone (hub reachability) and extract (free disk) checks depend on the machine and are left out."""
    from pipeline.orchestration.runner import Runner
    from tests.test_sweep import _stage_set_problem

    if problem := _stage_set_problem():
        pytest.skip(problem)
    cfg = _job_config("full_sweep", [f"model={model}", "seed=0", "device=cpu"])
    runner = Runner(cfg, group="test")
    assert runner.requested == list(runner.known) and set(runner.keys) == set(runner.known)
    for name, stage in runner.known.items():
        if name not in ("backbone", "extract"):
            stage.validate(cfg)


def test_budgets_shrink_as_models_grow():
    train = [_job_config("full_sweep", [f"model={m}"]).size.train_tokens for m in PYTHIA]
    assert train == sorted(train, reverse=True)


def test_command_line_value_narrows_an_axis():
    jobs = sweep_jobs("full_sweep", ["model=pythia-160m"])
    assert jobs == [["model=pythia-160m", "seed=0"]]
    jobs = sweep_jobs("full_sweep", ["model=pythia-70m,pythia-1b", "seed=0,1"])
    assert len(jobs) == 4 and {tuple(j) for j in jobs} == {
        (f"model={m}", f"seed={s}") for m in ("pythia-70m", "pythia-1b") for s in (0, 1)
    }


def test_command_line_overrides_per_size_settings():
    cfg = _job_config(
        "full_sweep", ["model=pythia-2.8b", "extract.batch_size=8", "data.budgets.train=1000000"]
    )
    assert cfg.extract.batch_size == 8 and cfg.data.budgets.train == 1_000_000


# --- launchers --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model,gpus,mem,timeout", [("pythia-70m", 1, 64, 180), ("pythia-2.8b", 1, 128, 360)])
def test_slurm_launcher_composes_with_per_size_resources(model, gpus, mem, timeout):
    cfg = _compose(
        ["+experiment=full_sweep", f"model={model}", "hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
        hydra=True,
    )
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert (launcher["gpus_per_node"], launcher["mem_gb"], launcher["timeout_min"]) == (gpus, mem, timeout)
    assert launcher["partition"] == "gpu"
    assert launcher["submitit_folder"].startswith(str(cfg.hydra.sweep.dir))


def test_slurm_launcher_composes_without_an_experiment():
    cfg = _compose(["hydra/launcher=slurm"], hydra=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["gpus_per_node"] == 1 and launcher["timeout_min"] == 240


def test_local_launcher_is_hydras_basic_launcher():
    cfg = _compose(["+experiment=smoke", "hydra/launcher=local"], hydra=True)
    assert cfg.hydra.launcher._target_.endswith("BasicLauncher")


# --- smoke ------------------------------------------------------------------------------------------------


def test_smoke_has_the_full_sweeps_shape_on_two_tiny_variants():
    master = _compose(["+experiment=smoke"], hydra=True)
    assert master.hydra.mode == RunMode.MULTIRUN and "sweep_summary" in master.hydra.callbacks
    jobs = sweep_jobs("smoke")
    assert jobs == [["model=tiny", "heads=linear", "seed=0"], ["model=tiny", "heads=mlp", "seed=0"]]
    for job in jobs:
        cfg = _job_config("smoke", job)
        OmegaConf.resolve(cfg)
        validate_config(cfg)
        assert (
            cfg.model.source == "tiny" and cfg.data.kind == "local_text" and cfg.trainer.accelerator == "cpu"
        )
        assert cfg.model.tiny.train_tokens <= 200_000 and cfg.heads.max_steps <= 100
        assert sum(cfg.data.budgets.values()) <= 50_000 and cfg.decoding.n_prompts <= 5


def test_smoke_variants_share_backbone_and_extraction_cache_keys():
    from pipeline.orchestration.runner import available_stages, plan_keys

    known = available_stages()
    keys = [plan_keys(_job_config("smoke", job), known)[0] for job in sweep_jobs("smoke")]
    assert keys[0]["backbone"] == keys[1]["backbone"] and keys[0]["extract"] == keys[1]["extract"]
    if "heads" in known:
        assert keys[0]["heads"] != keys[1]["heads"]
