"""What the decoding harness tunes on the tuning prompts, and how it chooses: the LayerSkip (head, d) grid and
the DSSD (ε × consulted heads × draft cap) grid, both selected by the same criterion (fair tuning).

`SELECT_CRITERIA`: `layer_equiv_per_token` (fewest FLOP layer-equivalents per generated token; deterministic)
or `tokens_per_s` (measured speed).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from pipeline.engine import DSSD
from pipeline.evaluation.decoding_report import Setting
from pipeline.exits.policy import ExitPolicy

if TYPE_CHECKING:
    from pipeline.evaluation.decoding_harness import DecodingPlan

SELECT_CRITERIA = ("layer_equiv_per_token", "tokens_per_s")


def select_best(grid: Sequence[Setting], criterion: str, tiebreak: Callable[[Setting], tuple]) -> Setting:
    """The grid's best setting by `criterion` (fewest layer-equivalents per token, or most tokens/s); ties go
    to more accepted tokens per verification, then to the smallest `tiebreak(setting)`."""

    def score(s: Setting) -> tuple:
        summary = s.summary()
        apv = summary.get("accepted_per_verification", math.nan)
        apv = -apv if not math.isnan(apv) else 0.0
        primary = (
            -summary["tokens_per_s"] if criterion == "tokens_per_s" else summary["layer_equiv_per_token"]
        )
        return (primary, apv, *tiebreak(s))

    return min(grid, key=score)


def select_layerskip(grid: Sequence[Setting], criterion: str = SELECT_CRITERIA[0]) -> Setting:
    """The best LayerSkip (head, d) (`select_best`); ties then go to the shallower head and the shorter draft."""
    return select_best(grid, criterion, lambda s: (s.head, s.draft_len))


def select_dssd(grid: Sequence[Setting], criterion: str = SELECT_CRITERIA[0]) -> Setting:
    """The best DSSD (ε, heads, max_draft) (`select_best`); ties then go to the smaller draft cap, fewer
    consulted heads, the shallower heads and the smaller ε."""

    def tiebreak(s: Setting) -> tuple:
        heads = s.strategy.policy.enabled
        return (s.strategy.max_draft, len(heads), heads, s.eps)

    return select_best(grid, criterion, tiebreak)


def consulting(policy: ExitPolicy, heads: Sequence[int]) -> ExitPolicy:
    """`policy` with every head outside `heads` disabled (threshold None)."""
    return policy.with_thresholds([t if k in heads else None for k, t in enumerate(policy.thresholds)])


def dssd_grid(plan: DecodingPlan) -> list[Setting]:
    """DSSD's tuning grid: every ε × consulted-head set × `dssd_max_draft`. The head sets are each head the
    ε's thresholds enable on its own, and all of them together (one set when a single head is enabled, the
    empty set — greedy through the engine — when none is)."""
    grid = []
    for eps, policy in plan.policies.items():
        enabled = policy.enabled
        head_sets = [[k] for k in enabled] + ([enabled] if len(enabled) != 1 else [])
        for heads in head_sets:
            for cap in plan.dssd_max_draft:
                grid.append(
                    Setting(
                        "dssd_grid",
                        eps=eps,
                        strategy=DSSD(consulting(policy, heads), max_draft=cap),
                        note=f"heads={','.join(map(str, heads)) or 'none'} max_draft={cap}",
                        labels={"calibration": plan.calibration, "confidence": policy.metric},
                    )
                )
    return grid
