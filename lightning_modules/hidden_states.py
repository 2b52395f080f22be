"""LightningDataModule over the extract stage's hidden-state shards.

Heads are token-wise (docs/design.md §3), so a training batch is a set of random tokens drawn from every shard,
not a run of consecutive positions. The shards stay memory-mapped; a batch is one `ShardReader.get` call
over its token indices, which reads only those rows.

Split of one extraction directory into training and validation:
  validation = the last `val_tokens` tokens: a fixed, contiguous tail, i.e. the last sequences of the split
               (only the one straddling the boundary shares context with training tokens), or the last
               `val_tokens` of a separate `val_dir`;
  training   = every other token, visited in a fresh random permutation each epoch (no replacement).

The training stream is a pure function of (seed, rank, world size, batch number): batch `k` of rank `r` is
slice `k*world + r` of epoch `k // batches_per_epoch`'s permutation. Hence
  - DDP ranks read disjoint tokens within an epoch;
  - DataLoader worker `w` of `W` produces batches `w, w+W, ...`; the DataLoader interleaves workers in that
    round-robin order, so the stream is identical whatever `num_workers` is, and no two workers repeat;
  - resuming at global step `s` continues the stream at batch `s` instead of replaying its beginning.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from pipeline.data.shards import ShardReader

Batch = tuple[torch.Tensor, torch.Tensor]  # (head hidden [n, n_heads, d] fp32, final hidden [n, d] fp32)


def held_out_range(n_total: int, val_tokens: int) -> tuple[int, int]:
    """[start, stop) of the validation tail of a split with `n_total` tokens.

    The one definition shared by the DataModule and `evaluate_heads`, so trained heads and the logit lens
    are scored on exactly the tokens the training never saw.
    """
    if val_tokens <= 0:
        raise ValueError(f"val_tokens must be positive, got {val_tokens}")
    if val_tokens >= n_total:
        raise ValueError(
            f"val_tokens={val_tokens} leaves no training tokens in a split of {n_total}; lower heads.val_tokens "
            "or extract more tokens (data.budgets.train)"
        )
    return n_total - val_tokens, n_total


class _LazyReader:
    """Opens the ShardReader on first use in each process.

    DataLoader workers (spawn or fork) get a pickled copy of the dataset; pickling an open reader would
    copy the memory maps' contents, so only the directory travels and each worker maps the files itself.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._reader: ShardReader | None = None

    @property
    def reader(self) -> ShardReader:
        if self._reader is None:
            self._reader = ShardReader(self.directory)
        return self._reader

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_reader": None}


class RandomTokenBatches(IterableDataset, _LazyReader):
    """Infinite stream of training batches of `batch_tokens` random tokens from `[0, n_train)`."""

    def __init__(
        self,
        directory: str | Path,
        n_train: int,
        batch_tokens: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
    ):
        _LazyReader.__init__(self, directory)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.n_train, self.batch_tokens, self.seed = int(n_train), int(batch_tokens), int(seed)
        self.rank, self.world_size, self.start_batch = rank, world_size, int(start_batch)
        self.batches_per_epoch = self.n_train // (self.batch_tokens * self.world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{self.n_train} training tokens cannot fill one batch of {self.batch_tokens} tokens on each of "
                f"{self.world_size} ranks; lower heads.batch_tokens or extract more tokens"
            )
        self._epoch_cached: tuple[int, np.ndarray] | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        # Each worker needs at most the current epoch's permutation; regenerating it costs O(n) per epoch.
        if self._epoch_cached is None or self._epoch_cached[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch_cached = (epoch, rng.permutation(self.n_train))
        return self._epoch_cached[1]

    def batch_indices(self, k: int) -> np.ndarray:
        """Token indices of this rank's batch number `k` (global step k, counted from 0)."""
        epoch, j = divmod(k, self.batches_per_epoch)
        start = (j * self.world_size + self.rank) * self.batch_tokens
        return self._permutation(epoch)[start : start + self.batch_tokens]

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        k = self.start_batch + worker
        while True:
            head_hidden, final_hidden, _ = self.reader.get(self.batch_indices(k))
            yield head_hidden, final_hidden
            k += n_workers

    def __getstate__(self) -> dict:
        return {**_LazyReader.__getstate__(self), "_epoch_cached": None}


class ContiguousChunks(Dataset, _LazyReader):
    """Fixed validation tokens `[start, stop)` in chunks of `chunk_tokens` (one chunk = one batch)."""

    def __init__(self, directory: str | Path, start: int, stop: int, chunk_tokens: int):
        _LazyReader.__init__(self, directory)
        self.start, self.stop, self.chunk_tokens = int(start), int(stop), int(chunk_tokens)

    def __len__(self) -> int:
        return -(-(self.stop - self.start) // self.chunk_tokens)

    def __getitem__(self, i: int) -> Batch:
        lo = self.start + i * self.chunk_tokens
        if not 0 <= i < len(self):
            raise IndexError(i)
        head_hidden, final_hidden, _ = self.reader.slice(lo, min(lo + self.chunk_tokens, self.stop))
        return head_hidden, final_hidden


class HiddenStatesDataModule(L.LightningDataModule):
    """Training batches of random tokens and a fixed validation slice, from one extraction split.

    Args:
        train_dir: split directory written by `ShardWriter` (contains `index.json`).
        batch_tokens: tokens per training batch, per rank.
        val_tokens: size of the validation slice (tail of `train_dir`, or of `val_dir` when given).
        val_dir: optional separate split for validation; then all of `train_dir` is used for training.
        num_workers: DataLoader workers for training batches (0 = in the main process).
        seed: seed of the token order; the same seed gives the same batches.
        rank, world_size: data-parallel position; taken from the attached Trainer when there is one.
    """

    def __init__(
        self,
        train_dir: str | Path,
        batch_tokens: int,
        val_tokens: int,
        val_dir: str | Path | None = None,
        num_workers: int = 0,
        seed: int = 0,
        val_batch_tokens: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
    ):
        super().__init__()
        self.train_dir = Path(train_dir)
        self.val_dir = Path(val_dir) if val_dir is not None else None
        self.batch_tokens, self.val_tokens = int(batch_tokens), int(val_tokens)
        self.val_batch_tokens = int(val_batch_tokens or batch_tokens)
        self.num_workers, self.seed = int(num_workers), int(seed)
        self.rank, self.world_size, self.pin_memory = rank, world_size, pin_memory
        # Only sizes are kept: the DataModule is pickled into spawned DDP workers, and pickling an open
        # reader would copy its memory maps' contents. Datasets open their own readers, lazily.
        train_reader = ShardReader(self.train_dir)
        self.n_heads, self.d_model = train_reader.n_slots - 1, train_reader.d_model
        n_total = len(train_reader)
        if self.val_dir is None:
            self.n_train = held_out_range(n_total, self.val_tokens)[0]
            self.val_range = (self.n_train, n_total)
        else:
            self.n_train = n_total
            n_val = len(ShardReader(self.val_dir))
            self.val_range = (max(0, n_val - self.val_tokens), n_val)

    def _position(self) -> tuple[int, int, int]:
        """(rank, world size, first batch number), from the Trainer when attached (after checkpoint restore,
        so a resumed run continues the token stream where it stopped)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return self.rank, self.world_size, 0
        return trainer.global_rank, trainer.world_size, trainer.global_step * trainer.accumulate_grad_batches

    def train_dataset(self) -> RandomTokenBatches:
        rank, world_size, start = self._position()
        return RandomTokenBatches(
            self.train_dir, self.n_train, self.batch_tokens, self.seed, rank, world_size, start_batch=start
        )

    def val_dataset(self) -> ContiguousChunks:
        return ContiguousChunks(self.val_dir or self.train_dir, *self.val_range, self.val_batch_tokens)

    def train_dataloader(self) -> DataLoader:
        # batch_size=None: the dataset already yields whole batches (one vectorised shard read per batch).
        return DataLoader(
            self.train_dataset(),
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            prefetch_factor=4 if self.num_workers > 0 else None,
        )

    def val_dataloader(self) -> DataLoader:
        # Map-style, so under DDP Lightning's DistributedSampler splits the chunks across ranks.
        return DataLoader(
            self.val_dataset(), batch_size=None, shuffle=False, num_workers=0, pin_memory=self.pin_memory
        )
