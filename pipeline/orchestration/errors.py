"""The errors a user can cause and fix; the entry point prints them as one clear line, without a traceback."""

from __future__ import annotations

from pipeline.data.shards import ShardCorruptError
from pipeline.data.tokens import DataUnavailableError
from pipeline.exits.heads import HeadsMismatchError
from pipeline.models.backbone import BackboneError
from pipeline.orchestration.store import StageOutputError
from pipeline.orchestration.validation import ConfigError

USER_ERRORS: tuple[type[BaseException], ...] = (
    BackboneError,
    ConfigError,
    DataUnavailableError,
    HeadsMismatchError,
    ShardCorruptError,
    StageOutputError,
    FileNotFoundError,
)
