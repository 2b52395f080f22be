"""The decoding harness: every decoding method on the same prompts, timed interleaved, lossless by check.

Used by the `decoding` stage and by benchmarks/decoding_speed.py::

    plan = DecodingPlan(max_new_tokens=64, policies={0.8: policy}, layerskip_d=[1, 2, 4], max_draft=16)
    report = run_decoding(engine, model, prompts, tune_prompts, plan, progress=True)
    report.rows(), report.summary_table(), report.per_prompt_table(), report.speed_table(label)

Each prompt decodes `max_new_tokens` tokens (EOS stops generation only when `plan.eos_token_id` is given, so
that by default every method produces the same number of tokens and speeds compare per token).

1. Tuning prompts: transformers `generate(do_sample=False)` (the reference), our engine's greedy, the
   LayerSkip grid (every head × d in `layerskip_d`) and the DSSD grid (every ε of `policies` × consulted
   heads — each single head, and all heads — × `dssd_max_draft` × adaptive-stop γ in `dssd_gamma`, plus per ε
   the calibrate stage's exit set, γ and cap; a head not consulted gets threshold None).
   Both grids are tuned by the same criterion, `layerskip_select`: by default the fewest layer-equivalents
   per generated token (= most tokens per unit of verification + drafting compute, the quantity LayerSkip's
   own sweep optimises, measured without wall-clock noise on a shared machine); ties go to more accepted
   tokens per verification, then (LayerSkip) the shallower head and the shorter draft, (DSSD) the smaller
   draft cap, fewer heads and the smaller γ. `"latency_equiv_per_token"` selects by the deterministic speed
   proxy, `"tokens_per_s"` by measured speed. This phase also warms up every code path before anything
   reported is timed.
2. Test prompts, interleaved per prompt (load changes hit every method alike): `generate`, `greedy`,
   `early_exit` per ε and fill (lossy, optional), the tuned `layerskip`, `layerskip_nobonus` (the same head
   and d without the bonus token: the paper author's baseline), `dssd_paper` per ε (the paper's rule:
   every head, no early stop, cap `max_draft`: the reproduction), `dssd` per ε (the improved DSSD: the
   calibrate stage's exit set and adaptive stop γ, `exit_sets`), `dssd_tuned` (the DSSD grid's choice),
   generators outside the engine (e.g.
   transformers' assistant_early_exit), and the oracle bound (greedy with every head probed: the earliest
   head that agrees with the full model, per token).
3. Losslessness: on every prompt (tuning and test) the engine's greedy must equal `generate`, and every
   LayerSkip / DSSD output and the oracle probe's tokens must equal the engine's greedy, token for token — in
   bf16/fp16 up to near-ties (pipeline/evaluation/losslessness.py), counted per setting (`near_ties`).
   Checking the speculative methods against the engine's greedy (same kernels) rather than `generate` means a
   near-tie between the engine and transformers cannot hide a later difference. A mismatch raises
   `LosslessnessError`. Generators outside the engine are compared, not enforced (`identical_to_greedy`).

Timing: each run is repeated `repeats` times (after `warmup` untimed runs) back to back; a prompt's wall time
is the median of its repeats, a setting's tokens/s is its tokens over the sum of those medians.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from pipeline.engine import DSSD, EarlyExit, Engine, Greedy, LayerSkip, PerfectGate, Strategy
from pipeline.evaluation.decoding_report import DecodingReport, DSSDTuning, LayerSkipTuning, Setting, TestRun
from pipeline.evaluation.decoding_tuning import (
    SELECT_CRITERIA,
    choice_note,
    dssd_grid,
    improved_dssd,
    layerskip_grid,
    select_dssd,
    select_layerskip,
)
from pipeline.evaluation.losslessness import (
    EXACT,
    NEAR_TIE,
    LosslessnessError,
    Verdict,
    check_lossless,
    mismatch_message,
)

log = logging.getLogger(__name__)

PROMPT_SPLITS = {"test": "test", "tune": "validation"}  # reported prompts and LayerSkip tuning prompts


class ExternalMethod(NamedTuple):
    """A generator outside the engine, timed like `generate`: fn(prompt) -> new tokens."""

    method: str
    note: str
    generate: Callable[[torch.Tensor], list[int]]


@dataclass
class DecodingPlan:
    """What to run. `policies`: ε -> exit policy (`ExitThresholds.for_eps`), for early exit and DSSD; an empty
    `early_exit_fills` skips early exit. `max_draft` caps the paper's DSSD rows (`dssd_paper`);
    `dssd_max_draft` and `dssd_gamma` list the caps and adaptive-stop γ the DSSD grid tunes over.
    `exit_sets`: ε -> the calibrate stage's DSSD choice (`ExitThresholds.exit_set`: consulted heads, γ, cap),
    the improved per-ε rows `dssd` (none without it); `draft_accuracy` is the per-draft accuracy γ reads
    (`ExitThresholds.draft_accuracy`; needed for any γ > 0). `dssd_policies`: ε -> the improved DSSD's exit
    policy (`dssd`, `dssd_tuned`) where it has a signal of its own (`dssd_thresholds.json`); empty: `policies`.
    `external(tuned)` returns generators outside the engine, built once LayerSkip is tuned (they may reuse its
    head and draft length)."""

    max_new_tokens: int
    policies: dict[float, Any]
    layerskip_d: Sequence[int]
    max_draft: int = 16
    dssd_max_draft: Sequence[int] = (1, 2, 4, 16)
    dssd_gamma: Sequence[float] = (0.0,)
    exit_sets: dict[float, Any] = field(default_factory=dict)
    draft_accuracy: Any = None
    dssd_policies: dict[float, Any] = field(default_factory=dict)
    layerskip_select: str = SELECT_CRITERIA[0]
    early_exit_fills: Sequence[str] = ("lazy",)
    repeats: int = 1
    warmup: int = 0
    eos_token_id: int | None = None
    pad_token_id: int = 0
    oracle: bool = True
    calibration: str = ""  # the calibration method of `policies` (a label on early-exit and DSSD rows)
    external: Callable[[Setting], Sequence[ExternalMethod]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.layerskip_select not in SELECT_CRITERIA:
            raise ValueError(f"layerskip_select={self.layerskip_select!r}; choose one of {SELECT_CRITERIA}")
        if not self.layerskip_d:
            raise ValueError("layerskip_d must list at least one draft length")
        if not self.dssd_max_draft or min(self.dssd_max_draft) < 1:
            raise ValueError(f"dssd_max_draft must list draft caps >= 1, got {list(self.dssd_max_draft)}")
        if not self.dssd_gamma or any(not 0.0 <= g <= 1.0 for g in self.dssd_gamma):
            raise ValueError(f"dssd_gamma must list γ values in [0, 1], got {list(self.dssd_gamma)}")
        if self.draft_accuracy is None and (
            any(g > 0 for g in self.dssd_gamma) or any(c.min_chain_prob > 0 for c in self.exit_sets.values())
        ):
            raise ValueError(
                "a γ > 0 (dssd_gamma or a stored exit set) needs the per-draft accuracy: pass "
                "draft_accuracy=ExitThresholds.draft_accuracy (written by the calibrate stage)"
            )

    @property
    def improved_policies(self) -> dict[float, Any]:
        """ε -> the exit policy of the improved DSSD (`dssd`, the `dssd_tuned` grid)."""
        return self.dssd_policies or self.policies


def hf_greedy(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    **generation: Any,
) -> list[int]:
    """transformers' greedy `generate` with an explicit GenerationConfig: the reference. EOS stops it only
    when `eos_token_id` is given, whatever the model's own generation_config says. `generation` adds
    options, e.g. assistant_early_exit=k."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        num_beams=1,
        **generation,
    )
    # transformers fills a passed config's unset fields from the model's own generation_config, its EOS
    # included: without clearing that, EOS would stop the reference where the engine goes on.
    model_eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = eos_token_id
    try:
        with torch.inference_mode():
            out = model.generate(
                prompt.view(1, -1),
                attention_mask=torch.ones(1, prompt.numel(), dtype=torch.long, device=prompt.device),
                generation_config=config,
            )
    finally:
        model.generation_config.eos_token_id = model_eos
    return out[0, prompt.numel() :].tolist()


def check_identical(
    reference: list[int],
    tokens: list[int],
    what: str,
    against: str,
    split: str,
    index: int,
    *,
    prompt: torch.Tensor | None = None,
    engine: Engine | None = None,
    setting: Setting | None = None,
) -> Verdict:
    """Raise `LosslessnessError` naming the first differing position unless `tokens` reproduce `reference`.
    Given the `prompt` and the `engine`, a difference is classified (pipeline/evaluation/losslessness.py): a
    near-tie of a bf16/fp16 model passes and is counted on `setting.near_ties`; without them any difference
    raises."""
    if prompt is None or engine is None:
        if tokens != reference:
            raise LosslessnessError(mismatch_message(reference, tokens, what, against, split, index))
        return Verdict(EXACT)
    verdict = check_lossless(reference, tokens, prompt, engine, what, against, split, index)
    if verdict.kind == NEAR_TIE:
        log.info("%s: near-tie on %s prompt %d: %s", what, split, index, verdict.divergence.describe())
        if setting is not None:
            setting.near_ties += 1
    return verdict


class TimedRunner:
    """Runs settings on prompts: `warmup` untimed then `repeats` timed runs per call (median wall time), and
    one per-prompt record per call (`records`, the `per_prompt` table)."""

    def __init__(
        self,
        model: torch.nn.Module,
        engine: Engine,
        plan: DecodingPlan,
        on_run: Callable[[], None] = lambda: None,
    ) -> None:
        self.model, self.engine, self.plan, self.on_run = model, engine, plan, on_run
        self.records: list[dict] = []

    def _once(self, setting: Setting, prompt: torch.Tensor) -> tuple[list[int], Any, float]:
        plan = self.plan
        if isinstance(setting.strategy, Strategy):
            result = self.engine.generate(prompt, setting.strategy, plan.max_new_tokens, plan.eos_token_id)
            result.stats.check()
            return result.tokens, result.stats, result.stats.wall_time_s
        started = time.perf_counter()
        if setting.strategy is None:
            tokens = hf_greedy(self.model, prompt, plan.max_new_tokens, plan.eos_token_id, plan.pad_token_id)
        else:
            tokens = setting.strategy(prompt)
        return tokens, None, time.perf_counter() - started

    def run(self, setting: Setting, prompt: torch.Tensor, split: str, index: int) -> list[int]:
        for _ in range(self.plan.warmup):
            self._once(setting, prompt)
        walls, tokens, stats = [], [], None
        for _ in range(self.plan.repeats):
            tokens, stats, wall = self._once(setting, prompt)
            walls.append(wall)
        setting.tokens.append(tokens)
        setting.repeat_walls.append(walls)
        setting.wall.append(statistics.median(walls))
        if stats is not None:
            setting.stats.append(stats)
        self._record(split, index, setting)
        self.on_run()
        return tokens

    def _record(self, split: str, index: int, setting: Setting) -> None:
        stats = setting.stats[-1].as_dict() if isinstance(setting.strategy, Strategy) else {}
        n_tokens, wall = len(setting.tokens[-1]), setting.wall[-1]
        self.records.append(
            {
                "split": split,
                "prompt": index,
                "method": setting.method,
                "eps": setting.eps,
                "head": setting.head,
                "draft_len": setting.draft_len,
                "setting": setting.label,
                "n_tokens": n_tokens,
                "wall_s": wall,
                "tokens_per_s": n_tokens / wall if wall else math.nan,
                **{
                    k: v
                    for k, v in stats.items()
                    if k not in ("strategy", "wall_time_s", "tokens_per_second")
                },
            }
        )


# --- the run ------------------------------------------------------------------------------------------------


def run_decoding(
    engine: Engine,
    model: torch.nn.Module,
    prompts: Sequence[torch.Tensor],
    tune_prompts: Sequence[torch.Tensor],
    plan: DecodingPlan,
    progress: bool = False,
) -> DecodingReport:
    """Tune LayerSkip on `tune_prompts`, then run every setting on `prompts` (module docstring)."""
    from tqdm.auto import tqdm

    n_heads = len(engine.head_layers)
    layerskip_settings = layerskip_grid(n_heads, plan.layerskip_d)
    grid = dssd_grid(plan)
    with tqdm(
        total=len(tune_prompts) * (2 + len(layerskip_settings) + len(grid)),
        desc="decoding",
        unit="gen",
        disable=not progress,
    ) as bar:
        runner = TimedRunner(model, engine, plan, on_run=lambda: bar.update(1))
        tuning = tune(runner, tune_prompts, layerskip_settings, grid)
        dssd_tuning = DSSDTuning(
            grid, select_dssd(grid, plan.layerskip_select) if grid else None, tuning.criterion
        )
        log.info(
            "LayerSkip tuned on %d prompts by %s: head %d (block %d), d=%d",
            len(tune_prompts),
            tuning.criterion,
            tuning.best.head,
            engine.head_layers[tuning.best.head],
            tuning.best.draft_len,
        )
        if dssd_tuning.best is not None:
            log.info(
                "DSSD tuned on %d prompts by %s: %s",
                len(tune_prompts),
                tuning.criterion,
                dssd_tuning.best.detail,
            )
        test = _test_settings(plan, tuning.best, dssd_tuning.best)
        per_prompt = len(test.engine_settings) + len(test.external) + int(plan.oracle)
        bar.total += len(prompts) * per_prompt
        bar.refresh()
        for i, prompt in enumerate(prompts):
            bound = decode_test_prompt(runner, test, prompt, i)
            if bound is not None:
                test.bounds.append(bound)
                bar.update(1)
    return DecodingReport(
        head_layers=list(engine.head_layers),
        max_draft=plan.max_draft,
        tuning=tuning,
        test=test,
        per_prompt=runner.records,
        dssd_tuning=dssd_tuning,
    )


def tune(
    runner: TimedRunner,
    prompts: Sequence[torch.Tensor],
    layerskip_grid: Sequence[Setting],
    dssd_grid: Sequence[Setting],
) -> LayerSkipTuning:
    """Phase 1: the reference, greedy, every LayerSkip (head, d) and every DSSD grid setting on the tuning
    prompts, interleaved per prompt and all checked against the reference; LayerSkip's choice is returned
    (DSSD's is `select_dssd` over the filled `dssd_grid`)."""
    plan = runner.plan
    generate, greedy = Setting("generate"), Setting("greedy", strategy=Greedy())
    for i, prompt in enumerate(prompts):
        ref = runner.run(generate, prompt, "tune", i)
        greedy_tokens = runner.run(greedy, prompt, "tune", i)
        judged_by = {"prompt": prompt, "engine": runner.engine}
        check_identical(
            ref,
            greedy_tokens,
            "greedy (engine)",
            "transformers generate",
            "tuning",
            i,
            **judged_by,
            setting=greedy,
        )
        for setting in (*layerskip_grid, *dssd_grid):
            tokens = runner.run(setting, prompt, "tune", i)
            check_identical(
                greedy_tokens, tokens, setting.label, "greedy", "tuning", i, **judged_by, setting=setting
            )
    best = select_layerskip(layerskip_grid, plan.layerskip_select)
    return LayerSkipTuning(generate, greedy, list(layerskip_grid), best, plan.layerskip_select)


def _test_settings(plan: DecodingPlan, tuned: Setting, dssd_tuned: Setting | None) -> TestRun:
    several_fills = len(plan.early_exit_fills) > 1
    early_exit = [
        Setting(
            "early_exit",
            eps=eps,
            strategy=EarlyExit(policy, fill=fill),
            note=f"fill={fill}" if several_fills else None,
            labels={"calibration": plan.calibration, "confidence": policy.metric, "fill": fill},
        )
        for eps, policy in plan.policies.items()
        for fill in plan.early_exit_fills
    ]
    layerskip = Setting(
        "layerskip",
        head=tuned.head,
        draft_len=tuned.draft_len,
        strategy=LayerSkip(tuned.head, tuned.draft_len),
    )
    labels = {
        eps: {"calibration": plan.calibration, "confidence": p.metric} for eps, p in plan.policies.items()
    }
    dssd_paper = [  # the paper's rule: every head the ε enables, no early stop, cap `max_draft`
        Setting("dssd_paper", eps=eps, strategy=DSSD(policy, max_draft=plan.max_draft), labels=labels[eps])
        for eps, policy in plan.policies.items()
    ]
    dssd = [  # the calibrate stage's choice per ε: consulted heads, adaptive stop γ, cap
        Setting(
            "dssd",
            eps=eps,
            strategy=improved_dssd(policy, plan.exit_sets[eps], plan.draft_accuracy),
            note=choice_note(plan.exit_sets[eps]),
            labels={"calibration": plan.calibration, "confidence": policy.metric},
        )
        for eps, policy in plan.improved_policies.items()
        if eps in plan.exit_sets
    ]
    external = [
        Setting(m.method, strategy=m.generate, note=m.note)
        for m in (plan.external(tuned) if plan.external else ())
    ]
    nobonus = Setting(
        "layerskip_nobonus",
        head=tuned.head,
        draft_len=tuned.draft_len,
        strategy=LayerSkip(tuned.head, tuned.draft_len, bonus=False),
    )
    chosen = None
    if dssd_tuned is not None:
        chosen = Setting(
            "dssd_tuned",
            eps=dssd_tuned.eps,
            strategy=dssd_tuned.strategy,  # strategies hold no state between generations
            note=dssd_tuned.note,
            labels=dict(dssd_tuned.labels),
        )
    # The perfect gate's strategy is made per prompt from that prompt's oracle bound (decode_test_prompt).
    perfect_gate = (
        Setting("dssd_perfect_gate", strategy=PerfectGate([], plan.max_draft)) if plan.oracle else None
    )
    return TestRun(
        Setting("generate"),
        Setting("greedy", strategy=Greedy()),
        early_exit,
        layerskip,
        dssd_paper,
        external,
        [],
        layerskip_nobonus=nobonus,
        dssd_tuned=chosen,
        dssd=dssd,
        perfect_gate=perfect_gate,
    )


def decode_test_prompt(runner: TimedRunner, test: TestRun, prompt: torch.Tensor, index: int) -> Any:
    """Phase 2 on one prompt: every setting in turn, lossless ones checked; returns the oracle bound (None
    without the oracle)."""
    ref = runner.run(test.generate, prompt, "test", index)
    greedy_tokens = runner.run(test.greedy, prompt, "test", index)
    judged_by = {"prompt": prompt, "engine": runner.engine}
    check_identical(
        ref,
        greedy_tokens,
        "greedy (engine)",
        "transformers generate",
        "test",
        index,
        **judged_by,
        setting=test.greedy,
    )
    for setting in test.early_exit:
        runner.run(setting, prompt, "test", index)
    bound = None
    if runner.plan.oracle:
        bound = runner.engine.oracle_bound(prompt, runner.plan.max_new_tokens, runner.plan.eos_token_id)
        check_identical(
            greedy_tokens, bound.tokens, "oracle probe (greedy)", "greedy", "test", index, **judged_by
        )
        test.perfect_gate.strategy = PerfectGate(bound.earliest_head, runner.plan.max_draft)
    for setting in test.lossless:
        tokens = runner.run(setting, prompt, "test", index)
        check_identical(
            greedy_tokens, tokens, setting.label, "greedy", "test", index, **judged_by, setting=setting
        )
    for setting in test.external:
        runner.run(setting, prompt, "test", index)
    return bound


def prompt_windows(
    source: Any, tokenizer: Any, n_prompts: int, n_tune_prompts: int, prompt_len: int, key_prefix: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reported prompts (test split) and the disjoint tuning prompts (validation split): consecutive
    windows of `prompt_len` tokens. `key_prefix` names the config keys in a budget error."""
    from pipeline.data.tokens import token_blocks

    out = []
    for name, n in (("n_prompts", n_prompts), ("n_tune_prompts", n_tune_prompts)):
        split = PROMPT_SPLITS["test" if name == "n_prompts" else "tune"]
        budget_key = f"{key_prefix}{name} × {key_prefix}prompt_len" if key_prefix else None
        out.append(token_blocks(source, tokenizer, split, n * prompt_len, prompt_len, budget_key=budget_key))
    return out[0], out[1]
