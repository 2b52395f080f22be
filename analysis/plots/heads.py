"""Heads against depth (the heads stage): trained early-exit heads vs the logit lens."""

from __future__ import annotations

from pathlib import Path

from analysis.data import Results, per_head, select
from analysis.plots.style import (
    LINESTYLES,
    MARKERS,
    OKABE_ITO,
    SkipFigure,
    label,
    log_y,
    model_title,
    need,
    new_figure,
    no_data,
    save,
    styled,
)


@styled
def heads_depth(res: Results, out_dir: Path) -> list[Path]:
    """Agreement with the full model and KL(full || head) against depth: trained heads vs the logit lens."""
    rows = per_head(need(select(res.frame, stage="heads", metric=["agree", "kl"]), "heads/agree,kl"))
    if rows.empty:
        raise SkipFigure("heads rows carry no head index")
    models = [m for m in res.models if m in set(rows["model"])]
    fig, axes = new_figure(2, len(models), 2.8, 2.1)
    for j, model in enumerate(models):
        mrows = rows[rows["model"] == model]
        # The block a head reads is the honest depth axis; fall back to the head index if `layer` is absent.
        has_layer = "layer" in mrows and mrows["layer"].notna().all()
        for i, metric in enumerate(("agree", "kl")):
            ax = axes[i, j]
            sub = mrows[mrows["metric"] == metric]
            if sub.empty:
                no_data(ax)
                continue
            for k, setting in enumerate(sorted(sub["setting"].unique(), key=lambda s: (s != "trained", s))):
                part = (
                    sub[sub["setting"] == setting]
                    .groupby("layer" if has_layer else "head_idx")["value"]
                    .mean()
                )
                ax.plot(
                    part.index,
                    part.to_numpy(),
                    linestyle=LINESTYLES[k % 4],
                    marker=MARKERS[k % 6],
                    color=OKABE_ITO[k],
                    label=label(setting),
                )
            if metric == "agree":
                ax.set_ylim(0, 1.02)
                ax.set_ylabel("agreement with full model" if j == 0 else "")
            else:
                if (sub["value"] > 0).all():
                    log_y(ax)
                ax.set_ylabel("KL(full ‖ head) (nats)" if j == 0 else "")
            ax.set_xlabel("block the head reads (0-based)" if has_layer else "head index")
            ax.set_xticks(sorted(mrows["layer" if has_layer else "head_idx"].unique()))
            if i == 0:
                ax.set_title(model_title(res, model))
        axes[0, j].legend(loc="lower right")
    fig.suptitle("Early-exit heads vs depth: self-supervised heads against the logit lens")
    return save(fig, out_dir, "heads_depth")
