"""Every config group composes, keys resolve, and config errors are clear (no hub, no heavy work)."""

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pipeline.orchestration.validation import ConfigError, check_eps, validate_config

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
MODELS = sorted(p.stem for p in (Path(CONF_DIR) / "model").glob("*.yaml"))


def compose_cfg(overrides=()):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_primary_defaults_do_not_list_experiment():
    defaults = OmegaConf.load(Path(CONF_DIR) / "config.yaml").defaults
    assert not any("experiment" in (d if isinstance(d, str) else next(iter(d))) for d in defaults)


@pytest.mark.parametrize("model", MODELS)
def test_every_model_config_composes_and_validates(model, outputs_root):
    cfg = compose_cfg([f"model={model}"] + (["data=minipile"] if model != "tiny" else []))
    validate_config(cfg)
    assert cfg.model.name == ("tiny" if model == "tiny" else model)
    assert len(cfg.model.head_layers) == 4
    assert str(cfg.paths.cache).startswith(str(outputs_root))


def test_outputs_root_override(tmp_path):
    cfg = compose_cfg([f"paths.root={tmp_path}"])
    assert cfg.paths.cache == f"{tmp_path}/cache" and cfg.paths.wandb == f"{tmp_path}/wandb"


def test_unknown_model_is_rejected_by_hydra_with_the_options():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="pythia-70m"):
        compose_cfg(["model=pythia-7b"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.head_layers=[1,9]", "out of range"),
        ("model.head_layers=[3,1]", "strictly increasing"),
        ("data.seq_len=4096", "maximum sequence length"),
        ("data.budgets.train=10", "smaller than one sequence"),
    ],
)
def test_bad_model_and_data_settings_are_config_errors(override, message, outputs_root):
    with pytest.raises(ConfigError, match=message):
        validate_config(compose_cfg([override]))


@pytest.mark.parametrize("eps", [0, -0.1, 1.5, "abc"])
def test_eps_outside_unit_interval_is_rejected(eps):
    with pytest.raises(ConfigError, match="ε"):
        check_eps([0.9, eps], "calibrate.eps")
    assert check_eps([0.6, 1.0], "x") == [0.6, 1.0]


# --- typed stage configs (issue 13): one group per stage, schema defaults and checks, renamed keys -------------

STAGE_GROUPS = ["extract", "heads", "metrics", "calibrate", "early_exit", "decoding"]


@pytest.fixture(scope="module")
def default_cfg():
    return compose_cfg()


def test_every_stage_reads_the_group_named_after_it():
    from pipeline.config import SCHEMAS
    from pipeline.orchestration.runner import available_stages

    stages = available_stages()
    assert sorted(SCHEMAS) == sorted(STAGE_GROUPS)
    assert {name: stage.group for name, stage in stages.items() if stage.group} == {
        g: g for g in STAGE_GROUPS
    }


@pytest.mark.parametrize("group", STAGE_GROUPS)
def test_group_yaml_repeats_the_schema_defaults(default_cfg, group):
    from pipeline.config import SCHEMAS

    cfg = default_cfg
    schema = OmegaConf.to_container(OmegaConf.structured(SCHEMAS[group]))
    assert OmegaConf.to_container(cfg[group], resolve=True) == schema
    yaml_keys = set(
        OmegaConf.load(Path(CONF_DIR) / group / ("linear.yaml" if group == "heads" else "default.yaml"))
    )
    renamed = {"metrics", "rc_points"} if group == "calibrate" else set()
    assert (
        yaml_keys - {"defaults"} == set(schema) - renamed
    )  # every setting is shown (and commented) in conf/


def test_mlp_heads_differ_from_linear_only_in_head_type():
    linear, mlp = compose_cfg().heads, compose_cfg(["heads=mlp"]).heads
    assert {k for k in linear if linear[k] != mlp[k]} == {"head_type"}


@pytest.mark.parametrize(
    "override, new",
    [
        ("evaluate.limit=8", "use early_exit.limit=8"),
        ("evaluate.token_eval.n_tokens=16", "use early_exit.token_eval.n_tokens=16"),
        ("calibrate.metrics=[entropy]", "use metrics.metrics=[entropy]"),
        ("calibrate.rc_points=11", "use metrics.rc_points=11"),
    ],
)
def test_renamed_keys_fail_naming_the_new_key(override, new, outputs_root):
    from pipeline.orchestration.runner import Runner

    with pytest.raises(ConfigError, match=r"renamed to .*\(issue 13\): " + re.escape(new)):
        Runner(compose_cfg([override, "logger=none"]))


def test_unknown_key_in_a_stage_group_is_rejected_when_composing():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="metrics.foo"):
        compose_cfg(["metrics.foo=1"])
    with pytest.raises(ConfigCompositionException, match="decoding.n_prompts"):
        compose_cfg(["decoding.n_prompts=many"])  # typed: an int


@pytest.mark.parametrize(
    "override, message",
    [
        ("extract.batch_size=0", r"extract.batch_size=0: must be >= 1"),
        ("heads.head_type=conv", r"heads.head_type=conv: choose one of"),
        ("heads.min_lr_ratio=2", r"heads.min_lr_ratio=2.0: must lie in \[0, 1\]"),
        ("heads.val_tokens=100000000", "exceed the extracted train tokens"),
        ("metrics.metrics=[entropy,bogus]", r"metrics.metrics=\[entropy,bogus\]: 'bogus': choose one of"),
        ("metrics.metrics=[]", "must not be empty"),
        ("metrics.max_tokens=0", "metrics.max_tokens=0: must be >= 1"),
        ("calibrate.delta=1", r"calibrate.delta=1.0: must lie in \(0, 1\)"),
        ("calibrate.ltt.grid_fraction=0", r"calibrate.ltt.grid_fraction=0.0: must lie in \(0, 1\)"),
        ("calibrate.eps=[0.9,1.5]", "outside"),
        ("calibrate.methods=[magic]", "choose one of"),
        ("early_exit.eps=[0.123]", r"early_exit.eps \[0.123\] are not calibrated"),
        ("early_exit.methods=[bogus]", "not calibrated"),
        ("early_exit.tasks=[]", "must be 'offline', 'pythia' or a non-empty list"),
        ("early_exit.token_eval.fills=[lazy,teleport]", "choose one of"),
        ("decoding.eps=[0.77]", "not calibrated"),
        ("decoding.layerskip_d=[1,0]", "entry 0 must be >= 1"),
        ("decoding.calibration_method=magic", "not calibrated"),
        ("decoding.max_new_tokens=1000", "maximum sequence length"),
    ],
)
def test_schema_checks_name_the_key_and_the_fix(default_cfg, override, message):
    from pipeline.config import group_settings

    group = override.split(".")[0]
    cfg = OmegaConf.merge(default_cfg, OmegaConf.from_dotlist([override]))  # typed as Hydra would
    with pytest.raises(ConfigError, match=message):
        group_settings(cfg, group)


@pytest.mark.parametrize("group", STAGE_GROUPS)
def test_defaults_pass_every_check(default_cfg, group):
    from pipeline.config import group_settings

    settings = group_settings(default_cfg, group)
    assert type(settings).__name__.endswith("Config")


def test_experiments_compose_and_check(outputs_root):
    from pipeline.config import check_renamed, group_settings

    for overrides in (["+experiment=smoke"], ["+experiment=full_sweep", "model=pythia-410m"]):
        cfg = compose_cfg(overrides)
        check_renamed(cfg)
        for group in STAGE_GROUPS:
            group_settings(cfg, group)
