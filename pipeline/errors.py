"""The errors a user can cause and fix; the entry point prints them as one clear line, without a traceback."""

from __future__ import annotations

from pipeline.backbone import BackboneError
from pipeline.heads import HeadsMismatchError
from pipeline.shards import ShardCorruptError
from pipeline.store import StageOutputError
from pipeline.validation import ConfigError

USER_ERRORS: tuple[type[BaseException], ...] = (
    BackboneError,
    ConfigError,
    HeadsMismatchError,
    ShardCorruptError,
    StageOutputError,
    FileNotFoundError,
)
