"""Hidden-state shards written by the extract stage and read (memory-mapped) by every later stage.

Layout of one split, e.g. `<extract dir>/train/`:
  hidden_00000.npy   float16 [n_tokens, n_heads + 1, d_model]: slot h < n_heads is the pre-norm residual after
                     block `layers[h]`; the last slot is the final post-norm hidden state (teacher logits are
                     `lm_head(final)`, recomputed when needed, never stored).
  tokens_00000.npy   int32 [n_tokens]: the input token at each position.
  index.json         shard list with token counts, and each file's size and sha256.

Each shard is hashed once, as its bytes are written (`pipeline/data/checksums.py`); the stage store's
completion record reuses those digests instead of reading the shards back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.data.checksums import file_sha256, save_npy

INDEX_FILE = "index.json"
STORE_DTYPE = np.float16


class ShardCorruptError(RuntimeError):
    """A shard does not match its recorded checksum or shape."""


class ShardWriter:
    """Appends token rows to fixed-size shards of one split."""

    def __init__(self, directory: str | Path, n_slots: int, d_model: int, shard_tokens: int = 65536):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.n_slots, self.d_model, self.shard_tokens = n_slots, d_model, shard_tokens
        self._hidden: list[np.ndarray] = []
        self._tokens: list[np.ndarray] = []
        self._buffered = 0
        self.shards: list[dict] = []

    def add(self, hidden: torch.Tensor, tokens: torch.Tensor) -> None:
        """hidden: [n, n_slots, d_model] (any float dtype); tokens: [n]."""
        if hidden.shape[1:] != (self.n_slots, self.d_model):
            raise ValueError(
                f"expected hidden rows of shape (*, {self.n_slots}, {self.d_model}), got {tuple(hidden.shape)}"
            )
        with np.errstate(over="ignore"):  # overflow is reported below, with the fix
            as_fp16 = hidden.detach().to("cpu", torch.float32).numpy().astype(STORE_DTYPE)
        if not np.isfinite(as_fp16).all():
            raise OverflowError(
                "hidden states overflow float16 (values beyond ±65504); this backbone needs bf16 storage"
            )
        self._hidden.append(as_fp16)
        self._tokens.append(tokens.detach().to("cpu").numpy().astype(np.int32))
        self._buffered += len(as_fp16)
        while self._buffered >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, n: int) -> None:
        hidden = np.concatenate(self._hidden)
        tokens = np.concatenate(self._tokens)
        k = len(self.shards)
        hidden_file, tokens_file = f"hidden_{k:05d}.npy", f"tokens_{k:05d}.npy"
        hidden_sha, hidden_bytes = save_npy(self.directory / hidden_file, hidden[:n])
        tokens_sha, tokens_bytes = save_npy(self.directory / tokens_file, tokens[:n])
        self.shards.append(
            {
                "hidden": hidden_file,
                "tokens": tokens_file,
                "n_tokens": int(n),
                "sha256": {hidden_file: hidden_sha, tokens_file: tokens_sha},
                "bytes": {hidden_file: hidden_bytes, tokens_file: tokens_bytes},
            }
        )
        self._hidden, self._tokens = [hidden[n:]], [tokens[n:]]
        self._buffered = len(hidden) - n

    def close(self) -> dict:
        if self._buffered:
            self._flush(self._buffered)
        index = {
            "n_slots": self.n_slots,
            "d_model": self.d_model,
            "dtype": "float16",
            "n_tokens": sum(s["n_tokens"] for s in self.shards),
            "shards": self.shards,
        }
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=1))
        return index


@dataclass
class ShardReader:
    """Random access to one split's tokens across all shards, without loading them into memory."""

    directory: Path
    verify: bool = False

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        index_path = self.directory / INDEX_FILE
        if not index_path.is_file():
            raise FileNotFoundError(f"no hidden-state index at {index_path}; run the extract stage first")
        self.index = json.loads(index_path.read_text())
        if self.verify:
            self.verify_checksums()
        self._hidden = [np.load(self.directory / s["hidden"], mmap_mode="r") for s in self.index["shards"]]
        self._tokens = [np.load(self.directory / s["tokens"], mmap_mode="r") for s in self.index["shards"]]
        for shard, hidden in zip(self.index["shards"], self._hidden, strict=True):
            if hidden.shape != (shard["n_tokens"], self.n_slots, self.d_model):
                raise ShardCorruptError(
                    f"{self.directory / shard['hidden']} has shape {hidden.shape}, index says "
                    f"{(shard['n_tokens'], self.n_slots, self.d_model)}; recompute with force=true"
                )
        self.offsets = np.cumsum([0] + [s["n_tokens"] for s in self.index["shards"]])

    @property
    def n_slots(self) -> int:
        return int(self.index["n_slots"])

    @property
    def d_model(self) -> int:
        return int(self.index["d_model"])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def verify_checksums(self) -> None:
        """Re-read every shard and compare it with the size and sha256 recorded when it was written."""
        for shard in self.index["shards"]:
            for name, expected in shard["sha256"].items():
                path = self.directory / name
                size = shard.get("bytes", {}).get(name)  # indexes written before sizes were recorded lack it
                if not path.is_file():
                    problem = "is missing"
                elif size is not None and path.stat().st_size != size:
                    problem = f"has {path.stat().st_size} bytes, expected {size} (truncated?)"
                elif file_sha256(path) != expected:
                    problem = "does not match its checksum (altered or corrupt)"
                else:
                    continue
                raise ShardCorruptError(
                    f"shard {path} {problem}; recompute the extraction with force=true (or force=[extract])"
                )

    def get(self, token_indices: np.ndarray | list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows at global token indices: (head hidden [n, n_heads, d], final hidden [n, d], tokens [n]),
        as float32/int64 tensors in the order asked."""
        token_indices = np.asarray(token_indices, dtype=np.int64)
        order = np.argsort(token_indices, kind="stable")
        sorted_idx = token_indices[order]
        shard_of = np.searchsorted(self.offsets, sorted_idx, side="right") - 1
        rows = np.empty((len(sorted_idx), self.n_slots, self.d_model), dtype=STORE_DTYPE)
        toks = np.empty(len(sorted_idx), dtype=np.int64)
        for shard in np.unique(shard_of):
            mask = shard_of == shard
            local = sorted_idx[mask] - self.offsets[shard]
            rows[mask] = self._hidden[shard][local]
            toks[mask] = self._tokens[shard][local]
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        rows, toks = rows[inverse], toks[inverse]
        hidden = torch.from_numpy(rows.astype(np.float32))
        return hidden[:, :-1], hidden[:, -1], torch.from_numpy(toks)

    def slice(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.get(np.arange(start, min(stop, len(self))))
