"""Stage `metrics`: on the validation split, every head's correctness (argmax == full-model argmax) and every
confidence metric per token; AUROC of each metric for predicting correctness, risk–coverage curves, and the
winning metric per head (the paper's "entropy separates best" is checked here, not assumed).

Cheap confidence (issue 14): the pruned signals `<metric>@top<K>` are scored like the others, on each head's
view over the K most frequent tokens of the train split; every signal also gets its cost per evaluation in
block units (`cost_blocks`: d·V / 12d² for a full head, K/V of that for a pruned one, 0 for saturation)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig

from pipeline.data.shards import ShardReader
from pipeline.exits.confidence import get_metric
from pipeline.exits.cost import CostModel
from pipeline.exits.heads import EarlyExitHeads
from pipeline.exits.separation import sample_risk_coverage
from pipeline.exits.token_metrics import auroc_table, best_metric_per_head, compute_token_metrics
from pipeline.exits.vocab_pruning import TokenRanking, pruned_signal_name, pruned_sizes, rank_tokens
from pipeline.models.backbone import load_from_stage_output, unembedding_of
from pipeline.orchestration.results import row
from pipeline.stages.base import Stage, StageContext, StageOutput, seed_fact

log = logging.getLogger(__name__)


def token_subset(n_tokens: int, max_tokens: int | None, seed: int) -> np.ndarray:
    """All token indices, or a seeded random subset of `max_tokens` of them (sorted: shard reads stay local)."""
    if max_tokens is None or max_tokens >= n_tokens:
        return np.arange(n_tokens)
    return np.sort(np.random.default_rng(seed).choice(n_tokens, size=int(max_tokens), replace=False))


def load_backbone_and_heads(ctx: StageContext) -> tuple[torch.nn.Module, EarlyExitHeads]:
    """The frozen backbone and the trained heads of the upstream stages (heads refuse another backbone)."""
    backbone, _ = load_from_stage_output(
        ctx.inputs["backbone"], dtype=ctx.cfg.model.dtype, device=ctx.device, with_tokenizer=False
    )
    return backbone, EarlyExitHeads.load(ctx.inputs["heads"], backbone)


def split_metrics(
    ctx: StageContext,
    backbone: torch.nn.Module,
    heads: EarlyExitHeads,
    split: str,
    metrics: list[str],
    group: DictConfig,
    ranking: TokenRanking | None = None,
) -> pd.DataFrame:
    """The per-(token, head) table of one extracted split (shared with the calibrate stage). `group` is the
    calling stage's config group: its `max_tokens` and `batch_tokens` apply; pruned signals take their
    candidates from `ranking`."""
    cfg = ctx.cfg
    reader = ShardReader(Path(ctx.inputs["extract"]) / split)
    max_tokens = group.max_tokens
    indices = token_subset(len(reader), None if max_tokens is None else int(max_tokens), int(cfg.seed))
    log.info("%s: %d tokens x %d heads, metrics %s", split, len(indices), len(heads), metrics)
    return compute_token_metrics(
        reader,
        heads,
        unembedding_of(backbone),
        metrics,
        indices=indices,
        batch_size=int(group.batch_tokens),
        device=ctx.device,
        ranking=ranking,
    )


def train_ranking(ctx: StageContext, heads: EarlyExitHeads) -> TokenRanking:
    """The vocabulary ranked by frequency in the extracted train split: where pruned signals take their
    candidates (a held-out split would leak what the signal is scored on)."""
    return rank_tokens(Path(ctx.inputs["extract"]) / "train", heads.spec.vocab_size)


def signals(settings: DictConfig, vocab_size: int) -> list[str]:
    """The configured metrics followed by the pruned signals (`pruned_metrics` × `pruned_vocab`)."""
    names = [str(m) for m in settings.metrics]
    for k in pruned_sizes([float(f) for f in settings.pruned_vocab], vocab_size):
        names += [pruned_signal_name(str(m), k) for m in settings.pruned_metrics]
    return list(dict.fromkeys(names))


def signal_cost(name: str, cost: CostModel, vocab_size: int) -> float:
    """Cost of one evaluation of a signal, in block units: a head's vocabulary projection (K/V of it for a
    pruned view); a hidden-state metric needs none (a cosine, O(d))."""
    metric = get_metric(name)
    if metric.needs_hidden:
        return 0.0
    return cost.head * (metric.candidates or vocab_size) / vocab_size


def risk_coverage_table(table: pd.DataFrame, metrics: list[str], n_points: int) -> pd.DataFrame:
    """Risk–coverage curves at fixed coverage levels, one block of rows per (head, metric)."""
    frames = []
    for (head, layer), group in table.groupby(["head", "layer"], sort=True):
        correct = group["correct"].to_numpy()
        for name in metrics:
            score = get_metric(name).confidence(group[name].to_numpy(np.float64))
            coverage, risk = sample_risk_coverage(score, correct, n_points)
            frames.append(
                pd.DataFrame(
                    {
                        "head": int(head),
                        "layer": int(layer),
                        "metric": name,
                        "coverage": coverage,
                        "risk": risk,
                    }
                )
            )
    return pd.concat(frames, ignore_index=True)


@torch.no_grad()
def run(ctx: StageContext) -> StageOutput:
    settings = ctx.cfg.metrics
    backbone, heads = load_backbone_and_heads(ctx)
    vocab = heads.spec.vocab_size
    metrics = signals(settings, vocab)
    pruned = any(get_metric(m).candidates for m in metrics)
    ranking = train_ranking(ctx, heads) if pruned else None
    table = split_metrics(ctx, backbone, heads, "validation", metrics, settings, ranking)
    cost = CostModel.for_model(backbone)
    aucs = auroc_table(table, metrics)
    curves = risk_coverage_table(table, metrics, int(settings.rc_points))
    winners = best_metric_per_head(aucs)
    for rec in winners.itertuples(index=False):
        log.info("head %d (layer %d): best metric %s, AUROC %.3f", rec.head, rec.layer, rec.metric, rec.auroc)
    rows = []
    for rec in aucs.itertuples(index=False):
        rows.append(
            row("auroc", rec.auroc, confidence=rec.metric, head=rec.head, layer=rec.layer, best=rec.best)
        )
        rows.append(
            row("aurc", rec.aurc, confidence=rec.metric, head=rec.head, layer=rec.layer, best=rec.best)
        )
        blocks = signal_cost(rec.metric, cost, vocab)
        rows.append(row("cost_blocks", blocks, confidence=rec.metric, head=rec.head, layer=rec.layer))
    aucs["cost_blocks"] = [signal_cost(m, cost, vocab) for m in aucs["metric"]]
    summary = {f"best_metric/head{r.head}": r.metric for r in winners.itertuples(index=False)}
    summary.update({f"auroc/{r.metric}/head{r.head}": r.auroc for r in aucs.itertuples(index=False)})
    summary["tokens"] = int(table["token"].nunique())
    if ranking is not None:
        for k in sorted({get_metric(m).candidates for m in metrics} - {None}):
            summary[f"candidates/top{k}_train_mass"] = ranking.mass(k)
    ctx.tracker.log_table("auroc", aucs)
    ctx.tracker.log_table("risk_coverage", curves)
    ctx.tracker.summary(summary)
    # Compact per-token table for the notebooks' histograms: float32 metrics, small ints, bool correctness.
    return StageOutput(
        rows=rows, metrics=summary, tables={"token_metrics": table, "auroc": aucs, "risk_coverage": curves}
    )


STAGE = Stage(
    name="metrics", upstream=("backbone", "extract", "heads"), run=run, group="metrics", key_facts=seed_fact
)
