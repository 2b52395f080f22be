"""Building blocks of the stage config schemas: a field that carries its own range check and its role in the
cache key, and the base class that runs those checks.

OmegaConf builds the typed object of a group with `OmegaConf.to_object`, which calls the dataclass's
`__init__` and so `__post_init__`: that is where every field's check runs, once, with the key name in the
message. Types (an int where an int belongs) are checked earlier, by OmegaConf when Hydra composes the config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

from omegaconf import DictConfig

from pipeline.orchestration.validation import ConfigError

# A check returns what is wrong with a value (completing "<key>=<value>: ..."), or None when it is fine.
Check = Callable[[Any], str | None]


def setting(
    default: Any = dataclasses.MISSING,
    *,
    factory: Callable[[], Any] | None = None,
    check: Check | None = None,
    volatile: bool = False,
) -> Any:
    """A schema field. `volatile` marks a setting that does not change a stage's results (batch sizes, worker
    counts, storage layout): it is left out of the stage's cache key, so changing it reuses finished outputs."""
    metadata = {"check": check, "volatile": volatile}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def renamed_to(new_key: str) -> Any:
    """A key that moved to another group (issue 13). It stays declared so an old override still composes, and
    is reported with its new name (pipeline/config/renamed.py) instead of being silently ignored."""
    return dataclasses.field(default=None, metadata={"renamed_to": new_key})


def is_volatile(field: dataclasses.Field) -> bool:
    return bool(field.metadata.get("volatile"))


def is_renamed(field: dataclasses.Field) -> bool:
    return "renamed_to" in field.metadata


# --- checks -----------------------------------------------------------------------------------------------------


def at_least(minimum: int | float) -> Check:
    return lambda value: None if value >= minimum else f"must be >= {minimum}"


def greater_than(minimum: int | float) -> Check:
    return lambda value: None if value > minimum else f"must be > {minimum}"


def within(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Check:
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"

    def check(value: float) -> str | None:
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        return None if above and below else f"must lie in {interval}"

    return check


def one_of(choices: Iterable[str] | Callable[[], Iterable[str]]) -> Check:
    """`choices` may be a function, so the schema names a registry (confidence metrics, fill policies) without
    importing torch when the config is composed."""

    def check(value: str) -> str | None:
        allowed = list(choices() if callable(choices) else choices)
        return None if value in allowed else f"choose one of {allowed}"

    return check


def each(item_check: Check, *, non_empty: bool = True) -> Check:
    def check(values: list) -> str | None:
        if non_empty and not values:
            return "must not be empty"
        for value in values:
            problem = item_check(value)
            if problem is not None:
                return f"entry {value!r} {problem}" if problem.startswith("must") else f"{value!r}: {problem}"
        return None

    return check


def optional(item_check: Check) -> Check:
    return lambda value: None if value is None else item_check(value)


# --- the base class ---------------------------------------------------------------------------------------------


class Settings:
    """Base of every schema dataclass. `KEY` is the node's dotted config key, for messages."""

    KEY: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            check = field.metadata.get("check")
            value = getattr(self, field.name)
            problem = check(value) if check is not None else None
            if problem is not None:
                raise ConfigError(f"{self.KEY}.{field.name}={_shown(value)}: {problem}")

    def check(self, cfg: DictConfig) -> None:
        """Checks against other groups (ε subsets of calibrate.eps, lengths against the model); none by
        default. `cfg` is the whole run config."""


def _shown(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "[" + ",".join(_shown(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def override_text(value: Any) -> str:
    """A value written as on the command line (`[0.8,0.9]`, `null`, `true`)."""
    return _shown(value)
