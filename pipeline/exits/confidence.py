"""Confidence metrics: how sure is a head of its own top-1 prediction?

Every metric is vectorized over tokens (`logits` is [..., vocab]) and declares its direction. The calibration
and the decoding engine treat them uniformly through `is_confident(value, threshold)`: a token exits when its
metric is on the confident side of the head's threshold (inclusive).

A *pruned signal* `<metric>@top<K>` is a logit metric computed on a vocabulary-pruned view of the head (its
logits over K candidate tokens, -inf elsewhere: `pipeline.exits.vocab_pruning`). `get_metric` resolves such a
name to the base metric with `candidates = K`; the metric functions below accept -inf logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from pipeline.exits.vocab_pruning import parse_signal


@dataclass(frozen=True)
class ConfidenceMetric:
    name: str
    lower_is_confident: bool
    needs_hidden: bool
    fn: Callable[..., torch.Tensor]
    description: str
    candidates: int | None = None  # K of a pruned signal (computed on a K-token view of the head)

    def __call__(
        self,
        logits: torch.Tensor,
        hidden: torch.Tensor | None = None,
        prev_hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.needs_hidden:
            if hidden is None or prev_hidden is None:
                raise ValueError(f"metric {self.name!r} needs the head's input and the previous head's input")
            return self.fn(hidden, prev_hidden)
        return self.fn(logits)

    def is_confident(self, value: torch.Tensor | float, threshold: float) -> torch.Tensor | bool:
        return value <= threshold if self.lower_is_confident else value >= threshold

    def confidence(self, value: torch.Tensor) -> torch.Tensor:
        """A score where higher always means more confident (for AUROC and sorting)."""
        return -value if self.lower_is_confident else value


def entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    # 0 · log 0 = 0: a pruned view's -inf logits would otherwise give 0 · -inf = NaN (unchanged elsewhere).
    plogp = logp.exp() * logp
    return -torch.where(torch.isneginf(logp), 0.0, plogp).sum(-1)


def max_prob(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=-1).amax(-1)


def prob_margin(logits: torch.Tensor) -> torch.Tensor:
    top2 = torch.softmax(logits.float(), dim=-1).topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def logit_margin(logits: torch.Tensor) -> torch.Tensor:
    top2 = logits.float().topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def saturation(hidden: torch.Tensor, prev_hidden: torch.Tensor) -> torch.Tensor:
    """Cosine between this head's input and the previous head's input: a saturated residual stream
    (little change between depths) suggests later layers will not change the prediction."""
    return torch.nn.functional.cosine_similarity(hidden.float(), prev_hidden.float(), dim=-1)


METRICS: dict[str, ConfidenceMetric] = {
    m.name: m
    for m in (
        ConfidenceMetric("entropy", True, False, entropy, "entropy of the head's softmax (nats)"),
        ConfidenceMetric("max_prob", False, False, max_prob, "largest softmax probability"),
        ConfidenceMetric("prob_margin", False, False, prob_margin, "top-1 minus top-2 probability"),
        ConfidenceMetric(
            "logit_margin", False, False, logit_margin, "top-1 minus top-2 logit ('breaking ties')"
        ),
        ConfidenceMetric("saturation", False, True, saturation, "cosine(head input, previous head input)"),
    )
}


def get_metric(name: str) -> ConfidenceMetric:
    """A metric by name; `<metric>@top<K>` gives the logit metric on a K-candidate view of the head."""
    base, k = parse_signal(name)
    if base not in METRICS:
        raise KeyError(
            f"unknown confidence metric {name!r}; available: {sorted(METRICS)}, or a logit metric over the "
            f"K most frequent tokens as <metric>@top<K> (e.g. logit_margin@top512)"
        )
    metric = METRICS[base]
    if k is None:
        return metric
    if metric.needs_hidden:
        raise KeyError(
            f"{name!r}: {base} reads hidden states, not logits; a pruned vocabulary does not apply"
        )
    return replace(metric, name=name, candidates=k, description=f"{metric.description}, over {k} candidates")
