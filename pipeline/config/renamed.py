"""Config keys renamed by issue 13, reported with their new name instead of being silently ignored.

A whole group that was renamed (`evaluate` -> `early_exit`) stays declared at the top level as an open, empty
node (stored below as `renamed_keys`, listed in conf/config.yaml), so `evaluate.limit=8` still composes;
a key that moved between groups stays declared in its old group's schema (`renamed_to(...)` fields of
pipeline/config/stages.py). `check_renamed` then fails with the override to use instead.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.config.fields import override_text
from pipeline.config.stages import SCHEMAS
from pipeline.orchestration.validation import ConfigError

RENAMED_GROUPS = {"evaluate": "early_exit"}


def renamed_keys_node() -> DictConfig:
    """The placeholder every renamed group gets in the composed config: empty, and open to any key."""
    node = OmegaConf.create({old: {} for old in RENAMED_GROUPS})
    for old in RENAMED_GROUPS:
        OmegaConf.set_struct(node[old], False)
    return node


def renamed_fields() -> dict[str, str]:
    """Old dotted key -> new dotted key, for every key that moved between stage groups."""
    moved = {}
    for group, schema in SCHEMAS.items():
        for field in dataclasses.fields(schema):
            if "renamed_to" in field.metadata:
                moved[f"{group}.{field.name}"] = field.metadata["renamed_to"]
    return moved


def check_renamed(cfg: DictConfig) -> None:
    """Fail on any value set under a renamed key, naming the override that replaces it."""
    for old, new in RENAMED_GROUPS.items():
        node = cfg.get(old)
        if node:
            leaves = _leaves(OmegaConf.to_container(node, resolve=False), old)
            uses = " ".join(f"{new}{key[len(old) :]}={override_text(value)}" for key, value in leaves)
            raise ConfigError(f"config key `{old}` was renamed to `{new}` (issue 13): use {uses}")
    for old, new in renamed_fields().items():
        value = OmegaConf.select(cfg, old, default=None)
        if value is not None:
            shown = override_text(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)
            raise ConfigError(f"config key `{old}` was renamed to `{new}` (issue 13): use {new}={shown}")


def _leaves(value: Any, prefix: str) -> list[tuple[str, Any]]:
    if isinstance(value, dict) and value:
        return [leaf for key, sub in value.items() for leaf in _leaves(sub, f"{prefix}.{key}")]
    return [(prefix, value)]
