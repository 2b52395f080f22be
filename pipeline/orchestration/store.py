"""The stage store: content-addressed, crash-safe output directories.

    <cache>/<stage>/<model>/<key>/            a finished output (has _SUCCESS.json)
    <cache>/<stage>/<model>/<key>.partial/    work in progress (never read by other stages)
    <cache>/<stage>/<model>/<key>.lock        held while computing, so two processes never compute it twice

A finished output is published by renaming the partial directory into place *after* its completion record
is written, so a crash at any moment leaves either nothing or a `.partial` directory — never something that
looks finished. The completion record holds the config, upstream keys, versions, git revision, timings,
metrics and the size, mtime and sha256 of every file, which `verify` checks before a stage's output is used.

Checksums cost a full read of every file, and an extraction holds ~92 GB of shards at Pythia scale (1.5–3 min
per pass). So each file is hashed once: shards as their bytes are written (pipeline/data/checksums.py), every
other file when the output is published. On reuse, `verify` then checks
  - every file: present, and exactly the recorded size (catches truncation and partial copies);
  - files under LARGE_FILE_BYTES (heads, thresholds, tables, indexes: small): the full sha256;
  - large files (shards): the full sha256 only when the modification time differs from the record (a rewrite,
    a copy without preserved times) — otherwise size and mtime are trusted.
The trade-off: a same-size, in-place change of a large file that also restores its mtime passes the reuse
check. An explicit `verify(..., full=True)`, or `python -m pipeline.orchestration.store <cache dir>`,
re-hashes everything.
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

from pipeline.data.checksums import file_sha256, recorded_sha256

log = logging.getLogger(__name__)

SUCCESS_FILE = "_SUCCESS.json"
# Files at least this large are re-hashed on reuse only when their size or mtime changed (see above).
LARGE_FILE_BYTES = 64 * 2**20
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
    """sha256, size and mtime of every file under `directory` (relative paths), except the completion record.
    A file whose sha256 was computed while this process wrote it (shards) is not read again."""
    sums = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != SUCCESS_FILE:
            stat = path.stat()
            sums[path.relative_to(directory).as_posix()] = {
                "sha256": recorded_sha256(path) or file_sha256(path),
                "bytes": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
            }
    return sums


def file_problems(
    directory: Path, files: dict[str, dict[str, Any]], full: bool
) -> Iterator[tuple[Path, str]]:
    """(path, what is wrong) for each file that does not match its completion-record entry; see the module
    docstring for which files are re-hashed when `full` is false."""
    for rel, expected in files.items():
        path = directory / rel
        if not path.is_file():
            yield path, "is missing"
            continue
        stat = path.stat()
        if stat.st_size != expected["bytes"]:
            yield path, f"has {stat.st_size} bytes, expected {expected['bytes']} (truncated?)"
            continue
        # Records written before mtimes were recorded have none: their large files are re-hashed.
        unchanged = stat.st_mtime_ns == expected.get("mtime_ns")
        if (full or stat.st_size < LARGE_FILE_BYTES or not unchanged) and file_sha256(path) != expected[
            "sha256"
        ]:
            yield path, "does not match its checksum (altered or corrupt)"


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

    def verify(self, stage: str, model: str, key: str, full: bool = False) -> None:
        """Check every file against the completion record: presence and size always, the sha256 of small
        files and of large files whose mtime changed; the sha256 of every file when `full`."""
        directory = self.entry(stage, model, key)
        record = self.record(stage, model, key)
        for path, problem in file_problems(directory, record.get("files", {}), full):
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


def verify_tree(root: str | Path, full: bool = True) -> list[str]:
    """Check every finished output under a cache root (`<root>/<stage>/<model>/<key>/`); one line per file
    that is missing, resized or altered (every file re-hashed when `full`)."""
    problems = []
    for record_path in sorted(Path(root).glob(f"*/*/*/{SUCCESS_FILE}")):
        files = json.loads(record_path.read_text()).get("files", {})
        problems += [f"{path} {problem}" for path, problem in file_problems(record_path.parent, files, full)]
    return problems


def main(argv: list[str] | None = None) -> None:
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m pipeline.orchestration.store",
        description="Re-hash every file of every finished stage output under a cache directory "
        "(outputs/cache by default) and list the ones that do not match their completion record.",
    )
    parser.add_argument("cache", nargs="?", default="outputs/cache")
    parser.add_argument(
        "--quick", action="store_true", help="the reuse check only (sizes, mtimes, small files)"
    )
    args = parser.parse_args(argv)
    if not Path(args.cache).is_dir():
        parser.error(
            f"{args.cache} is not a directory (the cache is <paths.root>/cache, outputs/cache by default)"
        )
    problems = verify_tree(args.cache, full=not args.quick)
    for line in problems:
        print(line)
    n_outputs = len(list(Path(args.cache).glob(f"*/*/*/{SUCCESS_FILE}")))
    print(f"{n_outputs} finished outputs checked, {len(problems)} problem(s)", file=sys.stderr)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
