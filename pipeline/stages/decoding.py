"""Stage `decoding`: greedy, early exit, the LayerSkip grid and DSSD per ε on real prompts; lossless by check.

Prompts: `n_prompts` windows of `prompt_len` tokens from the test split (the reported prompts) and a disjoint
set of `n_tune_prompts` windows from the validation split (LayerSkip tuning only). Each prompt decodes
`max_new_tokens` tokens (EOS does not stop generation unless `stop_at_eos`, so every method produces the same
number of tokens and speeds compare per token).

1. Tuning prompts: transformers `generate(do_sample=False)` (the reference), our engine's greedy, and the
   LayerSkip grid, every head × d in `layerskip_d`. The tuned setting is the one with the fewest
   layer-equivalents per generated token (= most tokens per unit of verification + drafting compute, the
   quantity LayerSkip's own sweep optimises, measured without wall-clock noise on a shared machine); ties go
   to more accepted tokens per verification. `layerskip_select: tokens_per_s` selects by measured speed
   instead. This phase also warms up every code path before anything reported is timed.
2. Test prompts, interleaved per prompt (load changes hit every method alike): `generate`, `greedy`,
   `early_exit` per ε (lossy, optional), the tuned `layerskip`, `dssd` per ε (thresholds of
   `calibration_method` from the calibrate stage), and the oracle bound (greedy with every head probed: the
   earliest head that agrees with the full model, per token).
3. Losslessness: on every prompt (tuning and test) greedy must equal `generate`, and every LayerSkip / DSSD
   output must equal greedy, token for token. A mismatch raises `LosslessnessError`; nothing is written.

Rows (pipeline/orchestration/results.py), counters summed over prompts before ratios are taken:
  method generate|greedy|early_exit|layerskip|dssd, eps (early_exit, dssd), head -:
      tokens_per_s, speedup_vs_generate (tokens/s over generate's on the same prompts), layer_equiv_per_token,
      tokens_per_full_pass, identical (1 = every prompt identical to greedy `generate`; lossless methods only),
      acceptance_rate, accepted_per_verification, drafted_per_token (speculative methods);
      early_exit: agreement (share of positions equal to greedy; lossy, so no `identical`).
  method early_exit|dssd|layerskip, head i: exit_frac (early exit) / draft_frac (drafts by head i per token).
  method layerskip: draft_head, draft_len (the tuned setting).
  method layerskip_grid, head i, extra column draft_len: the same metrics on the tuning prompts.
  method oracle: layer_equiv_per_token (exit at the earliest agreeing head, no fill: a lower bound),
      cascade_layer_equiv_per_token (also paying each shallower head), exit_frac (head all and per head),
      acceptance_rate (1 by construction) and accepted_per_verification of an oracle drafter under the same
      `max_draft` cap (drafts exactly the tokens some head gets right), identical.
  method dssd_vs_layerskip, eps e: acceptance_ratio, accepted_per_verification_ratio (DSSD / tuned LayerSkip),
      layer_equiv_ratio, speed_ratio.
Tables: `per_prompt` (one line per split × prompt × method × setting, every statistic of
`GenerationStats.as_dict()`), `summary` (the logged per-setting table).
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig, ListConfig

from pipeline.orchestration.results import row
from pipeline.orchestration.validation import ConfigError, check_eps
from pipeline.stages.base import Stage, StageContext, StageOutput

log = logging.getLogger(__name__)
THRESHOLDS_FILE = "thresholds.json"
SELECT_CRITERIA = ("layer_equiv_per_token", "tokens_per_s")
SPECULATIVE = ("layerskip", "layerskip_grid", "dssd")


class LosslessnessError(RuntimeError):
    """A lossless decoding strategy produced tokens different from greedy decoding of the full model."""


# --- config -----------------------------------------------------------------------------------------------------


def key_config(cfg: DictConfig) -> dict:
    d = cfg.decoding
    return {
        "n_prompts": int(d.n_prompts),
        "n_tune_prompts": int(d.n_tune_prompts),
        "prompt_len": int(d.prompt_len),
        "max_new_tokens": int(d.max_new_tokens),
        "eps": [float(e) for e in d.eps],
        "calibration_method": str(d.calibration_method),
        "max_draft": int(d.max_draft),
        "layerskip_d": [int(x) for x in d.layerskip_d],
        "layerskip_select": str(d.get("layerskip_select", SELECT_CRITERIA[0])),
        "early_exit": bool(d.get("early_exit", True)),
        "early_exit_fill": str(d.get("early_exit_fill", "lazy")),
        "stop_at_eos": bool(d.get("stop_at_eos", False)),
        "repeats": int(d.get("repeats", 1)),
        "seed": int(cfg.seed),
    }


def _int(value: Any, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")
    if int(value) < minimum:
        raise ConfigError(f"{key} must be >= {minimum}, got {value}")
    return int(value)


def validate(cfg: DictConfig) -> None:
    from pipeline.engine import FILL_POLICIES
    from pipeline.exits.calibration import eps_key

    d = cfg.decoding
    eps = check_eps(list(d.eps) if isinstance(d.eps, ListConfig | list | tuple) else d.eps, "decoding.eps")
    if not eps:
        raise ConfigError("decoding.eps must list at least one ε (e.g. [0.8, 0.9])")
    calibrated = {eps_key(e) for e in cfg.calibrate.eps}
    missing = [e for e in eps if eps_key(e) not in calibrated]
    if missing:
        raise ConfigError(
            f"decoding.eps {missing} are not calibrated (calibrate.eps={list(cfg.calibrate.eps)}); "
            "add them to calibrate.eps or drop them from decoding.eps"
        )
    if d.calibration_method not in cfg.calibrate.methods:
        raise ConfigError(
            f"decoding.calibration_method={d.calibration_method!r} is not calibrated "
            f"(calibrate.methods={list(cfg.calibrate.methods)})"
        )
    _int(d.n_prompts, "decoding.n_prompts", 1)
    _int(d.n_tune_prompts, "decoding.n_tune_prompts", 1)
    prompt_len = _int(d.prompt_len, "decoding.prompt_len", 1)
    new_tokens = _int(d.max_new_tokens, "decoding.max_new_tokens", 1)
    _int(d.max_draft, "decoding.max_draft", 1)
    _int(d.get("repeats", 1), "decoding.repeats", 1)
    if not isinstance(d.layerskip_d, ListConfig | list | tuple) or not d.layerskip_d:
        raise ConfigError(
            f"decoding.layerskip_d must be a non-empty list of draft lengths >= 1, got {d.layerskip_d!r}"
        )
    for value in d.layerskip_d:
        _int(value, "decoding.layerskip_d entries (LayerSkip draft lengths)", 1)
    max_len = int(cfg.model.get("max_seq_len") or 0)
    if max_len and prompt_len + new_tokens > max_len:
        raise ConfigError(
            f"decoding.prompt_len + decoding.max_new_tokens = {prompt_len + new_tokens} exceeds "
            f"{cfg.model.name}'s maximum sequence length {max_len}; shorten one of them"
        )
    if str(d.get("layerskip_select", SELECT_CRITERIA[0])) not in SELECT_CRITERIA:
        raise ConfigError(
            f"decoding.layerskip_select={d.layerskip_select!r}; choose one of {list(SELECT_CRITERIA)}"
        )
    if str(d.get("early_exit_fill", "lazy")) not in FILL_POLICIES:
        raise ConfigError(
            f"decoding.early_exit_fill={d.early_exit_fill!r}; choose one of {list(FILL_POLICIES)}"
        )


# --- measurement helpers -------------------------------------------------------------------------------------------


@dataclass
class Setting:
    """One method/setting and what it did on a set of prompts."""

    method: str
    eps: float | None = None
    head: int | None = None
    draft_len: int | None = None
    strategy: Any = None  # None for transformers generate
    tokens: list[list[int]] = field(default_factory=list)
    stats: list[Any] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        parts = [self.method]
        if self.eps is not None:
            parts.append(f"eps={self.eps:g}")
        if self.head is not None:
            parts.append(f"head={self.head}")
        if self.draft_len is not None:
            parts.append(f"d={self.draft_len}")
        return " ".join(parts)

    def total(self, key: str) -> float:
        return sum(getattr(s, key) for s in self.stats)

    @property
    def generated(self) -> int:
        return sum(map(len, self.tokens))

    @property
    def tokens_per_s(self) -> float:
        wall = sum(self.wall)
        return self.generated / wall if wall > 0 else math.nan

    def summary(self) -> dict[str, float]:
        out = {"tokens_per_s": self.tokens_per_s}
        if not self.stats:
            return out
        gen = self.total("generated")
        drafted, accepted, verifications = (
            self.total("drafted"),
            self.total("accepted"),
            self.total("verifications"),
        )
        passes = self.total("full_passes") + self.total("prefill_tokens")
        out["layer_equiv_per_token"] = self.total("layer_equivalents") / gen if gen else math.nan
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


def hf_greedy(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | None,
    pad_token_id: int,
) -> list[int]:
    """transformers' greedy `generate`: the reference. EOS stops it only when `eos_token_id` is given."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        num_beams=1,
    )
    with torch.inference_mode():
        out = model.generate(
            prompt.view(1, -1),
            attention_mask=torch.ones(1, prompt.numel(), dtype=torch.long, device=prompt.device),
            generation_config=config,
        )
    return out[0, prompt.numel() :].tolist()


class Runner:
    """Runs settings on prompts, times them (median over repeats) and checks losslessness per prompt."""

    def __init__(self, model, engine, max_new_tokens: int, eos: int | None, pad: int, repeats: int, bar):
        self.model, self.engine = model, engine
        self.max_new_tokens, self.eos, self.pad, self.repeats = max_new_tokens, eos, pad, repeats
        self.bar = bar

    def run(self, setting: Setting, prompt: torch.Tensor) -> list[int]:
        walls, tokens, stats = [], None, None
        for _ in range(self.repeats):
            if setting.strategy is None:
                started = _now()
                tokens = hf_greedy(self.model, prompt, self.max_new_tokens, self.eos, self.pad)
                walls.append(_now() - started)
            else:
                result = self.engine.generate(prompt, setting.strategy, self.max_new_tokens, self.eos)
                result.stats.check()
                tokens, stats = result.tokens, result.stats
                walls.append(stats.wall_time_s)
        setting.tokens.append(tokens)
        setting.wall.append(statistics.median(walls))
        if stats is not None:
            setting.stats.append(stats)
        self.bar.update(1)
        return tokens


def _now() -> float:
    import time

    return time.perf_counter()


def check_identical(
    reference: list[int], tokens: list[int], what: str, against: str, split: str, index: int
) -> None:
    if tokens == reference:
        return
    first = next(
        (i for i, (a, b) in enumerate(zip(reference, tokens, strict=False)) if a != b),
        min(len(reference), len(tokens)),
    )
    raise LosslessnessError(
        f"{what} is not lossless: on {split} prompt {index} its {len(tokens)} tokens differ from {against}'s "
        f"{len(reference)} tokens at position {first} ({tokens[first : first + 5]} vs {reference[first : first + 5]}). "
        "DSSD/LayerSkip/greedy must reproduce greedy decoding of the full model exactly; this is a bug in the "
        "engine or a numerically unstable model (try model.dtype=float32)."
    )


def oracle_speculation(earliest: list[int | None], max_draft: int) -> tuple[int, int]:
    """An oracle drafter under DSSD's rules: it drafts a token exactly when some head gets it right, stops
    at the first token no head gets right (that token comes from the verifying pass) or at `max_draft`
    drafts. Returns (accepted drafts, verifications). The first token (from the prompt's pass) is never
    drafted."""
    accepted = verifications = 0
    i, n = 1, len(earliest)
    while i < n:
        cap = min(max_draft, n - i - 1)
        run = 0
        while run < cap and earliest[i + run] is not None:
            run += 1
        if run:
            accepted += run
            verifications += 1
        i += run + 1
    return accepted, verifications


def _rows_for(
    setting: Setting, generate_tps: float, reference: list[list[int]] | None, **extra: Any
) -> list[dict]:
    common = {"method": setting.method, "eps": setting.eps, **extra}
    out = []
    summary = setting.summary()
    summary["speedup_vs_generate"] = summary["tokens_per_s"] / generate_tps if generate_tps > 0 else math.nan
    for metric, value in summary.items():
        if not (isinstance(value, float) and math.isnan(value)):
            out.append(row(metric, value, **common))
    if setting.method == "early_exit":
        same = sum(
            a == b
            for ref, toks in zip(reference, setting.tokens, strict=True)
            for a, b in zip(ref, toks, strict=False)
        )
        out.append(row("agreement", same / sum(map(len, reference)), **common))
        out += [
            row("exit_frac", f, head=k, **common) for k, f in enumerate(setting.per_head("exits_per_head"))
        ]
    else:
        # Lossless methods: the run would have raised on any mismatch, so this is 1 by the time rows exist.
        out.append(row("identical", float(setting.tokens == reference), **common))
    if setting.method in SPECULATIVE:
        out += [
            row("draft_frac", f, head=k, **common) for k, f in enumerate(setting.per_head("drafts_per_head"))
        ]
    return out


# --- run --------------------------------------------------------------------------------------------------------


@torch.no_grad()
def run(ctx: StageContext) -> StageOutput:
    from tqdm.auto import tqdm

    from pipeline.data.tokens import make_text_source, token_blocks
    from pipeline.engine import DSSD, EarlyExit, Engine, Greedy, LayerSkip
    from pipeline.exits.calibration import ExitThresholds
    from pipeline.exits.heads import EarlyExitHeads
    from pipeline.models.backbone import load_from_stage_output

    cfg, d = ctx.cfg, ctx.cfg.decoding
    model, tokenizer = load_from_stage_output(
        ctx.inputs["backbone"], dtype=cfg.model.dtype, device=ctx.device
    )
    heads = EarlyExitHeads.load(ctx.inputs["heads"], model).to(ctx.device).eval()
    thresholds = ExitThresholds.load(Path(ctx.inputs["calibrate"]) / THRESHOLDS_FILE)
    method, metric = str(d.calibration_method), thresholds.metric
    eps_list = [float(e) for e in d.eps]
    by_eps = {e: thresholds.for_eps(method, e) for e in eps_list}
    prompt_len, new_tokens, max_draft = int(d.prompt_len), int(d.max_new_tokens), int(d.max_draft)
    draft_lengths = [int(x) for x in d.layerskip_d]
    select = str(d.get("layerskip_select", SELECT_CRITERIA[0]))

    source = make_text_source(cfg.data)
    test = token_blocks(
        source,
        tokenizer,
        "test",
        int(d.n_prompts) * prompt_len,
        prompt_len,
        budget_key="decoding.n_prompts × decoding.prompt_len",
    ).to(ctx.device)
    tune = token_blocks(
        source,
        tokenizer,
        "validation",
        int(d.n_tune_prompts) * prompt_len,
        prompt_len,
        budget_key="decoding.n_tune_prompts × decoding.prompt_len",
    ).to(ctx.device)
    eos = tokenizer.eos_token_id if bool(d.get("stop_at_eos", False)) else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    engine = Engine(model, heads)
    n_heads = len(engine.head_layers)
    log.info(
        "decoding: %d test prompts, %d tuning prompts, %d+%d tokens; %s thresholds (%s) for ε=%s; heads at "
        "blocks %s; head cost %.2f blocks",
        len(test),
        len(tune),
        prompt_len,
        new_tokens,
        method,
        metric,
        eps_list,
        engine.head_layers,
        engine.cost.head,
    )

    use_ee = bool(d.get("early_exit", True))
    fill = str(d.get("early_exit_fill", "lazy"))
    grid = [
        Setting("layerskip_grid", head=k, draft_len=n, strategy=LayerSkip(k, n))
        for k in range(n_heads)
        for n in draft_lengths
    ]
    n_runs = len(tune) * (2 + len(grid)) + len(test) * (3 + (2 if use_ee else 1) * len(eps_list) + 1)
    bar = tqdm(total=n_runs, desc="decoding", unit="gen", disable=not ctx.progress)
    runner = Runner(model, engine, new_tokens, eos, pad, int(d.get("repeats", 1)), bar)
    per_prompt: list[dict] = []

    def record(split: str, index: int, setting: Setting) -> None:
        stats = setting.stats[-1].as_dict() if setting.strategy is not None else {}
        per_prompt.append(
            {
                "split": split,
                "prompt": index,
                "method": setting.method,
                "eps": setting.eps,
                "head": setting.head,
                "draft_len": setting.draft_len,
                "setting": setting.label,
                "n_tokens": len(setting.tokens[-1]),
                "wall_s": setting.wall[-1],
                "tokens_per_s": len(setting.tokens[-1]) / setting.wall[-1] if setting.wall[-1] else math.nan,
                **{
                    k: v
                    for k, v in stats.items()
                    if k not in ("strategy", "wall_time_s", "tokens_per_second")
                },
            }
        )

    # 1. Tuning prompts: reference, greedy, the LayerSkip grid (also warms up every path before timing).
    tune_generate, tune_greedy = Setting("generate"), Setting("greedy", strategy=Greedy())
    for i, prompt in enumerate(tune):
        ref = runner.run(tune_generate, prompt)
        record("tune", i, tune_generate)
        check_identical(
            ref, runner.run(tune_greedy, prompt), "greedy (engine)", "transformers generate", "tuning", i
        )
        record("tune", i, tune_greedy)
        for setting in grid:
            check_identical(ref, runner.run(setting, prompt), setting.label, "greedy", "tuning", i)
            record("tune", i, setting)

    def score(s: Setting) -> tuple:
        summary = s.summary()
        apv = summary.get("accepted_per_verification", math.nan)
        apv = -apv if not math.isnan(apv) else 0.0
        if select == "tokens_per_s":
            return (-summary["tokens_per_s"], apv, s.head, s.draft_len)
        return (summary["layer_equiv_per_token"], apv, s.head, s.draft_len)

    best = min(grid, key=score)
    log.info(
        "LayerSkip tuned on %d validation prompts by %s: head %d (block %d), d=%d",
        len(tune),
        select,
        best.head,
        engine.head_layers[best.head],
        best.draft_len,
    )

    # 2. Test prompts, interleaved per prompt.
    generate, greedy = Setting("generate"), Setting("greedy", strategy=Greedy())
    early = (
        [
            Setting("early_exit", eps=e, strategy=EarlyExit(by_eps[e], fill=fill))
            for e in eps_list
        ]
        if use_ee
        else []
    )
    layerskip = Setting(
        "layerskip", head=best.head, draft_len=best.draft_len, strategy=LayerSkip(best.head, best.draft_len)
    )
    dssd = [
        Setting("dssd", eps=e, strategy=DSSD(by_eps[e], max_draft=max_draft)) for e in eps_list
    ]
    bounds = []
    for i, prompt in enumerate(test):
        ref = runner.run(generate, prompt)
        record("test", i, generate)
        check_identical(
            ref, runner.run(greedy, prompt), "greedy (engine)", "transformers generate", "test", i
        )
        record("test", i, greedy)
        for setting in early:
            runner.run(setting, prompt)
            record("test", i, setting)
        for setting in (layerskip, *dssd):
            check_identical(ref, runner.run(setting, prompt), setting.label, "greedy", "test", i)
            record("test", i, setting)
        bound = engine.oracle_bound(prompt, new_tokens, eos)
        check_identical(ref, bound.tokens, "oracle probe (greedy)", "greedy", "test", i)
        bounds.append(bound)
        bar.update(1)
    bar.close()

    # 3. Rows.
    rows: list[dict] = []
    gen_tps = generate.tokens_per_s
    tune_gen_tps = tune_generate.tokens_per_s
    for setting in (generate, greedy, *early, layerskip, *dssd):
        rows += _rows_for(setting, gen_tps, generate.tokens)
    rows += [
        row("draft_head", best.head, method="layerskip"),
        row("draft_len", best.draft_len, method="layerskip"),
    ]
    for setting in grid:
        for r in _rows_for(
            setting,
            tune_gen_tps,
            tune_generate.tokens,
            layer=engine.head_layers[setting.head],
            draft_len=setting.draft_len,
        ):
            if r["head"] is None:  # per-head draft fractions of a one-head drafter carry no information
                r["head"] = setting.head
                rows.append(r)

    ls = layerskip.summary()
    for setting in dssd:
        ds = setting.summary()
        ratios = {
            "acceptance_ratio": ("acceptance_rate", ds, ls),
            "accepted_per_verification_ratio": ("accepted_per_verification", ds, ls),
            "layer_equiv_ratio": ("layer_equiv_per_token", ds, ls),
            "speed_ratio": ("tokens_per_s", ds, ls),
        }
        for name, (key, num, den) in ratios.items():
            # Always one row per ratio and ε (NaN when undefined, e.g. DSSD drafted nothing at this ε).
            a, b = num.get(key, math.nan), den.get(key, math.nan)
            rows.append(row(name, a / b if b > 0 else math.nan, method="dssd_vs_layerskip", eps=setting.eps))
        if not setting.total("drafted"):
            log.warning(
                "DSSD at ε=%g drafted nothing on the test prompts (no head is confident at this ε): it ran "
                "as greedy decoding; its acceptance ratios are undefined (NaN)",
                setting.eps,
            )

    n_tok = sum(len(b.oracle_cost) for b in bounds)
    accepted = verifications = 0
    per_head = [0] * n_heads
    for b in bounds:
        a, v = oracle_speculation(b.earliest_head, max_draft)
        accepted, verifications = accepted + a, verifications + v
        per_head = [x + y for x, y in zip(per_head, b.exits_per_head(), strict=True)]
    rows += [
        row("layer_equiv_per_token", sum(sum(b.oracle_cost) for b in bounds) / n_tok, method="oracle"),
        row(
            "cascade_layer_equiv_per_token", sum(sum(b.cascade_cost) for b in bounds) / n_tok, method="oracle"
        ),
        row("exit_frac", sum(per_head) / n_tok, method="oracle", head="all"),
        row("acceptance_rate", 1.0, method="oracle"),
        row("identical", 1.0, method="oracle"),
    ]
    rows += [row("exit_frac", c / n_tok, method="oracle", head=k) for k, c in enumerate(per_head)]
    if verifications:
        rows.append(row("accepted_per_verification", accepted / verifications, method="oracle"))

    summary = summary_table(rows)
    log.info(
        "decoding summary (test prompts; LayerSkip head %d d=%d tuned on validation prompts):\n%s",
        best.head,
        best.draft_len,
        summary.to_string(index=False, float_format=lambda x: f"{x:.3g}"),
    )
    ctx.tracker.log_table("decoding_summary", summary)
    metrics: dict[str, Any] = {
        "layerskip_head": best.head,
        "layerskip_draft_len": best.draft_len,
        "greedy_speedup_vs_generate": greedy.tokens_per_s / gen_tps,
        "test_prompts": len(test),
        "tune_prompts": len(tune),
        "identical": True,
    }
    for r in rows:
        if r["method"] == "dssd_vs_layerskip" and r["metric"] in (
            "acceptance_ratio",
            "accepted_per_verification_ratio",
        ):
            metrics[f"{r['metric']}@{r['eps']:g}"] = r["value"]
        if r["method"] == "dssd" and r["metric"] == "speedup_vs_generate":
            metrics[f"dssd_speedup@{r['eps']:g}"] = r["value"]
    ctx.tracker.summary({k: v for k, v in metrics.items() if isinstance(v, int | float)})
    table = pd.DataFrame(per_prompt)
    return StageOutput(rows=rows, metrics=metrics, tables={"per_prompt": table, "summary": summary})


SUMMARY_METRICS = (
    "tokens_per_s",
    "speedup_vs_generate",
    "layer_equiv_per_token",
    "acceptance_rate",
    "accepted_per_verification",
    "identical",
    "agreement",
)


def summary_table(rows: list[dict]) -> pd.DataFrame:
    """One line per method/ε (tuned LayerSkip and oracle included, grid excluded) with the main metrics and,
    on DSSD lines, the ratios to the tuned LayerSkip."""
    lines: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r["head"] is not None or r["method"] == "layerskip_grid":
            continue
        if r["method"] == "dssd_vs_layerskip":
            lines.setdefault(("dssd", r["eps"]), {})[r["metric"]] = r["value"]
        elif r["metric"] in SUMMARY_METRICS:
            lines.setdefault((r["method"], r["eps"]), {})[r["metric"]] = r["value"]
    columns = [*SUMMARY_METRICS, "acceptance_ratio", "accepted_per_verification_ratio"]
    return pd.DataFrame(
        [
            {"method": m, "eps": math.nan if e is None else e, **{c: v.get(c, math.nan) for c in columns}}
            for (m, e), v in lines.items()
        ],
        columns=["method", "eps", *columns],
    )


STAGE = Stage(
    name="decoding",
    upstream=("backbone", "extract", "heads", "calibrate"),
    key_config=key_config,
    run=run,
    validate=validate,
)
