"""The schema of every stage's config group: one dataclass per group, named after the stage that reads it.

Each field holds the default, the type, the range check and whether it is volatile (left out of the cache
key: pipeline/config/keys.py). conf/<group>/*.yaml repeat the defaults with comments for the reader; a test
keeps them equal (tests/test_configs.py). The ε levels are declared once, in `calibrate.eps`; `early_exit.eps`
and `decoding.eps` pick subsets of them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from pipeline.config.fields import (
    Settings,
    at_least,
    each,
    greater_than,
    one_of,
    optional,
    renamed_to,
    setting,
    within,
)
from pipeline.orchestration.validation import ConfigError, check_eps

# Registries owned by the modules that implement them, looked up only when a config is checked (they import
# torch; composing a config must not).


def _confidence_signal(name: str) -> str | None:
    """A metric name, or a pruned signal `<metric>@top<K>` (pipeline/exits/vocab_pruning.py)."""
    from pipeline.exits.confidence import METRICS, get_metric

    try:
        get_metric(name)
    except KeyError as err:
        if name.partition("@")[0] in METRICS:
            return str(err.args[0])  # a known metric with a malformed or inapplicable pruning suffix
        return f"choose one of {sorted(METRICS)}, or <metric>@top<K> over K candidate tokens (logit metrics)"
    return None


def _calibrated_signal(name: str) -> str | None:
    """A confidence signal (`_confidence_signal`), or a pruned one whose K is a share of the vocabulary,
    `<metric>@top<P>%` (resolved per model by the calibrate stage: `vocab_pruning.resolve_signal`)."""
    from pipeline.exits.vocab_pruning import pruned_signal_name, vocab_share

    try:
        share = vocab_share(name)
    except KeyError as err:
        return str(err.args[0])
    return _confidence_signal(name if share is None else pruned_signal_name(share[0], 2))


def _logit_metrics() -> list[str]:
    from pipeline.exits.confidence import METRICS

    return sorted(name for name, metric in METRICS.items() if not metric.needs_hidden)


def _calibration_methods() -> tuple[str, ...]:
    from pipeline.exits.thresholds import METHODS

    return METHODS


def _fill_policies() -> tuple[str, ...]:
    from pipeline.exits.cost import FILL_POLICIES

    return FILL_POLICIES


def _head_types() -> tuple[str, ...]:
    from pipeline.exits.heads import HEAD_TYPES

    return HEAD_TYPES


def _head_inits() -> tuple[str, ...]:
    from pipeline.exits.heads import INITS

    return INITS


def _generation_strategies() -> tuple[str, ...]:
    from pipeline.evaluation.lm_eval_adapter import GENERATION_STRATEGIES

    return GENERATION_STRATEGIES


def _layerskip_criteria() -> tuple[str, ...]:
    from pipeline.evaluation.decoding_tuning import SELECT_CRITERIA

    return SELECT_CRITERIA


def _eps_levels(values: list[float]) -> str | None:
    try:
        check_eps(values)
    except ConfigError as err:
        return str(err).removeprefix("eps: ")
    return None


def check_eps_subset(cfg: DictConfig, key: str, picked: list[float]) -> None:
    """Each ε a stage picks must be one the calibrate stage calibrated (its thresholds are looked up by ε)."""
    from pipeline.exits.thresholds import eps_key

    calibrated = {eps_key(e) for e in cfg.calibrate.eps}
    missing = [e for e in picked if eps_key(e) not in calibrated]
    if missing:
        raise ConfigError(
            f"{key} {missing} are not calibrated (calibrate.eps={list(cfg.calibrate.eps)}); "
            f"add them to calibrate.eps or drop them from {key}"
        )


def world_size(trainer_cfg: DictConfig) -> int | str:
    """Data-parallel processes of conf/trainer; "auto" or a device list is not resolvable before the run."""
    devices, nodes = trainer_cfg.get("devices", 1), int(trainer_cfg.get("num_nodes", 1) or 1)
    if isinstance(devices, int):
        return devices * nodes
    return str(devices)


# --- extract ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ExtractConfig(Settings):
    """Stage `extract` (token budgets per split live in data.budgets: the data group owns them)."""

    KEY = "extract"
    # Sequences per forward pass.
    batch_size: int = setting(16, check=at_least(1), volatile=True)
    # Tokens per shard file: storage layout only (readers index tokens across shards).
    shard_tokens: int = setting(65536, check=at_least(1), volatile=True)


# --- heads ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class HeadsConfig(Settings):
    """Stage `heads`: the head architecture and its training (where training runs is conf/trainer)."""

    KEY = "heads"
    head_type: str = setting("linear", check=one_of(_head_types))
    init: str = setting("unembedding", check=one_of(_head_inits))
    mlp_ratio: float = setting(1.0, check=greater_than(0))  # mlp heads: hidden width = mlp_ratio * d_model
    lr: float = setting(2e-3, check=greater_than(0))
    betas: list[float] = setting(factory=lambda: [0.9, 0.999], check=each(within(0, 1, high_open=True)))
    weight_decay: float = setting(0.0, check=at_least(0))
    warmup_steps: int = setting(20, check=at_least(0))
    min_lr_ratio: float = setting(0.0, check=within(0, 1))
    batch_tokens: int = setting(1024, check=at_least(1))  # per device
    max_steps: int = setting(60, check=at_least(1))
    val_tokens: int = setting(8192, check=at_least(1))
    val_every_n_steps: int = setting(60, check=at_least(1))
    checkpoint_every_n_steps: int | None = setting(None, check=optional(at_least(1)))
    eval_batch_tokens: int = setting(4096, check=at_least(1), volatile=True)
    num_workers: int = setting(0, check=at_least(0), volatile=True)

    def check(self, cfg: DictConfig) -> None:
        budget = OmegaConf.select(cfg, "data.budgets.train", default=None)
        trainer = cfg.get("trainer") or {}
        if budget is not None:
            world = world_size(trainer)
            per_step = self.batch_tokens * (world if isinstance(world, int) else 1)
            if self.val_tokens + per_step > int(budget):
                raise ConfigError(
                    f"heads.val_tokens ({self.val_tokens}) + one global batch ({per_step}) exceed the "
                    f"extracted train tokens (data.budgets.train={budget}): lower them or extract more"
                )
        reserved = {"max_steps", "max_epochs", "val_check_interval", "callbacks", "logger"} & set(trainer)
        if reserved:
            raise ConfigError(
                f"trainer.{sorted(reserved)} are set from conf/heads by the heads stage; remove them"
            )


# --- metrics ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class MetricsConfig(Settings):
    """Stage `metrics`: confidence metrics scored on the validation split (AUROC, risk–coverage)."""

    KEY = "metrics"
    metrics: list[str] = setting(
        factory=lambda: ["entropy", "max_prob", "prob_margin", "logit_margin", "saturation"],
        check=each(_confidence_signal),
    )
    # Cheap confidence: each of `pruned_metrics` on each head's view over the K most frequent train tokens,
    # K = round(fraction × vocabulary) for each fraction of `pruned_vocab`; reported as `<metric>@top<K>`.
    pruned_metrics: list[str] = setting(
        factory=lambda: ["logit_margin", "entropy"], check=each(one_of(_logit_metrics), non_empty=False)
    )
    pruned_vocab: list[float] = setting(
        factory=lambda: [0.125, 0.03125], check=each(within(0, 1, low_open=True), non_empty=False)
    )
    # Validation tokens scored: null = all extracted tokens, else a seeded random subset of this size.
    max_tokens: int | None = setting(32768, check=optional(at_least(1)))
    rc_points: int = setting(101, check=at_least(2))  # risk–coverage curves: evenly spaced coverage levels
    batch_tokens: int = setting(2048, check=at_least(1), volatile=True)


# --- calibrate --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LttConfig(Settings):
    KEY = "calibrate.ltt"
    grid_fraction: float = setting(0.2, check=within(0, 1, low_open=True, high_open=True))
    grid_points: int = setting(200, check=at_least(1))


@dataclasses.dataclass
class DSSDChoiceConfig(Settings):
    """DSSD's exit set and adaptive stop chosen in the calibrate stage (pipeline/exits/exit_set.py)."""

    KEY = "calibrate.dssd"
    # The signal the improved DSSD exits on (calibrated into dssd_thresholds.json when it differs from
    # calibrate.metric, the paper's signal): <metric>@top<K> or <metric>@top<P>% of the vocabulary. Checked by
    # CalibrateConfig.check: this node is built when the schemas are registered, and the signal registry
    # imports torch.
    metric: str = "logit_margin@top12.5%"
    max_draft: int = setting(16, check=at_least(1))  # draft cap of the improved DSSD
    gamma: list[float] = setting(
        factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], check=each(within(0, 1))
    )
    flop_budget: float | None = setting(1.15, check=optional(at_least(1)))  # × greedy's FLOPs per token
    accuracy_bins: int = setting(32, check=at_least(1))  # quantile bins of the per-draft accuracy curve
    # The first validation tokens the exit-set replay reads (in order; null = all).
    max_tokens: int | None = setting(16384, check=optional(at_least(1)))


@dataclasses.dataclass
class CalibrateConfig(Settings):
    """Stage `calibrate`: exit thresholds per method × ε; the one declaration of the ε levels."""

    KEY = "calibrate"
    # The paper's signal (early exit, dssd_paper); or a pruned one, e.g. logit_margin@top512 / @top12.5%.
    metric: str = setting("entropy", check=_calibrated_signal)
    methods: list[str] = setting(
        factory=lambda: ["empirical", "ltt"], check=each(one_of(_calibration_methods))
    )
    eps: list[float] = setting(
        factory=lambda: [0.60, 0.65, 0.70, 0.75, 0.80, 0.85, 0.90, 0.95, 0.99], check=_eps_levels
    )
    delta: float = setting(0.05, check=within(0, 1, low_open=True, high_open=True))
    cascade: bool = True
    ltt: LttConfig = setting(factory=LttConfig)
    dssd: DSSDChoiceConfig = setting(factory=DSSDChoiceConfig)
    # Tokens per split (validation: calibration, test: realized accuracy/coverage); null = all.
    max_tokens: int | None = setting(None, check=optional(at_least(1)))
    batch_tokens: int = setting(2048, check=at_least(1), volatile=True)
    # Moved to the metrics stage's own group.
    metrics: Any = renamed_to("metrics.metrics")
    rc_points: Any = renamed_to("metrics.rc_points")

    def check(self, cfg: DictConfig) -> None:
        problem = _calibrated_signal(self.dssd.metric)
        if problem is not None:
            raise ConfigError(f"calibrate.dssd.metric={self.dssd.metric}: {problem}")


# --- early_exit -------------------------------------------------------------------------------------------------


def _task_selection(tasks: Any) -> str | None:
    if tasks in ("offline", "pythia"):
        return None
    if isinstance(tasks, list | tuple | ListConfig) and tasks and all(isinstance(t, str) for t in tasks):
        return None
    return "must be 'offline', 'pythia' or a non-empty list of lm-eval task names"


@dataclasses.dataclass
class OfflineTasksConfig(Settings):
    """The project-built tasks (pipeline/evaluation/offline_tasks.py) from the data config's held-out split."""

    KEY = "early_exit.offline"
    split: str = setting("test", check=one_of(("train", "validation", "test")))
    n_examples: int = setting(100, check=at_least(1))  # per task
    n_choices: int = setting(4, check=at_least(2))  # next-line task: the true line + distractors
    context_lines: int = setting(6, check=at_least(0))
    seed: int = 0


@dataclasses.dataclass
class TokenEvalConfig(Settings):
    KEY = "early_exit.token_eval"
    n_tokens: int = setting(1024, check=at_least(0))  # test-split tokens, teacher forced; 0 skips it
    fills: list[str] = setting(
        factory=lambda: ["lazy", "copy", "recompute"], check=each(one_of(_fill_policies))
    )
    batch_size: int = setting(8, check=at_least(1), volatile=True)


@dataclasses.dataclass
class EarlyExitConfig(Settings):
    """Stage `early_exit`: lm-eval benchmarks under the exit policy, and token-level evaluation."""

    KEY = "early_exit"
    tasks: Any = setting("offline", check=_task_selection)
    pythia: list[str] = setting(
        factory=lambda: [
            "lambada_openai",
            "piqa",
            "arc_easy",
            "arc_challenge",
            "winogrande",
            "hellaswag",
            "sciq",
            "logiqa",
        ]
    )
    offline: OfflineTasksConfig = setting(factory=OfflineTasksConfig)
    eps: list[float] = setting(factory=lambda: [0.8, 0.9, 0.95], check=_eps_levels)  # ⊆ calibrate.eps
    methods: list[str] = setting(factory=lambda: ["empirical"])  # ⊆ calibrate.methods
    limit: int | None = setting(None, check=optional(at_least(1)))  # examples per task; null = all
    num_fewshot: int = setting(0, check=at_least(0))
    bootstrap_iters: int = setting(1000, check=at_least(0))
    generation: str = setting("early_exit", check=one_of(_generation_strategies))
    fill: str = setting("lazy", check=one_of(_fill_policies))
    max_draft: int = setting(16, check=at_least(1))
    batch_size: int = setting(8, check=at_least(1), volatile=True)
    token_eval: TokenEvalConfig = setting(factory=TokenEvalConfig)

    def check(self, cfg: DictConfig) -> None:
        check_eps_subset(cfg, "early_exit.eps", self.eps)
        unknown = [m for m in self.methods if m not in cfg.calibrate.methods]
        if unknown:
            raise ConfigError(
                f"early_exit.methods {unknown} are not calibrated "
                f"(calibrate.methods={list(cfg.calibrate.methods)})"
            )


# --- decoding ---------------------------------------------------------------------------------------------------


def _temperatures(values: list[float]) -> str | None:
    """decoding.sampling: finite temperatures >= 0 (0 = the greedy run, which always runs)."""
    bad = [
        v for v in values if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < math.inf
    ]
    if bad:
        return f"has {bad}: list temperatures >= 0 (0 = greedy only), e.g. decoding.sampling=[0.0,0.7,1.0]"
    return None


@dataclasses.dataclass
class DecodingConfig(Settings):
    """Stage `decoding`: greedy / early exit / LayerSkip grid / DSSD on real prompts."""

    KEY = "decoding"
    n_prompts: int = setting(12, check=at_least(1))  # reported prompts, from the test split
    n_tune_prompts: int = setting(4, check=at_least(1))  # LayerSkip and DSSD tuning prompts, from validation
    prompt_len: int = setting(64, check=at_least(1))
    max_new_tokens: int = setting(64, check=at_least(1))  # prompt_len + max_new_tokens <= model.max_seq_len
    eps: list[float] = setting(factory=lambda: [0.7, 0.8, 0.9], check=_eps_levels)  # ⊆ calibrate.eps
    calibration_method: str = "empirical"  # one of calibrate.methods
    max_draft: int = setting(16, check=at_least(1))  # the paper's DSSD rows: cap on drafts per verification
    # dssd_tuned: the draft caps its grid (ε × consulted heads × cap) tunes over on the tuning prompts.
    dssd_max_draft: list[int] = setting(factory=lambda: [2, 8], check=each(at_least(1)))
    # dssd_tuned: the adaptive-stop γ values its grid also tunes over (0 = the paper's rule: no early stop).
    dssd_gamma: list[float] = setting(factory=lambda: [0.5], check=each(within(0, 1)))
    layerskip_d: list[int] = setting(factory=lambda: [1, 2, 4], check=each(at_least(1)))
    # How the tuned LayerSkip (head, d) is chosen on the tuning prompts (decoding_harness.SELECT_CRITERIA).
    layerskip_select: str = setting("latency_equiv_per_token", check=one_of(_layerskip_criteria))
    early_exit: bool = True  # also run lossy early exit per ε
    early_exit_fill: str = setting("lazy", check=one_of(_fill_policies))
    stop_at_eos: bool = False
    repeats: int = setting(1, check=at_least(1))  # timed runs per prompt and setting (median wall time)
    # Temperatures: each T > 0 adds a sampled run (pipeline/evaluation/decoding_sampled.py); [0.0]: greedy only.
    sampling: list[float] = setting(factory=lambda: [0.0], check=_temperatures)

    def check(self, cfg: DictConfig) -> None:
        check_eps_subset(cfg, "decoding.eps", self.eps)
        if self.calibration_method not in cfg.calibrate.methods:
            raise ConfigError(
                f"decoding.calibration_method={self.calibration_method!r} is not calibrated "
                f"(calibrate.methods={list(cfg.calibrate.methods)})"
            )
        max_len = int(cfg.model.get("max_seq_len") or 0)
        if max_len and self.prompt_len + self.max_new_tokens > max_len:
            raise ConfigError(
                f"decoding.prompt_len + decoding.max_new_tokens = {self.prompt_len + self.max_new_tokens} "
                f"exceeds {cfg.model.name}'s maximum sequence length {max_len}; shorten one of them"
            )


# One group per stage, named after it.
SCHEMAS: dict[str, type[Settings]] = {
    "extract": ExtractConfig,
    "heads": HeadsConfig,
    "metrics": MetricsConfig,
    "calibrate": CalibrateConfig,
    "early_exit": EarlyExitConfig,
    "decoding": DecodingConfig,
}
