"""Config checks that run before any heavy work, so a typo costs seconds and every error names the fix."""

from __future__ import annotations

from collections.abc import Iterable

from omegaconf import DictConfig, ListConfig


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and the fix."""


def check_eps(values: Iterable[float] | float, key: str = "eps") -> list[float]:
    """Each ε is a target accuracy (agreement with the full model among exited tokens) in (0, 1]."""
    if isinstance(values, int | float):
        values = [values]
    values = list(values)
    if not values:
        raise ConfigError(
            f"{key}: the ε list is empty; give at least one target accuracy in (0, 1], e.g. [0.9]"
        )
    out = []
    for eps in values:
        if isinstance(eps, bool | str):
            raise ConfigError(f"{key}: ε must be a number in (0, 1], got {eps!r}")
        try:
            eps_f = float(eps)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: ε must be a number in (0, 1], got {eps!r}") from None
        if not 0.0 < eps_f <= 1.0:
            raise ConfigError(f"{key}: ε={eps_f} is outside (0, 1]; ε is a target accuracy such as 0.9")
        out.append(eps_f)
    return out


def check_device(device: str, available: bool = False) -> None:
    """The device name is valid; with `available`, also present on this machine (checked by the runner, not
    by config composition, so a GPU sweep's configs can be checked on a laptop)."""
    import torch

    if device == "auto" or device == "cpu":
        return
    kind = device.split(":")[0]
    if kind not in ("cuda", "mps"):
        raise ConfigError(f"device={device!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    if not available:
        return
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device} but no CUDA GPU is visible here; use device=auto or device=cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device=mps but Apple's MPS backend is not available here; use device=cpu")


def _require(cfg: DictConfig, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            raise ConfigError(f"missing config key {dotted!r}")
        node = node[part]
    return node


def validate_config(cfg: DictConfig) -> None:
    """Checks on the model and data groups; each stage adds its own in `Stage.validate`."""
    check_device(str(cfg.get("device", "auto")))
    model = _require(cfg, "model")
    num_layers = int(_require(cfg, "model.num_layers"))
    layers = _require(cfg, "model.head_layers")
    if not isinstance(layers, ListConfig | list) or not layers:
        raise ConfigError(f"model.head_layers must be a non-empty list of block indices, got {layers!r}")
    try:
        layers = [int(x) for x in layers]
    except (TypeError, ValueError):
        raise ConfigError(f"model.head_layers must hold integers, got {list(layers)!r}") from None
    bad = [x for x in layers if not 0 <= x < num_layers - 1]
    if bad:
        raise ConfigError(
            f"model.head_layers {bad} out of range for {model.name} ({num_layers} blocks): a head reads the "
            f"output of block 0..{num_layers - 2} (the last block is the full model)"
        )
    if layers != sorted(set(layers)):
        raise ConfigError(f"model.head_layers must be strictly increasing, got {layers}")
    from pipeline.models.backbone import DTYPES

    if str(model.get("dtype")) not in DTYPES:
        raise ConfigError(
            f"model.dtype={model.get('dtype')!r} is not supported; choose one of {sorted(DTYPES)}"
        )
    seq_len = int(_require(cfg, "data.seq_len"))
    max_len = int(model.get("max_seq_len") or 0)
    if seq_len <= 0:
        raise ConfigError(f"data.seq_len must be positive, got {seq_len}")
    if max_len and seq_len > max_len:
        raise ConfigError(
            f"data.seq_len={seq_len} exceeds {model.name}'s maximum sequence length {max_len}; "
            f"set data.seq_len<={max_len}"
        )
    for split, budget in _require(cfg, "data.budgets").items():
        if int(budget) < seq_len:
            raise ConfigError(
                f"data.budgets.{split}={budget} is smaller than one sequence (data.seq_len={seq_len})"
            )
    if model.source == "tiny" and not model.get("tiny"):
        raise ConfigError(
            "model.source=tiny needs a model.tiny block of pretraining settings (see conf/model/tiny.yaml)"
        )
