"""Sampled decoding: the decoding stage's methods at temperatures T > 0 (`decoding.sampling`), on the same
prompts as the greedy run.

Used by the `decoding` stage after the greedy harness (pipeline/evaluation/decoding_harness.py)::

    greedy = run_decoding(engine, model, prompts, tune_prompts, plan)
    sampled = run_sampled_decoding(engine, greedy, prompts, tune_prompts, plan, [0.7, 1.0], seed=0)
    sampled.rows(), sampled.summary_table(), sampled.per_prompt_table(), sampled.metrics()

Per temperature T (pure temperature sampling: top-k and top-p off; `Sampling(T)`, pipeline/engine/sampling.py):

1. Tuning prompts: every LayerSkip (head, d) of the grid, sampled; the (head, d) is chosen again at this T by
   the greedy run's criterion (`plan.layerskip_select`), since acceptance changes with temperature.
2. Test prompts, interleaved per prompt: `greedy` (ancestral sampling from the full model: the reference),
   the tuned `layerskip` and `layerskip_nobonus`, `dssd_paper` and `dssd` per ε — the very strategies of the
   greedy run's rows (same exit policies, exit sets, γ and caps), so only the temperature differs.

DSSD and LayerSkip draw with the speculative-sampling rule and are exact in distribution (docs/design.md
§1.8; proved by the chi-square tests in tests/test_sampling.py). Their outputs are not compared token by
token with the reference — sampled outputs differ by design — so there is no `identical` row at T > 0.

Reproducible: each run of a setting on prompt i (tuning or test) draws from its own
`torch.Generator().manual_seed(seed + i)`, re-seeded for every repeat, so repeats time identical work and
the same seed gives the same rows (tokens/s aside). Rows: pipeline/evaluation/decoding_rows.py
(`sampled_rows`; settings `sampled_<method>`, column `temperature`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from pipeline.engine import Engine, Greedy, LayerSkip, Sampling
from pipeline.evaluation.decoding_report import SUMMARY_METRICS, DecodingReport, Setting
from pipeline.evaluation.decoding_rows import SAMPLED_PREFIX, decoding_row, ratio_rows, sampled_rows
from pipeline.evaluation.decoding_tuning import layerskip_grid, select_layerskip

if TYPE_CHECKING:
    from pipeline.evaluation.decoding_harness import DecodingPlan

SAMPLED_METRICS = tuple(m for m in SUMMARY_METRICS if m not in ("identical", "near_ties", "agreement"))


def _copy(setting: Setting) -> Setting:
    """A fresh setting running the same strategy (strategies hold no state between generations)."""
    return Setting(
        setting.method,
        eps=setting.eps,
        head=setting.head,
        draft_len=setting.draft_len,
        strategy=setting.strategy,
        note=setting.note,
        labels=dict(setting.labels),
    )


@dataclass
class SampledRun:
    """Everything decoded at one temperature: the LayerSkip grid on the tuning prompts, the test settings."""

    temperature: float
    layerskip_grid: list[Setting]
    greedy: Setting  # ancestral sampling from the full model: the reference
    layerskip: Setting  # tuned at this temperature
    layerskip_nobonus: Setting
    dssd_paper: list[Setting]
    dssd: list[Setting]
    records: list[dict] = field(default_factory=list)  # one line per split × prompt × setting

    @property
    def test_settings(self) -> list[Setting]:
        return [self.greedy, self.layerskip, self.layerskip_nobonus, *self.dssd_paper, *self.dssd]

    def rows(self, head_layers: Sequence[int]) -> list[dict]:
        t, greedy_tps = self.temperature, self.greedy.tokens_per_s
        out: list[dict] = []
        for setting in self.test_settings:
            out += sampled_rows(setting, t, greedy_tps)
        for metric, value in (("draft_head", self.layerskip.head), ("draft_len", self.layerskip.draft_len)):
            out.append(decoding_row(metric, value, method=SAMPLED_PREFIX + "layerskip", temperature=t))
        for setting in self.layerskip_grid:  # on the tuning prompts: speed relative to no reference, so NaN
            for r in sampled_rows(
                setting, t, math.nan, layer=head_layers[setting.head], draft_len=setting.draft_len
            ):
                if r["head"] is None:  # a one-head drafter's per-head fractions carry no information
                    r["head"] = setting.head
                    out.append(r)
        for r in ratio_rows(self.dssd_paper, self.layerskip):  # the paper's comparison, at this temperature
            out.append({**r, "setting": SAMPLED_PREFIX + r["setting"], "temperature": t})
        return out


@dataclass
class SampledDecoding:
    """One `SampledRun` per temperature > 0 (none: the stage decodes greedily only, as before)."""

    runs: list[SampledRun]
    head_layers: list[int]
    seed: int

    def rows(self) -> list[dict]:
        return [r for run in self.runs for r in run.rows(self.head_layers)]

    def summary_table(self) -> pd.DataFrame:
        """One line per temperature × method × ε with the main metrics (grid and ratios excluded)."""
        lines: dict[tuple, dict[str, float]] = {}
        for r in self.rows():
            if r["head"] is None and r["metric"] in SAMPLED_METRICS and not r["setting"].endswith("_grid"):
                key = (r["temperature"], r["setting"].removeprefix(SAMPLED_PREFIX), r["eps"])
                lines.setdefault(key, {})[r["metric"]] = r["value"]
        metrics = [*SAMPLED_METRICS, "speedup_vs_greedy"]
        return pd.DataFrame(
            [
                {"temperature": t, "method": m, "eps": math.nan if e is None else e}
                | {c: v.get(c, math.nan) for c in metrics}
                for (t, m, e), v in lines.items()
            ],
            columns=["temperature", "method", "eps", *metrics],
        )

    def per_prompt_table(self) -> pd.DataFrame:
        return pd.DataFrame([record for run in self.runs for record in run.records])

    def metrics(self) -> dict[str, Any]:
        """Headline numbers per temperature: the LayerSkip setting tuned at it."""
        out: dict[str, Any] = {}
        for run in self.runs:
            out[f"layerskip_head@T={run.temperature:g}"] = run.layerskip.head
            out[f"layerskip_draft_len@T={run.temperature:g}"] = run.layerskip.draft_len
        return out


def run_sampled(
    engine: Engine,
    setting: Setting,
    prompt: torch.Tensor,
    split: str,
    index: int,
    sampling: Sampling,
    seed: int,
    plan: DecodingPlan,
) -> dict:
    """`setting` on one prompt: `plan.warmup` untimed and `plan.repeats` timed runs, each drawing from a
    generator seeded `seed + index`; the tokens, statistics and median wall time are appended to `setting`.
    Returns the per-prompt record."""
    walls = []
    for repeat in range(plan.warmup + plan.repeats):
        generator = torch.Generator().manual_seed(seed + index)
        result = engine.generate(
            prompt,
            setting.strategy,
            plan.max_new_tokens,
            plan.eos_token_id,
            sampling=sampling,
            generator=generator,
        )
        result.stats.check()
        if repeat >= plan.warmup:
            walls.append(result.stats.wall_time_s)
    setting.tokens.append(result.tokens)
    setting.stats.append(result.stats)
    setting.repeat_walls.append(walls)
    setting.wall.append(statistics.median(walls))
    stats = result.stats.as_dict()
    n_tokens, wall = len(result.tokens), setting.wall[-1]
    return {
        "temperature": sampling.temperature,
        "split": split,
        "prompt": index,
        "method": SAMPLED_PREFIX + setting.method,
        "eps": setting.eps,
        "head": setting.head,
        "draft_len": setting.draft_len,
        "setting": setting.label,
        "seed": seed + index,
        "n_tokens": n_tokens,
        "wall_s": wall,
        "tokens_per_s": n_tokens / wall if wall else math.nan,
        **{k: v for k, v in stats.items() if k not in ("strategy", "wall_time_s", "tokens_per_second")},
    }


def run_temperature(
    engine: Engine,
    greedy_report: DecodingReport,
    prompts: Sequence[torch.Tensor],
    tune_prompts: Sequence[torch.Tensor],
    plan: DecodingPlan,
    temperature: float,
    seed: int,
) -> SampledRun:
    """Tune LayerSkip at `temperature` on `tune_prompts`, then run every setting on `prompts` (module
    docstring)."""
    sampling = Sampling(temperature)
    records: list[dict] = []
    grid = layerskip_grid(len(engine.head_layers), plan.layerskip_d)
    for i, prompt in enumerate(tune_prompts):
        for setting in grid:
            records.append(run_sampled(engine, setting, prompt, "tune", i, sampling, seed, plan))
    best = select_layerskip(grid, plan.layerskip_select)
    test = greedy_report.test
    run = SampledRun(
        temperature,
        grid,
        greedy=Setting("greedy", strategy=Greedy()),
        layerskip=Setting("layerskip", head=best.head, draft_len=best.draft_len, strategy=best.strategy),
        layerskip_nobonus=Setting(
            "layerskip_nobonus",
            head=best.head,
            draft_len=best.draft_len,
            strategy=LayerSkip(best.head, best.draft_len, bonus=False),
        ),
        dssd_paper=[_copy(s) for s in test.dssd_paper],
        dssd=[_copy(s) for s in test.dssd],
        records=records,
    )
    for i, prompt in enumerate(prompts):  # interleaved per prompt: load changes hit every method alike
        for setting in run.test_settings:
            records.append(run_sampled(engine, setting, prompt, "test", i, sampling, seed, plan))
    return run


def run_sampled_decoding(
    engine: Engine,
    greedy_report: DecodingReport,
    prompts: Sequence[torch.Tensor],
    tune_prompts: Sequence[torch.Tensor],
    plan: DecodingPlan,
    temperatures: Sequence[float],
    seed: int,
) -> SampledDecoding:
    """One `SampledRun` per temperature > 0 in `temperatures` (0 is the greedy run, already done)."""
    runs = [
        run_temperature(engine, greedy_report, prompts, tune_prompts, plan, float(t), seed)
        for t in temperatures
        if t > 0
    ]
    return SampledDecoding(runs, list(engine.head_layers), seed)
