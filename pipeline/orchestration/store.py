"""The stage store: content-addressed, crash-safe output directories.

    <cache>/<stage>/<model>/<key>/            a finished output (has _SUCCESS.json)
    <cache>/<stage>/<model>/<key>.partial/    work in progress (never read by other stages)
    <cache>/<stage>/<model>/<key>.lock        held while computing, so two processes never compute it twice

A finished output is published by renaming the partial directory into place *after* its completion record
is written, so a crash at any moment leaves either nothing or a `.partial` directory — never something that
looks finished. The completion record holds the config, upstream keys, versions, git revision, timings,
metrics and a sha256 of every file, which `verify` checks before a stage's output is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from pipeline.exits.heads import file_sha256

log = logging.getLogger(__name__)

SUCCESS_FILE = "_SUCCESS.json"
KEY_LENGTH = 12
TRACKED_PACKAGES = (
    "torch",
    "transformers",
    "lightning",
    "hydra-core",
    "datasets",
    "tokenizers",
    "lm_eval",
    "numpy",
    "pandas",
    "wandb",
    "safetensors",
)


class StageOutputError(RuntimeError):
    """A stage's stored output is missing, incomplete or corrupt."""


def stage_key(stage: str, key_config: Any, upstream_keys: dict[str, str]) -> str:
    """Hash of the stage's own config subtree plus its upstream stages' keys."""
    payload = json.dumps(
        {"stage": stage, "config": key_config, "upstream": upstream_keys}, sort_keys=True, default=str
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:KEY_LENGTH]


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def git_revision() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def checksum_tree(directory: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under `directory` (relative paths), except the completion record."""
    sums = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != SUCCESS_FILE:
            sums[path.relative_to(directory).as_posix()] = {
                "sha256": file_sha256(path),
                "bytes": path.stat().st_size,
            }
    return sums


@dataclass
class StageStore:
    root: Path
    lock_timeout_s: float = -1  # wait forever for another process by default

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    def entry(self, stage: str, model: str, key: str) -> Path:
        return self.root / stage / model.replace("/", "--") / key

    def is_complete(self, stage: str, model: str, key: str) -> bool:
        return (self.entry(stage, model, key) / SUCCESS_FILE).is_file()

    def record(self, stage: str, model: str, key: str) -> dict[str, Any]:
        path = self.entry(stage, model, key) / SUCCESS_FILE
        if not path.is_file():
            raise StageOutputError(
                f"stage {stage!r} has no finished output at {path.parent}; run stages=[{stage}]"
            )
        return json.loads(path.read_text())

    def verify(self, stage: str, model: str, key: str, full: bool = True) -> None:
        """Check every file against the completion record: sizes always, sha256 when `full`."""
        directory = self.entry(stage, model, key)
        record = self.record(stage, model, key)
        for rel, expected in record.get("files", {}).items():
            path = directory / rel
            problem = None
            if not path.is_file():
                problem = "is missing"
            elif path.stat().st_size != expected["bytes"]:
                problem = f"has {path.stat().st_size} bytes, expected {expected['bytes']} (truncated?)"
            elif full and file_sha256(path) != expected["sha256"]:
                problem = "does not match its checksum (altered or corrupt)"
            if problem:
                raise StageOutputError(
                    f"{path} {problem}. Recompute the {stage} stage with force=[{stage}] (its output is in {directory})"
                )

    @contextmanager
    def lock(self, stage: str, model: str, key: str) -> Iterator[None]:
        final = self.entry(stage, model, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(final) + ".lock", timeout=self.lock_timeout_s)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("%s for %s (%s) is being computed by another process; waiting for it", stage, model, key)
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    @contextmanager
    def writing(
        self, stage: str, model: str, key: str, record: dict[str, Any], resumable: bool = False
    ) -> Iterator[tuple[Path, dict[str, Any]]]:
        """Yield (work directory, mutable record). On normal exit the record gets checksums and timings and
        the directory is published atomically; on an exception nothing is published. Call under `lock`."""
        final = self.entry(stage, model, key)
        partial = final.with_name(final.name + ".partial")
        if partial.exists() and not resumable:
            shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
        started = time.time()
        yield partial, record
        record.update(
            {
                "stage": stage,
                "model": model,
                "key": key,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                "seconds": round(time.time() - started, 3),
                "versions": package_versions(),
                "git_revision": git_revision(),
                "host": platform.node(),
            }
        )
        record["files"] = checksum_tree(partial)
        (partial / SUCCESS_FILE).write_text(json.dumps(record, indent=2, default=str))
        if final.exists():
            # A forced recompute: the old output stays intact until the new one is complete.
            retired = final.with_name(f"{final.name}.old-{os.getpid()}")
            final.rename(retired)
            partial.rename(final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            partial.rename(final)
