"""Token streams: documents -> tokens -> fixed-length blocks, per split, under a token budget.

One interface for every corpus (`TextSource`): the offline stdlib corpus (`local_text`) and MiniPile
(`minipile`, streamed from the hub). Downstream code (pretraining, extraction) only sees
`token_blocks(...)`, a `[n_blocks, seq_len]` LongTensor, so switching corpora is a config change.

Blocks are cut from one continuous stream in which every document is followed by the EOS token (the
GPT-NeoX/Pythia convention): no padding, no wasted positions, and a block may span a document boundary
exactly as in Pythia's own pretraining.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from pipeline.data.corpus import SPLITS, LocalTextCorpus, SplitSize
from pipeline.orchestration.validation import ConfigError

log = logging.getLogger(__name__)

# Documents are tokenized in batches (the fast tokenizer parallelises within a batch) that start at one
# document and double up to this size, so a small budget does not tokenize dozens of whole files.
_TOKENIZE_BATCH = 64


class DataUnavailableError(RuntimeError):
    """A configured corpus cannot be read here (e.g. MiniPile without network); the message says what to do."""


class BudgetError(ConfigError):
    """A split holds fewer tokens than its budget asks for; the message names the split, its size, the
    budget and the fix."""


@runtime_checkable
class TextSource(Protocol):
    """A corpus split into train / validation / test documents, identified by a content fingerprint.

    A source may also offer `split_size(split) -> SplitSize | None` (bytes and documents, without
    tokenizing): the budget preflight (pipeline/data/preflight.py) uses it to settle most budgets at once.
    """

    name: str

    def documents(self, split: str) -> Iterator[str]: ...

    @property
    def fingerprint(self) -> str: ...


class MiniPileSource:
    """MiniPile streamed from the hub (`datasets.load_dataset(..., streaming=True)`), text field "text".

    Streaming keeps disk use at zero and reads only as many documents as the budget needs. MiniPile
    ships its own train / validation / test splits (1,000,000 / 500 / 10,000 documents; 5.9 GB / 2.8 MB /
    58.6 MB of text), so no split fractions apply; `split_size` reads those numbers from the dataset card's
    metadata. The fingerprint names the dataset and revision (a streamed hub dataset cannot be hashed
    without downloading it all); pin `revision` for reproducible caches.

    `hub_id` may also be a local directory laid out like the hub repository (README.md with its
    `dataset_info` metadata, data/<split>-*.parquet): a local copy, read through the same `datasets` calls
    without the network (the tests use one).
    """

    name = "minipile"

    def __init__(
        self, hub_id: str = "JeanKaddour/minipile", revision: str | None = None, text_field: str = "text"
    ) -> None:
        self.hub_id = hub_id
        self.revision = revision
        self.text_field = text_field

    @property
    def fingerprint(self) -> str:
        key = f"minipile;hub_id={self.hub_id};revision={self.revision or 'main'};field={self.text_field}"
        return hashlib.sha256(key.encode()).hexdigest()

    @property
    def is_local(self) -> bool:
        return Path(self.hub_id).is_dir()

    def _require_reachable(self, what: str) -> None:
        from pipeline.models.backbone import hub_reachable

        # Streaming has no local cache to fall back on, and `datasets` would otherwise retry for minutes.
        if not self.is_local and not hub_reachable():
            raise DataUnavailableError(
                f"cannot stream {self.hub_id!r} ({what}): the Hugging Face hub is unreachable. Use the offline "
                "corpus instead (data=local_text, the default), a local copy (data.hub_id=/path/to/minipile), "
                "or run where the hub is reachable."
            )

    def documents(self, split: str) -> Iterator[str]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {list(SPLITS)}")
        self._require_reachable(split)
        from datasets import load_dataset

        revision = None if self.is_local else self.revision
        dataset = load_dataset(self.hub_id, split=split, streaming=True, revision=revision)
        for row in dataset:
            text = row[self.text_field]
            if text:
                yield text

    def split_size(self, split: str) -> SplitSize | None:
        """Bytes and documents of `split` from the dataset card's `dataset_info` metadata (one small read,
        no data streamed); None when the card does not list the split."""
        info = self._split_infos.get(split)
        if info is None or not info.num_bytes:
            return None
        return SplitSize(int(info.num_bytes), int(info.num_examples), "the dataset's metadata")

    @functools.cached_property
    def _split_infos(self) -> dict[str, Any]:
        self._require_reachable("split sizes")
        from datasets import load_dataset_builder

        revision = None if self.is_local else self.revision
        return dict(load_dataset_builder(self.hub_id, revision=revision).info.splits or {})

    def __repr__(self) -> str:
        return f"MiniPileSource(hub_id={self.hub_id!r}, revision={self.revision!r})"


def make_text_source(data_cfg: Mapping[str, Any]) -> TextSource:
    """Build the corpus a `conf/data/*.yaml` config describes (dispatch on `kind`)."""
    kind = data_cfg.get("kind")
    if kind == "local_text":
        fractions = data_cfg.get("split_fractions")
        return _local_corpus(
            tuple(sorted(dict(fractions).items())) if fractions else None,
            int(data_cfg.get("split_seed", 0)),
            data_cfg.get("root"),
        )
    if kind == "minipile":
        return MiniPileSource(
            hub_id=data_cfg.get("hub_id", "JeanKaddour/minipile"),
            revision=data_cfg.get("revision"),
            text_field=data_cfg.get("text_field", "text"),
        )
    raise ValueError(f"unknown data kind {kind!r}; known kinds: 'local_text', 'minipile'")


@functools.lru_cache(maxsize=8)
def _local_corpus(fractions: tuple | None, split_seed: int, root: str | None) -> LocalTextCorpus:
    """One corpus object per setting in a process: several stages' cache keys and checks need its
    fingerprint, which hashes every file (reads still verify each file against that hash)."""
    return LocalTextCorpus(
        split_fractions=dict(fractions) if fractions else None, split_seed=split_seed, root=root
    )


def _eos_id(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no EOS token to separate documents")
    return int(eos)


def iter_token_ids(source: TextSource, tokenizer: Any, split: str) -> Iterator[list[int]]:
    """Each document of `split` as token ids followed by EOS, in the source's deterministic order."""
    eos = _eos_id(tokenizer)
    batch: list[str] = []
    batch_size = 1

    def encode(texts: list[str]) -> list[list[int]]:
        # verbose=False: documents are longer than the model's context by design (they are chopped
        # later), so the "sequence longer than the maximum" warning is noise here.
        return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]

    for text in source.documents(split):
        batch.append(text)
        if len(batch) == batch_size:
            for ids in encode(batch):
                yield [*ids, eos]
            batch = []
            batch_size = min(2 * batch_size, _TOKENIZE_BATCH)
    if batch:
        for ids in encode(batch):
            yield [*ids, eos]


def count_tokens(source: TextSource, tokenizer: Any, split: str, stop_at: int | None = None) -> int:
    """Tokens in `split` as `token_blocks` streams them (each document + EOS); stops counting once `stop_at`
    is reached, so checking a budget costs at most the budget's worth of tokenizing."""
    total = 0
    for ids in iter_token_ids(source, tokenizer, split):
        total += len(ids)
        if stop_at is not None and total >= stop_at:
            break
    return total


def budget_error(
    source: TextSource, split: str, budget: int, seq_len: int, available: str, fits: int, key: str
) -> BudgetError:
    """The one message for a split too small for its budget: the split, what it holds, the budget, the fix.

    `available` says what the split holds (and how that is known); `fits` is the largest budget it can hold."""
    name = getattr(source, "name", type(source).__name__)
    fix = f"lower {key} to at most {fits:,} ({fits // seq_len} blocks of data.seq_len={seq_len})"
    if name == "local_text":
        fix += f", or give the split more text (data.split_fractions.{split})"
    elif name == "minipile":
        fix += " (MiniPile's splits are fixed: 500 validation and 10,000 test documents)"
    return BudgetError(
        f"{key}={int(budget):,} tokens cannot come from the {split} split of {name}: it holds {available}. "
        f"Fix: {fix}."
    )


def token_blocks(
    source: TextSource,
    tokenizer: Any,
    split: str,
    n_tokens: int,
    seq_len: int,
    budget_key: str | None = None,
    allow_short: bool = False,
) -> torch.LongTensor:
    """The first `n_tokens` tokens of `split` as a `[n_tokens // seq_len, seq_len]` LongTensor.

    The budget is rounded down to whole blocks. Raises BudgetError (a ConfigError) when the split holds fewer
    tokens than the budget, unless `allow_short`, which returns every whole block there is (at least one); `budget_key`
    names the config key that set the budget, for the message (default `data.budgets.<split>`).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    n_blocks = int(n_tokens) // int(seq_len)
    key = budget_key or f"data.budgets.{split}"
    if n_blocks < 1:
        raise ValueError(f"token budget {n_tokens} ({key}) is smaller than one block of seq_len={seq_len}")
    needed = n_blocks * seq_len

    out = torch.empty(needed, dtype=torch.long)
    filled = 0
    for ids in iter_token_ids(source, tokenizer, split):
        take = min(len(ids), needed - filled)
        out[filled : filled + take] = torch.tensor(ids[:take], dtype=torch.long)
        filled += take
        if filled == needed:
            break
    if filled < needed and allow_short and filled >= seq_len:
        n_blocks = filled // seq_len
        return out[: n_blocks * seq_len].view(n_blocks, seq_len)
    if filled < needed:
        fits = filled // seq_len * seq_len
        raise budget_error(source, split, n_tokens, seq_len, f"only {filled:,} tokens", fits, key)
    return out.view(n_blocks, seq_len)


def max_sequence_length(model_or_config: Any, tokenizer: Any | None = None) -> int:
    """The longest sequence the model (and tokenizer, when given) supports.

    GPT-NeoX reads positions up to `max_position_embeddings`; tokenizers report a `model_max_length`
    that is a huge sentinel when unset, so it only counts when it is a plausible number.
    """
    config = getattr(model_or_config, "config", model_or_config)
    limits = [int(v) for v in (getattr(config, "max_position_embeddings", None),) if v]
    tok_max = getattr(tokenizer, "model_max_length", None) if tokenizer is not None else None
    if tok_max and int(tok_max) < 1_000_000:
        limits.append(int(tok_max))
    if not limits:
        raise ValueError(f"cannot tell the maximum sequence length of {type(config).__name__}")
    return min(limits)


def check_seq_len(
    seq_len: int, model_or_config: Any, tokenizer: Any | None = None, key: str = "data.seq_len"
) -> None:
    """Raise a clear ValueError when `seq_len` exceeds what the model/tokenizer can take."""
    limit = max_sequence_length(model_or_config, tokenizer)
    if int(seq_len) > limit:
        raise ValueError(
            f"{key}={seq_len} exceeds the model's maximum sequence length {limit}; set {key} <= {limit}"
        )
