"""Finding a model's finished stage outputs in the stage store, for tools outside the runner (benchmarks).

The runner knows its entries' keys from the config it composed; a tool pointed at an outputs directory does
not. `latest_outputs` picks the newest finished `calibrate` entry of a model and the backbone, heads and
extract entries it was computed from (its recorded upstream keys), so the pieces always belong together.
Read-only: entries are read through `StageStore` (records, checksums) and never written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.orchestration.store import SUCCESS_FILE, StageStore


def finished_keys(store: StageStore, stage: str, model: str) -> list[str]:
    """Keys of a stage's finished entries for `model`, newest first (recorded start, then completion time)."""
    directory = store.entry(stage, model, "-").parent
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        if entry.is_dir() and store.is_complete(stage, model, entry.name):
            try:
                started = store.record(stage, model, entry.name).get("started", "")
            except ValueError:  # an unreadable record: not a usable entry
                continue
            found.append((started, (entry / SUCCESS_FILE).stat().st_mtime, entry.name))
    return [key for *_, key in sorted(found, reverse=True)]


@dataclass(frozen=True)
class StageOutputs:
    """Finished entries of one model that belong together: stage -> key (a missing stage is absent)."""

    store: StageStore
    model: str
    keys: dict[str, str]

    def entry(self, stage: str) -> Path | None:
        return self.store.entry(stage, self.model, self.keys[stage]) if stage in self.keys else None

    def record(self, stage: str) -> dict[str, Any]:
        return self.store.record(stage, self.model, self.keys[stage])

    def verify(self) -> None:
        """Check every entry's files against its completion record (raises `StageOutputError`)."""
        for stage, key in self.keys.items():
            self.store.verify(stage, self.model, key)


def _with_upstream(store: StageStore, stage: str, model: str, key: str) -> dict[str, str]:
    """`stage`'s entry and those of its recorded upstream stages that are finished."""
    upstream = store.record(stage, model, key).get("upstream", {})
    found = {name: k for name, k in upstream.items() if store.is_complete(name, model, k)}
    return {**found, stage: key}


def latest_outputs(store: StageStore, model: str) -> StageOutputs | None:
    """The newest finished calibrate entry whose backbone and heads are finished, with those entries (and
    extract's); without one, the newest heads entry with its backbone (no thresholds). None if neither."""
    for stage in ("calibrate", "heads"):
        for key in finished_keys(store, stage, model):
            keys = _with_upstream(store, stage, model, key)
            if "backbone" in keys and "heads" in keys:
                return StageOutputs(store, model, keys)
    return None
