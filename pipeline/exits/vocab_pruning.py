"""Vocabulary-pruned heads: a cheap confidence signal (docs/design.md §1.3, issue 14).

A full early-exit head costs d·V multiply-adds per token; a token that does not exit pays that for every head
it tries. A *pruned view* of a trained head computes its logits only over a candidate set of K token ids
(cost d·K) and returns them in full-vocabulary form, with -inf outside the set. Every confidence metric,
the exit decision (`ExitPolicy`), calibration and the token-level evaluation then work on the view as they do
on the full head: a signal named `logit_margin@top512` is the `logit_margin` metric of the view over the 512
most frequent tokens (dynamic vocabulary pruning for early exits, Vincenti et al. 2024). A config may give K as
a share of the vocabulary, `logit_margin@top12.5%`, resolved per model (`resolve_signal`: 512 of 4,096 tokens).

The candidate set is the K most frequent tokens of the extracted train split (every position's input token is
its predecessor's next token, so this is the next-token frequency). It is fixed once, before calibration, and
travels inside the thresholds artifact (`ExitThresholds.candidates`), so decoding uses exactly the set the
thresholds were calibrated on.

What a token exiting through a view emits: the engine's step (DSSD's drafts) takes the view's argmax, the most
likely *candidate*; DSSD stays lossless because verification decides. Lossy early exit emits the head's own
prediction: where the gate opens it evaluates the head's full logits once (`ExitPolicy.cascade` for scoring,
the `EarlyExit` strategy for generation), which is what calibration judges (the head's full argmax).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.shards import ShardReader

PRUNED_MARK = "@top"  # signal name = <metric>@top<K>


def pruned_signal_name(metric: str, k: int) -> str:
    """`logit_margin`, 512 -> `logit_margin@top512`."""
    return f"{metric}{PRUNED_MARK}{int(k)}"


def parse_signal(name: str) -> tuple[str, int | None]:
    """`logit_margin@top512` -> ("logit_margin", 512); a plain metric name -> (name, None)."""
    if PRUNED_MARK not in name:
        return name, None
    base, _, k = name.partition(PRUNED_MARK)
    if not k.isdigit() or int(k) < 2:
        raise KeyError(
            f"pruned signal {name!r}: expected <metric>{PRUNED_MARK}<K> with K >= 2 candidate tokens "
            f"(e.g. logit_margin{PRUNED_MARK}512)"
        )
    return base, int(k)


def pruned_sizes(fractions: Sequence[float], vocab_size: int) -> list[int]:
    """Candidate-set sizes K = round(fraction × V) (at least 2: a margin needs two candidates), deduplicated."""
    return sorted({max(2, min(vocab_size, round(float(f) * vocab_size))) for f in fractions})


def vocab_share(name: str) -> tuple[str, float] | None:
    """`logit_margin@top12.5%` -> ("logit_margin", 0.125): a pruned signal whose K is a share of the
    vocabulary (one config for every model size); None for any other name."""
    if PRUNED_MARK not in name or not name.endswith("%"):
        return None
    base, _, percent = name[:-1].partition(PRUNED_MARK)
    try:
        share = float(percent) / 100
    except ValueError:
        share = math.nan
    if not 0 < share <= 1:
        raise KeyError(
            f"pruned signal {name!r}: expected <metric>{PRUNED_MARK}<P>% with 0 < P <= 100 percent of the "
            f"vocabulary (e.g. logit_margin{PRUNED_MARK}12.5%)"
        )
    return base, share


def resolve_signal(name: str, vocab_size: int) -> str:
    """A signal name with a concrete K: `<metric>@top<P>%` becomes `<metric>@top<K>`, K = round(P% × V)
    (`pruned_sizes`); any other name is returned unchanged."""
    share = vocab_share(name)
    if share is None:
        return name
    base, fraction = share
    return pruned_signal_name(base, pruned_sizes([fraction], vocab_size)[0])


# --- the candidate set ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CandidateSet:
    """K token ids a pruned head scores, out of a vocabulary of `vocab_size`; `source` says where they came
    from. `token_ids` are in rank order (most frequent first)."""

    token_ids: tuple[int, ...]
    vocab_size: int
    source: str = ""

    def __post_init__(self) -> None:
        ids = tuple(int(t) for t in self.token_ids)
        if len(ids) < 2:
            raise ValueError(f"a candidate set needs at least 2 tokens, got {len(ids)}")
        if len(set(ids)) != len(ids):
            raise ValueError("candidate token ids must be distinct")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise ValueError(
                f"candidate token ids must lie in [0, {self.vocab_size}), got {min(ids)}..{max(ids)}"
            )
        object.__setattr__(self, "token_ids", ids)

    @property
    def k(self) -> int:
        return len(self.token_ids)

    @property
    def cost_fraction(self) -> float:
        """A pruned head's cost relative to a full head: K / V."""
        return self.k / self.vocab_size

    def to_dict(self) -> dict:
        return {"vocab_size": self.vocab_size, "source": self.source, "token_ids": list(self.token_ids)}

    @classmethod
    def from_dict(cls, data: dict) -> CandidateSet:
        return cls(tuple(data["token_ids"]), int(data["vocab_size"]), str(data.get("source", "")))


@dataclass(frozen=True)
class TokenRanking:
    """Every token id of the vocabulary ranked by its count in a split (ties: lower id first)."""

    ranked_ids: tuple[int, ...]
    counts: tuple[int, ...]
    source: str

    @property
    def vocab_size(self) -> int:
        return len(self.ranked_ids)

    def top(self, k: int) -> CandidateSet:
        if not 2 <= k <= self.vocab_size:
            raise ValueError(f"candidate-set size {k} must lie in [2, {self.vocab_size}] (the vocabulary)")
        return CandidateSet(self.ranked_ids[:k], self.vocab_size, f"{self.source}, top {k}")

    def mass(self, k: int) -> float:
        """Share of the split's tokens that fall in the top k."""
        total = sum(self.counts)
        return sum(self.counts[:k]) / total if total else float("nan")


def rank_tokens(split_dir: str | Path, vocab_size: int) -> TokenRanking:
    """Rank the vocabulary by token frequency in one extracted split (its `tokens_*.npy` shards)."""
    reader = ShardReader(split_dir)
    counts = np.zeros(vocab_size, dtype=np.int64)
    for shard in reader.index["shards"]:  # only the int32 token files: the hidden states are not read
        tokens = np.load(reader.directory / shard["tokens"]).astype(np.int64)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
            raise ValueError(f"tokens in {split_dir} exceed the vocabulary of {vocab_size}: wrong extraction")
        counts += np.bincount(tokens, minlength=vocab_size)
    order = np.lexsort((np.arange(vocab_size), -counts))  # by count descending, then by id
    return TokenRanking(
        tuple(int(t) for t in order),
        tuple(int(c) for c in counts[order]),
        f"token frequency of {Path(split_dir).name}",
    )


# --- the pruned view of a set of heads --------------------------------------------------------------------------


class PrunedHeads(nn.Module):
    """`view(k, hidden)`: head k's logits over the candidate set, full-vocabulary shaped, -inf elsewhere.

    Shares every weight with `heads` (norm, MLP); only the candidate rows of each projection are copied, once
    (re-copied if the heads move to another device or dtype). An inference view: it does not follow later
    training of the heads.
    """

    def __init__(self, heads: nn.Module, candidates: CandidateSet):
        super().__init__()
        vocab = heads.heads[0].proj.out_features
        if vocab != candidates.vocab_size:
            raise ValueError(
                f"the candidate set is for a vocabulary of {candidates.vocab_size}, the heads have {vocab}: "
                "thresholds and heads come from different models"
            )
        self.heads = heads
        self.layers = list(heads.layers)
        self.candidates = candidates
        self.cost_fraction = candidates.cost_fraction
        self._ids: torch.Tensor | None = None
        self._rows: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.heads)

    def _weights(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self.heads.heads[k].proj.weight
        if self._ids is None or self._ids.device != weight.device or self._rows[k].dtype != weight.dtype:
            self._ids = torch.tensor(self.candidates.token_ids, dtype=torch.long, device=weight.device)
            self._rows = [head.proj.weight.detach().index_select(0, self._ids) for head in self.heads.heads]
        return self._ids, self._rows[k]

    def forward(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        head = self.heads.heads[index]
        if head.mlp is not None:
            hidden = hidden + head.mlp(hidden)
        ids, rows = self._weights(index)
        small = F.linear(head.norm(hidden), rows)
        out = small.new_full((*small.shape[:-1], self.candidates.vocab_size), float("-inf"))
        return out.index_copy_(-1, ids, small)
