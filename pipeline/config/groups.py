"""A stage group's values as its schema sees them: typed and defaulted, checked, and reduced to the part that
defines the stage's output (the cache-key rule).

The one cache-key rule (used for every stage by `Stage.key_config`, pipeline/stages/base.py): a stage's key
is its group's resolved config minus the fields the schema marks volatile, plus the facts the stage declares
(seed, model and data facts), hashed with its upstream stages' keys by the store.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from pipeline.config.fields import Settings, is_renamed, is_volatile
from pipeline.config.stages import SCHEMAS
from pipeline.orchestration.validation import ConfigError


def typed_group(group: str, values: Mapping[str, Any] | DictConfig | None) -> DictConfig:
    """`values` merged onto the group's schema: every field present, with its type. A composed config is
    already typed; a hand-built dict (tests, notebooks) gets the defaults it leaves out."""
    schema = SCHEMAS[group]
    if isinstance(values, DictConfig):
        # Resolved where it stands: interpolations (`${size.extract_batch_size}`) point into the whole config.
        values = OmegaConf.to_container(values, resolve=True)
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), values or {})
    except ConfigKeyError as err:
        known = [f.name for f in dataclasses.fields(schema) if not is_renamed(f)]
        raise ConfigError(f"unknown {group} config key: {_first_line(err)}; known: {known}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{group}: {_first_line(err)} (key {err.full_key or '?'})") from None


def group_values(group: str, values: Mapping[str, Any] | DictConfig | None) -> dict[str, Any]:
    """The group's settings as a plain dict, defaults filled in and unknown keys rejected."""
    return OmegaConf.to_container(typed_group(group, values), resolve=True)  # type: ignore[return-value]


def group_settings(cfg: DictConfig, group: str) -> Settings:
    """The group's typed object (a dataclass of pipeline/config/stages.py), every field checked, then
    checked against the rest of the run config. Raises ConfigError naming the key and the fix."""
    settings = OmegaConf.to_object(typed_group(group, cfg.get(group)))
    settings.check(cfg)
    return settings


def group_key(cfg: DictConfig, group: str) -> dict[str, Any]:
    """The part of `cfg[group]` that defines the stage's output: everything except volatile fields (and keys
    kept only to report their new name). A group without a schema is keyed whole."""
    if group not in SCHEMAS:
        return OmegaConf.to_container(cfg[group], resolve=True)  # type: ignore[return-value]
    return _without_volatile(SCHEMAS[group], group_values(group, cfg.get(group)))


def _without_volatile(schema: type, values: dict[str, Any]) -> dict[str, Any]:
    types = typing.get_type_hints(schema)  # resolved: annotations are strings in the schema module
    kept = {}
    for field in dataclasses.fields(schema):
        if is_volatile(field) or is_renamed(field):
            continue
        nested = types[field.name]
        is_schema = isinstance(nested, type) and dataclasses.is_dataclass(nested)
        kept[field.name] = _without_volatile(nested, values[field.name]) if is_schema else values[field.name]
    return kept


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__
