"""Split preflight: can each split hold its token budget? Answered before any stage works (docs/design.md §3).

A budget larger than its split used to surface only when extraction reached that split, after the train split
(tens of GB at Pythia sizes) had been extracted. Here every split with a budget is settled up front, cheapest
evidence first:

1. **Size bounds, no tokenizer.** A source that knows a split's bytes and documents (`split_size`: the local
   corpus from its files, MiniPile from its dataset card) bounds its token count from both sides. A byte-level
   BPE (Pythia's, the tiny model's) spends at least one byte per token, so a split holds at most
   `bytes + documents` tokens (one EOS per document): a budget above that is impossible whatever the tokenizer.
   No tokenizer of natural text or code averages more than `MAX_BYTES_PER_TOKEN` bytes per token (Pythia's on
   MiniPile: ~4.1; the tiny 4k BPE on Python source: ~3.5), so a budget below `bytes / MAX_BYTES_PER_TOKEN`
   surely fits.
2. **Exact count.** A budget between the bounds is counted with the model's tokenizer, stopping at the
   budget (`count_tokens`), when the split's text is at most `EXACT_COUNT_MAX_BYTES` (every local split;
   MiniPile's validation and test splits, streamed: 2.8 MB and 58.6 MB).
3. **Deferred.** Without a tokenizer yet (the tiny model before its pretraining) or a size, the budget is
   checked exactly by the extract stage, which tokenizes every split before it writes its first shard.

Every failure is a `BudgetError` (a ConfigError: one line, exit code 2, no traceback) naming the split, what it
holds, the budget and the fix.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.data.corpus import SplitSize
from pipeline.data.tokens import BudgetError, TextSource, budget_error, count_tokens

log = logging.getLogger(__name__)

MAX_BYTES_PER_TOKEN = 10.0
EXACT_COUNT_MAX_BYTES = 256 * 2**20


@dataclass(frozen=True)
class SplitCheck:
    """The preflight's verdict on one split: `fits` (bound), `counted` (exact count ≥ budget) or `deferred`."""

    split: str
    needed: int  # the budget rounded down to whole blocks: the tokens extraction will take
    verdict: str
    evidence: str  # what the verdict rests on, for the log


def _size(source: TextSource, split: str) -> SplitSize | None:
    split_size = getattr(source, "split_size", None)
    return split_size(split) if split_size is not None else None


def _by_bounds(
    source: TextSource, split: str, budget: int, seq_len: int, size: SplitSize | None, key: str
) -> SplitCheck | None:
    """Step 1: the verdict the size alone gives (raises when impossible); None when it takes a count."""
    needed = budget // seq_len * seq_len
    if size is None:
        return None
    at_most = size.n_bytes + size.n_documents
    if needed > at_most:
        held = (
            f"at most {at_most:,} tokens ({size.n_bytes:,} bytes in {size.n_documents:,} documents, from "
            f"{size.origin}; a token is at least one byte)"
        )
        raise budget_error(source, split, budget, seq_len, held, at_most // seq_len * seq_len, key)
    at_least = int(size.n_bytes / MAX_BYTES_PER_TOKEN)
    if needed <= at_least:
        return SplitCheck(split, needed, "fits", f"{size.n_bytes:,} bytes hold at least {at_least:,} tokens")
    return None


def _by_count(
    source: TextSource,
    split: str,
    budget: int,
    seq_len: int,
    size: SplitSize | None,
    tokenizer: Any | None,
    key: str,
) -> SplitCheck:
    """Steps 2 and 3: count the split exactly when it is small enough and a tokenizer is at hand."""
    needed = budget // seq_len * seq_len
    if tokenizer is None:
        why = "no tokenizer yet"
    elif size is None or size.n_bytes > EXACT_COUNT_MAX_BYTES:
        why = "split size unknown" if size is None else "split too large to count"
    else:
        counted = count_tokens(source, tokenizer, split, stop_at=needed)
        if counted < needed:
            held = f"only {counted:,} tokens (counted with the model's tokenizer)"
            raise budget_error(source, split, budget, seq_len, held, counted // seq_len * seq_len, key)
        return SplitCheck(split, needed, "counted", f"at least {counted:,} tokens counted")
    return SplitCheck(split, needed, "deferred", f"{why}; extraction checks it before its first shard")


def check_budgets(
    source: TextSource,
    budgets: Mapping[str, Any],
    seq_len: int,
    tokenizer: Any | None = None,
    load_tokenizer: Callable[[], Any | None] | None = None,
) -> list[SplitCheck]:
    """Settle every split with a positive budget (`data.budgets`, keys `data.budgets.<split>`); the first
    impossible one raises BudgetError. Every split's bounds are checked before any split is counted, so a
    budget the size alone rules out fails without tokenizing anything; `load_tokenizer` (returning None when
    no tokenizer is at hand) is called only when some split needs a count."""
    wanted = {split: int(budget) for split, budget in budgets.items() if int(budget) > 0}
    sizes = {split: _size(source, split) for split in wanted}
    checks = {}
    for split, budget in wanted.items():
        found = _by_bounds(source, split, budget, seq_len, sizes[split], f"data.budgets.{split}")
        if found is not None:
            checks[split] = found
    if tokenizer is None and load_tokenizer is not None and len(checks) < len(wanted):
        tokenizer = load_tokenizer()
    for split, budget in wanted.items():
        if split not in checks:
            key = f"data.budgets.{split}"
            checks[split] = _by_count(source, split, budget, seq_len, sizes[split], tokenizer, key)
    for check in checks.values():
        log.info(
            "preflight %s: %s tokens %s (%s)", check.split, f"{check.needed:,}", check.verdict, check.evidence
        )
    return [checks[split] for split in wanted]


__all__ = ["BudgetError", "SplitCheck", "check_budgets"]
