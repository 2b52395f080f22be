"""What the decoding harness tunes on the tuning prompts, and how it chooses: the LayerSkip (head, d) grid and
the DSSD (ε × consulted heads × draft cap × adaptive-stop γ) grid, both selected by the same criterion (fair
tuning); and the improved DSSD of the `dssd` rows (`improved_dssd`: the calibrate stage's choice).

`SELECT_CRITERIA`: `layer_equiv_per_token` (fewest FLOP layer-equivalents per generated token: least waste;
deterministic), `tokens_per_s` (measured speed) or `latency_equiv_per_token` (fewest latency-equivalents per
token: calls, whatever their rows — the deterministic proxy for speed, docs/design.md §2).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from pipeline.engine import DSSD, LayerSkip
from pipeline.evaluation.decoding_report import Setting
from pipeline.exits.draft_stop import DraftAccuracy
from pipeline.exits.exit_set import ExitSetChoice
from pipeline.exits.policy import ExitPolicy

if TYPE_CHECKING:
    from pipeline.evaluation.decoding_harness import DecodingPlan

SELECT_CRITERIA = ("layer_equiv_per_token", "tokens_per_s", "latency_equiv_per_token")


def select_best(grid: Sequence[Setting], criterion: str, tiebreak: Callable[[Setting], tuple]) -> Setting:
    """The grid's best setting by `criterion` (fewest layer-equivalents per token, or most tokens/s); ties go
    to more accepted tokens per verification, then to the smallest `tiebreak(setting)`."""

    def score(s: Setting) -> tuple:
        summary = s.summary()
        apv = summary.get("accepted_per_verification", math.nan)
        apv = -apv if not math.isnan(apv) else 0.0
        primary = -summary["tokens_per_s"] if criterion == "tokens_per_s" else summary[criterion]
        return (primary, apv, *tiebreak(s))

    return min(grid, key=score)


def layerskip_grid(n_heads: int, draft_lengths: Sequence[int]) -> list[Setting]:
    """LayerSkip's tuning grid: every head × every draft length d."""
    return [
        Setting("layerskip_grid", head=k, draft_len=d, strategy=LayerSkip(k, d))
        for k in range(n_heads)
        for d in draft_lengths
    ]


def select_layerskip(grid: Sequence[Setting], criterion: str = SELECT_CRITERIA[0]) -> Setting:
    """The best LayerSkip (head, d) (`select_best`); ties then go to the shallower head and the shorter draft."""
    return select_best(grid, criterion, lambda s: (s.head, s.draft_len))


def select_dssd(grid: Sequence[Setting], criterion: str = SELECT_CRITERIA[0]) -> Setting:
    """The best DSSD (ε, heads, max_draft) (`select_best`); ties then go to the smaller draft cap, fewer
    consulted heads, the shallower heads and the smaller ε."""

    def tiebreak(s: Setting) -> tuple:
        heads = s.strategy.policy.enabled
        return (s.strategy.max_draft, len(heads), heads, s.eps, s.strategy.min_chain_prob)

    return select_best(grid, criterion, tiebreak)


def consulting(policy: ExitPolicy, heads: Sequence[int]) -> ExitPolicy:
    """`policy` with every head outside `heads` disabled (threshold None)."""
    return policy.with_thresholds([t if k in heads else None for k, t in enumerate(policy.thresholds)])


def improved_dssd(policy: ExitPolicy, choice: ExitSetChoice, accuracy: DraftAccuracy | None) -> DSSD:
    """The improved DSSD at one ε: `policy` restricted to the chosen heads, the chosen γ and draft cap."""
    return DSSD(
        consulting(policy, choice.heads),
        max_draft=choice.max_draft,
        min_chain_prob=choice.min_chain_prob,
        draft_accuracy=accuracy if choice.min_chain_prob > 0 else None,
    )


def _note(heads: Sequence[int], cap: int, gamma: float) -> str:
    note = f"heads={','.join(map(str, heads)) or 'none'} max_draft={cap}"
    return note + (f" gamma={gamma:g}" if gamma > 0 else "")


def choice_note(choice: ExitSetChoice) -> str:
    """How a `dssd` row's setting is labelled: its consulted heads, draft cap and γ."""
    return _note(choice.heads, choice.max_draft, choice.min_chain_prob)


def dssd_grid(plan: DecodingPlan) -> list[Setting]:
    """DSSD's tuning grid on its own signal (`plan.improved_policies`): every ε × consulted-head set × `dssd_max_draft` × `dssd_gamma`, plus per ε the
    calibrate stage's choice (`plan.exit_sets`) when the grid does not already hold it. The head sets are each
    head the ε's thresholds enable on its own, and all of them together (one set when a single head is
    enabled, the empty set — greedy through the engine — when none is). γ > 0 is skipped at a cap of 1 (it
    could only stop drafting after the last draft anyway)."""
    grid = []
    gammas = sorted(set(plan.dssd_gamma))
    for eps, policy in plan.improved_policies.items():  # the improved DSSD's signal
        labels = {"calibration": plan.calibration, "confidence": policy.metric}
        enabled = policy.enabled
        head_sets = [[k] for k in enabled] + ([enabled] if len(enabled) != 1 else [])
        tried = set()
        for heads in head_sets:
            for cap in plan.dssd_max_draft:
                for gamma in gammas if cap > 1 else [0.0]:
                    if (tuple(heads), cap, gamma) in tried:
                        continue
                    tried.add((tuple(heads), cap, gamma))
                    strategy = DSSD(
                        consulting(policy, heads),
                        max_draft=cap,
                        min_chain_prob=gamma,
                        draft_accuracy=plan.draft_accuracy if gamma > 0 else None,
                    )
                    grid.append(
                        Setting(
                            "dssd_grid", eps, strategy=strategy, note=_note(heads, cap, gamma), labels=labels
                        )
                    )
        choice = plan.exit_sets.get(eps)
        if choice is not None and (tuple(choice.heads), choice.max_draft, choice.min_chain_prob) not in tried:
            strategy = improved_dssd(policy, choice, plan.draft_accuracy)
            grid.append(Setting("dssd_grid", eps, strategy=strategy, note=choice_note(choice), labels=labels))
    return grid
