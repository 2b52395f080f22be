"""What a decoding run measured, and its tables: result rows, summary, per-prompt table, speed table.

`pipeline.evaluation.decoding_harness` runs the settings and fills a `DecodingReport`; this module turns it
into tables (the row functions: pipeline/evaluation/decoding_rows.py). Counters are summed over prompts
before any ratio is taken.

Two acceptance measures, not to be confused: `acceptance_rate = accepted / drafted` is the DSSD paper
author's formula (the share of drafts the full model confirms); `accepted_per_verification` (mean drafts
accepted per verification pass that checked at least one draft) is ours.

Three DSSD rows: `dssd_paper` (per ε: the paper's rule — every head the ε enables, no early stop, cap
`max_draft` — the reproduction), `dssd` (per ε: the improved DSSD — the calibrate stage's exit set and
adaptive-stop γ, pipeline/exits/exit_set.py) and `dssd_tuned` (ε, heads, cap and γ tuned on the tuning prompts).

Result rows (pipeline/orchestration/results.py); the `setting` column names the method, and early_exit /
dssd* rows also carry `calibration`, `confidence` (and `fill` for early exit):
  setting generate|greedy|early_exit|layerskip|layerskip_nobonus|dssd_paper|dssd|dssd_tuned|dssd_perfect_gate, eps
      (early_exit, dssd*), head -:
      tokens_per_s, speedup_vs_generate (tokens/s over generate's on the same prompts), layer_equiv_per_token
      (FLOPs), latency_equiv_per_token (calls, whatever their rows; docs/design.md §2), tokens_per_full_pass,
      identical (1 = every prompt identical to greedy `generate`; lossless methods only), near_ties (prompts
      where a lossless method differed from its reference at a bf16/fp16 near-tie — `generate` for greedy, the
      engine's greedy for LayerSkip/DSSD: pipeline/evaluation/losslessness.py; 0 in fp32), acceptance_rate,
      accepted_per_verification, drafted_per_token (speculative methods);
      early_exit: agreement (share of positions equal to greedy; lossy, so no `identical`).
  setting early_exit|dssd*|layerskip|layerskip_nobonus, head i: exit_frac (early exit) /
      draft_frac (drafts by head i per token).
  setting layerskip: draft_head, draft_len (the tuned setting). layerskip_nobonus is the same (head, d)
      without a bonus token after a fully accepted draft (the paper author's LayerSkip baseline).
  setting dssd|dssd_tuned: what the DSSD consults: rows max_draft, min_chain_prob (γ; 0 = no early stop) and
      consulted (1/0) per head i; dssd_tuned (chosen on the tuning prompts by the same criterion as
      LayerSkip's (head, d)) also tuned_eps.
  setting dssd_perfect_gate: DSSD with a perfect confidence gate (`PerfectGate`, with the oracle only): each token
      drafted at its earliest agreeing head exactly when one exists, cap `max_draft`, verified in the same engine;
      what any confidence signal could reach with these heads (docs/design.md §1.6). Measured, not a decoder.
  setting layerskip_grid, head i, extra column draft_len: the same metrics on the tuning prompts.
  setting oracle: layer_equiv_per_token (exit at the earliest agreeing head, no fill: a lower bound) and
      latency_equiv_per_token (the same figure: every call is one row), cascade_layer_equiv_per_token (also
      paying each shallower head), exit_frac (head all and per head), acceptance_rate (1 by construction) and
      accepted_per_verification of an oracle drafter under the same `max_draft` cap, identical.
  setting dssd_vs_layerskip, eps e: dssd_paper / tuned LayerSkip (the paper's comparison): acceptance_ratio,
      accepted_per_verification_ratio,
      layer_equiv_ratio, latency_equiv_ratio, speed_ratio.
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from pipeline.evaluation.decoding_rows import (
    METHOD_COLUMN,
    SPECULATIVE,
    decoding_row,
    dssd_choice_rows,
    oracle_rows,
    oracle_speculation,
    ratio_rows,
    setting_rows,
)

log = logging.getLogger(__name__)
__all__ = [  # the row helpers are re-exported: callers import them from here
    "METHOD_COLUMN",
    "DecodingReport",
    "LayerSkipTuning",
    "DSSDTuning",
    "Setting",
    "TestRun",
    "oracle_speculation",
    "setting_rows",
    "speed_line",
    "summary_table",
]
SUMMARY_METRICS = (
    "tokens_per_s",
    "speedup_vs_generate",
    "layer_equiv_per_token",
    "latency_equiv_per_token",
    "acceptance_rate",
    "accepted_per_verification",
    "identical",
    "near_ties",
    "agreement",
)


@dataclass
class Setting:
    """One method/setting and what it did on a set of prompts (one entry per prompt in each list).

    `strategy` is an engine `Strategy`, a function prompt -> new tokens (a generator outside the engine, timed
    like `generate`), or None for transformers' `generate` (the reference). `note` is appended to the label.
    `repeat_walls[p]` holds every timed repeat on prompt p; `wall[p]` is their median."""

    method: str
    eps: float | None = None
    head: int | None = None
    draft_len: int | None = None
    strategy: Any = None
    note: str | None = None
    labels: dict[str, str] = field(default_factory=dict)  # result labels: calibration, confidence, fill
    tokens: list[list[int]] = field(default_factory=list)
    stats: list[Any] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)
    repeat_walls: list[list[float]] = field(default_factory=list)
    near_ties: int = 0  # prompts whose output differed from the reference at a bf16/fp16 near-tie

    @property
    def detail(self) -> str:
        """The label without the method: "eps=0.8", "head=1 d=2", ..."""
        parts = []
        if self.eps is not None:
            parts.append(f"eps={self.eps:g}")
        if self.head is not None:
            parts.append(f"head={self.head}")
        if self.draft_len is not None:
            parts.append(f"d={self.draft_len}")
        if self.note:
            parts.append(self.note)
        return " ".join(parts)

    @property
    def label(self) -> str:
        return f"{self.method} {self.detail}".strip()

    def total(self, key: str) -> float:
        return sum(getattr(s, key) for s in self.stats)

    @property
    def generated(self) -> int:
        return sum(map(len, self.tokens))

    @property
    def tokens_per_s(self) -> float:
        wall = sum(self.wall)
        return self.generated / wall if wall > 0 else math.nan

    def tokens_per_s_by_repeat(self) -> list[float]:
        """Tokens/s of each repeat over all prompts (repeat r of every prompt)."""
        n = min(map(len, self.repeat_walls), default=0)
        walls = [sum(w[r] for w in self.repeat_walls) for r in range(n)]
        return [self.generated / w if w > 0 else math.nan for w in walls]

    def summary(self) -> dict[str, float]:
        out = {"tokens_per_s": self.tokens_per_s}
        if not self.stats:
            return out
        gen = self.total("generated")
        drafted, accepted = self.total("drafted"), self.total("accepted")
        verifications = self.total("verifications")
        passes = self.total("full_passes") + self.total("prefill_tokens")
        out["layer_equiv_per_token"] = self.total("layer_equivalents") / gen if gen else math.nan
        out["latency_equiv_per_token"] = self.total("latency_equivalents") / gen if gen else math.nan
        out["tokens_per_full_pass"] = gen / passes if passes else math.nan
        if self.method in SPECULATIVE:
            out["acceptance_rate"] = accepted / drafted if drafted else math.nan
            out["accepted_per_verification"] = accepted / verifications if verifications else math.nan
            out["drafted_per_token"] = drafted / gen if gen else math.nan
        return out

    def per_head(self, key: str) -> list[float]:
        gen = self.total("generated")
        n = len(self.stats[0].exits_per_head) if self.stats else 0
        return [sum(getattr(s, key)[k] for s in self.stats) / gen if gen else math.nan for k in range(n)]


@dataclass
class LayerSkipTuning:
    """The tuning prompts: the reference, the engine's greedy, every LayerSkip (head, d), the chosen one."""

    generate: Setting
    greedy: Setting
    grid: list[Setting]
    best: Setting
    criterion: str


@dataclass
class DSSDTuning:
    """DSSD's grid on the tuning prompts (ε × consulted heads × max_draft) and the chosen setting (None when
    the grid is empty: no ε to tune over)."""

    grid: list[Setting]
    best: Setting | None
    criterion: str


@dataclass
class TestRun:
    """The reported prompts: every setting, interleaved per prompt, and the oracle probe per prompt."""

    generate: Setting
    greedy: Setting
    early_exit: list[Setting]
    layerskip: Setting
    dssd_paper: list[Setting]  # the paper's rule per ε: every head, no early stop, cap `max_draft`
    external: list[Setting]
    bounds: list[Any]  # pipeline.engine.OracleBound per prompt (empty without the oracle)
    layerskip_nobonus: Setting | None = None  # the tuned (head, d) without the bonus token
    dssd_tuned: Setting | None = None  # DSSD with the setting chosen on the tuning prompts
    dssd: list[Setting] = field(default_factory=list)  # the improved DSSD per ε (calibrated exit set and γ)
    # DSSD with a perfect gate (`PerfectGate`: needs each prompt's oracle bound; None without the oracle)
    perfect_gate: Setting | None = None

    @property
    def lossless(self) -> list[Setting]:
        """The speculative settings, each checked against greedy on every prompt."""
        extra = [s for s in (self.layerskip_nobonus, self.dssd_tuned, self.perfect_gate) if s is not None]
        return [self.layerskip, *self.dssd_paper, *self.dssd, *extra]

    @property
    def engine_settings(self) -> list[Setting]:
        """Every setting on the engine or `generate`, in report order (generators outside excluded)."""
        return [self.generate, self.greedy, *self.early_exit, *self.lossless]


@dataclass
class DecodingReport:
    head_layers: list[int]
    max_draft: int
    tuning: LayerSkipTuning
    test: TestRun
    per_prompt: list[dict]
    dssd_tuning: DSSDTuning | None = None

    def rows(self) -> list[dict]:
        """Every result row (module docstring)."""
        test, tuning = self.test, self.tuning
        out: list[dict] = []
        for setting in test.engine_settings:
            out += setting_rows(setting, test.generate.tokens_per_s, test.generate.tokens)
        for setting in [*test.dssd, *([test.dssd_tuned] if test.dssd_tuned is not None else [])]:
            out += dssd_choice_rows(setting, len(self.head_layers))
        out += [
            decoding_row("draft_head", tuning.best.head, method="layerskip"),
            decoding_row("draft_len", tuning.best.draft_len, method="layerskip"),
        ]
        for setting in tuning.grid:
            layer = self.head_layers[setting.head]
            for r in setting_rows(
                setting,
                tuning.generate.tokens_per_s,
                tuning.generate.tokens,
                layer=layer,
                draft_len=setting.draft_len,
            ):
                if r["head"] is None:  # per-head draft fractions of a one-head drafter carry no information
                    r["head"] = setting.head
                    out.append(r)
        out += ratio_rows(test.dssd_paper, test.layerskip)
        out += oracle_rows(test.bounds, self.max_draft, len(self.head_layers))
        return out

    def summary_table(self) -> pd.DataFrame:
        return summary_table(self.rows())

    def per_prompt_table(self) -> pd.DataFrame:
        return pd.DataFrame(self.per_prompt)

    def metrics(self) -> dict[str, Any]:
        """The stage's headline numbers (tracker summary and completion record)."""
        test = self.test
        out: dict[str, Any] = {
            "layerskip_head": self.tuning.best.head,
            "layerskip_draft_len": self.tuning.best.draft_len,
            "greedy_speedup_vs_generate": test.greedy.tokens_per_s / test.generate.tokens_per_s,
            "test_prompts": len(test.generate.tokens),
            "tune_prompts": len(self.tuning.generate.tokens),
            "identical": True,
        }
        for r in self.rows():
            if r[METHOD_COLUMN] == "dssd_vs_layerskip" and r["metric"] in (
                "acceptance_ratio",
                "accepted_per_verification_ratio",
            ):
                out[f"{r['metric']}@{r['eps']:g}"] = r["value"]
            if r[METHOD_COLUMN] in ("dssd", "dssd_paper") and r["metric"] == "speedup_vs_generate":
                out[f"{r[METHOD_COLUMN]}_speedup@{r['eps']:g}"] = r["value"]
        tuned = test.dssd_tuned
        if tuned is not None:
            out["dssd_tuned_eps"] = tuned.eps
            out["dssd_tuned_max_draft"] = tuned.strategy.max_draft
            out["dssd_tuned_gamma"] = tuned.strategy.min_chain_prob
            out["dssd_tuned_heads"] = ",".join(map(str, tuned.strategy.policy.enabled))
        greedy_tps = test.greedy.tokens_per_s
        for s in (tuned, test.layerskip, test.layerskip_nobonus, test.perfect_gate):
            if s is not None:
                out[f"{s.method}_speed_vs_greedy"] = (
                    s.tokens_per_s / greedy_tps if greedy_tps > 0 else math.nan
                )
        return out

    def speed_table(self, label: str = "") -> pd.DataFrame:
        """The benchmark's view: one line per test setting with tokens/s (median, min, max over repeats), its
        ratio to `generate` in the same repeat (median), compute and acceptance, and the oracle bound."""
        test = self.test
        settings = [*test.engine_settings, *test.external]
        lines = [speed_line(s, test.generate, label) for s in settings]
        if test.bounds:
            n_tok = sum(len(b.oracle_cost) for b in test.bounds)
            lines.append(
                {
                    "model": label,
                    "method": "oracle_bound",
                    "setting": "earliest agreeing head",
                    "layer_eq_per_token": sum(sum(b.oracle_cost) for b in test.bounds) / n_tok,
                    "latency_eq_per_token": sum(sum(b.oracle_cost) for b in test.bounds) / n_tok,
                    "exit_fraction": sum(sum(b.exits_per_head()) for b in test.bounds) / n_tok,
                    "identical_to_greedy": [b.tokens for b in test.bounds] == test.generate.tokens,
                }
            )
        return pd.DataFrame(lines)


# --- tables -------------------------------------------------------------------------------------------------


def summary_table(rows: list[dict]) -> pd.DataFrame:
    """One line per method/ε (tuned LayerSkip and oracle included, grid excluded) with the main metrics and,
    on the paper-rule DSSD lines, the ratios to the tuned LayerSkip."""
    lines: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r["head"] is not None or r[METHOD_COLUMN] == "layerskip_grid":
            continue
        if r[METHOD_COLUMN] == "dssd_vs_layerskip":  # the paper's comparison: its DSSD rule vs LayerSkip
            lines.setdefault(("dssd_paper", r["eps"]), {})[r["metric"]] = r["value"]
        elif r["metric"] in SUMMARY_METRICS:
            lines.setdefault((r[METHOD_COLUMN], r["eps"]), {})[r["metric"]] = r["value"]
    columns = [*SUMMARY_METRICS, "acceptance_ratio", "accepted_per_verification_ratio"]
    return pd.DataFrame(
        [
            {"method": m, "eps": math.nan if e is None else e, **{c: v.get(c, math.nan) for c in columns}}
            for (m, e), v in lines.items()
        ],
        columns=["method", "eps", *columns],
    )


DEFAULT_DETAIL = {"generate": "transformers", "greedy": "engine"}


def speed_line(setting: Setting, generate: Setting, label: str) -> dict[str, Any]:
    """One line of the speed table: per-repeat speeds and ratios to `generate` in the same repeat."""
    speeds = setting.tokens_per_s_by_repeat()
    ratios = [s / g for s, g in zip(speeds, generate.tokens_per_s_by_repeat(), strict=True)]
    line: dict[str, Any] = {
        "model": label,
        "method": setting.method,
        "setting": setting.detail or DEFAULT_DETAIL.get(setting.method, ""),
        "tokens_per_s": statistics.median(speeds),
        "tok_s_min": min(speeds),
        "tok_s_max": max(speeds),
        "ratio_vs_generate": statistics.median(ratios),
        "identical_to_greedy": setting.tokens == generate.tokens,
    }
    if setting.stats:
        summary = setting.summary()
        gen = setting.total("generated")
        line.update(
            {
                "layer_eq_per_token": summary["layer_equiv_per_token"],
                "latency_eq_per_token": summary["latency_equiv_per_token"],
                "acceptance": summary.get("acceptance_rate", math.nan),
                "accepted_per_verification": summary.get("accepted_per_verification", math.nan),
                "exit_fraction": setting.total("exited") / gen if gen else math.nan,
            }
        )
    return line
