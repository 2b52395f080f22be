"""Every config group composes, keys resolve, and config errors are clear (no hub, no heavy work)."""

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
