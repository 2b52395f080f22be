"""The exit policy: at which head a token leaves the stack (docs/design.md §7).

`ExitPolicy` is the one place the exit decision is written. It owns
- the head layers (block index of each head, in depth order),
- one threshold per head: a float (exit when the head's confidence metric is on the confident side of it,
  inclusive), `None` (the head is disabled: never evaluated, never exits) or `ALWAYS` (the head exits every
  token it sees without a confidence test: LayerSkip's fixed exit),
- the confidence metric, by name (`metric`), with the metric object at `metric_fn`.

A token exits at the *first* head, in depth order, that decides to exit; otherwise the full model decides.

Two faces of the same decision:
- vectorised: `decide(values)` over stored per-head metric values [n, n_heads] (calibration, metrics) and
  `cascade(heads, head_inputs, final_logits)` over hidden states of one full forward (token-level
  evaluation, the lm-eval adapter);
- per token: `exits(k, logits, hidden, prev_hidden)`, which the engine's step calls at head k's block.
Both go through `head_values` and `confident`, so they agree token for token on the same hidden states.

Saturation at head 0. The `saturation` metric compares a head's input with the previous head's input; head 0
has no previous head (the stored shards do not hold the embedding output), so its value there is NaN and
head 0 never exits on saturation — in calibration, in the token-level evaluation and in the engine alike.
NaN compares False on either side of a threshold, so an undefined value never exits.

Cheap confidence (a vocabulary-pruned head). With a pruned signal (`logit_margin@top512`) the policy carries
its candidate set (`candidates`, from the thresholds artifact) and every head is evaluated through
`head_view(heads)`: logits over the K candidates, -inf elsewhere, at K/V of a full head's cost
(`head_cost`). The engine's step emits the view's argmax (a DSSD draft is verified anyway); lossy early exit
(`cascade`, the `EarlyExit` strategy) gives an exited position its head's full logits (one full head where
the gate opens).
See `pipeline.exits.vocab_pruning`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np
import torch
from torch import nn

from pipeline.exits.confidence import ConfidenceMetric, get_metric
from pipeline.exits.vocab_pruning import CandidateSet, PrunedHeads

ALWAYS = "always"  # threshold of a head that exits every token it sees, without a confidence test
FULL = -1  # exit head of a token the full model decides

Threshold = float | str | None


def _check_threshold(k: int, t: Threshold) -> Threshold:
    if t is None or t == ALWAYS:
        return t
    if isinstance(t, bool) or not isinstance(t, numbers.Real) or math.isnan(t):
        raise ValueError(f"threshold of head {k} is {t!r}: expected a number, None or {ALWAYS!r}")
    return float(t)


@dataclass(frozen=True)
class ExitPolicy:
    """Head layers, one threshold per head, the confidence metric and, for a pruned signal, its candidate
    set (see the module docstring)."""

    layers: tuple[int, ...]
    thresholds: tuple[Threshold, ...]
    metric: str = "entropy"
    candidates: CandidateSet | None = None
    _views: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        layers = tuple(int(x) for x in self.layers)
        if len(self.thresholds) != len(layers):
            raise ValueError(
                f"{len(self.thresholds)} thresholds for {len(layers)} heads "
                f"(one per head, None disables a head)"
            )
        if list(layers) != sorted(set(layers)):
            raise ValueError(f"head layers must be strictly increasing, got {list(layers)}")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(
            self, "thresholds", tuple(_check_threshold(k, t) for k, t in enumerate(self.thresholds))
        )
        k = get_metric(self.metric).candidates  # an unknown name fails here, not at the first token
        have = None if self.candidates is None else self.candidates.k
        # A policy with every head disabled (the full model) evaluates no head: it needs no candidate set.
        if k != have and (have is not None or self.enabled):
            raise ValueError(
                f"metric {self.metric!r} needs "
                + (f"a candidate set of {k} tokens" if k else "no candidate set")
                + f", got {'none' if have is None else f'{have} candidates'} (thresholds file and metric disagree)"
            )

    # -- construction -------------------------------------------------------------------------------------------

    @classmethod
    def disabled(cls, layers: Sequence[int], metric: str = "entropy") -> ExitPolicy:
        """The full model: every head disabled."""
        return cls(tuple(layers), (None,) * len(layers), metric)

    @classmethod
    def fixed_head(cls, layers: Sequence[int], head: int) -> ExitPolicy:
        """Every token exits at `head` without a confidence test (LayerSkip's drafter)."""
        if not 0 <= head < len(layers):
            raise ValueError(f"head index {head} out of range: {len(layers)} heads")
        return cls(tuple(layers), tuple(ALWAYS if k == head else None for k in range(len(layers))))

    def with_thresholds(self, thresholds: Sequence[Threshold]) -> ExitPolicy:
        """The same heads and metric with other thresholds."""
        return replace(self, thresholds=tuple(thresholds))

    # -- what the policy is ---------------------------------------------------------------------------------------

    @cached_property
    def metric_fn(self) -> ConfidenceMetric:
        # Cached: the engine's step asks for it several times per token, and a pruned signal's name is parsed
        # into a new metric object on every `get_metric` call.
        return get_metric(self.metric)

    @property
    def n_heads(self) -> int:
        return len(self.layers)

    @property
    def enabled(self) -> list[int]:
        """Heads that may exit (threshold not None), in depth order."""
        return [k for k, t in enumerate(self.thresholds) if t is not None]

    @cached_property
    def evaluated_heads(self) -> dict[int, int]:
        """Block index -> head index of every head a token evaluates when it reaches that block."""
        return {self.layers[k]: k for k in self.enabled}

    @property
    def head_cost(self) -> float:
        """Cost of one head evaluation in full-head units: K/V through a pruned view, else 1."""
        return 1.0 if self.candidates is None else self.candidates.cost_fraction

    def head_view(self, heads: nn.Module) -> nn.Module:
        """What this policy evaluates at a head: `heads` itself, or (pruned signal) their view over the
        candidate set, built once per heads object."""
        if self.candidates is None:
            return heads
        cached = self._views.get(id(heads))
        if cached is None or cached[0] is not heads:
            cached = (heads, PrunedHeads(heads, self.candidates))
            self._views[id(heads)] = cached
        return cached[1]

    def describe(self) -> dict:
        out = {"metric": self.metric, "layers": list(self.layers), "thresholds": list(self.thresholds)}
        if self.candidates is not None:
            out["candidates"] = self.candidates.k
        return out

    # -- the decision -------------------------------------------------------------------------------------------

    def head_values(
        self,
        k: int,
        logits: torch.Tensor,
        hidden: torch.Tensor | None = None,
        prev_hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """This policy's metric at head k (see `head_metric_values`)."""
        return head_metric_values(self.metric_fn, k, logits, hidden, prev_hidden)

    def confident(self, k: int, values: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Vectorised exit test of head k on metric values (torch or numpy): a boolean array of their shape."""
        threshold = self.thresholds[k]
        if threshold is None or threshold == ALWAYS:
            fill = threshold == ALWAYS
            if isinstance(values, torch.Tensor):
                return torch.full_like(values, fill, dtype=torch.bool)
            return np.full(np.shape(values), fill, dtype=bool)
        # NaN compares False on either side, so an undefined metric value never exits.
        return self.metric_fn.is_confident(values, threshold)

    def exits(
        self,
        k: int,
        logits: torch.Tensor,
        hidden: torch.Tensor | None = None,
        prev_hidden: torch.Tensor | None = None,
    ) -> bool:
        """Per-token form (the engine's step): does the one token of `logits` [..., 1, vocab] exit at head k?"""
        return self.exit_value(k, logits, hidden, prev_hidden) is not None

    def exit_value(
        self,
        k: int,
        logits: torch.Tensor,
        hidden: torch.Tensor | None = None,
        prev_hidden: torch.Tensor | None = None,
    ) -> float | None:
        """`exits` with the metric value that decided it: None when the token does not exit at head k, else
        its metric value (NaN at an `ALWAYS` head, which tests nothing). DSSD's adaptive draft length reads
        the value (pipeline/exits/draft_stop.py) without computing the metric twice."""
        threshold = self.thresholds[k]
        if threshold is None or threshold == ALWAYS:
            return math.nan if threshold == ALWAYS else None
        value = self.head_values(k, logits, hidden, prev_hidden).reshape(-1)[0].item()
        return value if self.metric_fn.is_confident(value, threshold) else None

    def decide(self, values: np.ndarray) -> np.ndarray:
        """Vectorised over stored metric values [n, n_heads]: the exit head of every token (FULL = -1)."""
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 2 or values.shape[1] != self.n_heads:
            raise ValueError(f"need metric values of shape [n, {self.n_heads}], got {values.shape}")
        confident = np.stack([self.confident(k, values[:, k]) for k in range(self.n_heads)], axis=1)
        return np.where(confident.any(axis=1), confident.argmax(axis=1), FULL)

    @torch.no_grad()
    def cascade(
        self, heads: nn.Module, head_inputs: Sequence[torch.Tensor], final_logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Vectorised over hidden states: the policy's logits for every position, and its exit head (FULL = -1).

        `head_inputs[k]` holds head k's input for every position ([..., d], the residual after block
        `layers[k]`); `heads(k, hidden)` gives head k's logits. With no enabled head `final_logits` is
        returned as is (same tensor), so scoring is bit-identical to the full model. A head is evaluated only
        on positions no shallower head has taken. With a pruned signal the exit is decided on the head's view
        and an exited position takes the head's full logits.
        """
        exit_head = torch.full(final_logits.shape[:-1], FULL, dtype=torch.long, device=final_logits.device)
        if not self.enabled:
            return final_logits, exit_head
        out = final_logits.clone()
        pending = torch.ones_like(exit_head, dtype=torch.bool)
        head_dtype = next(heads.parameters()).dtype
        view = self.head_view(heads)
        for k in self.enabled:
            where = pending.nonzero(as_tuple=True)
            if not where[0].numel():
                break
            hidden = head_inputs[k][where].to(head_dtype)
            prev = head_inputs[k - 1][where].to(head_dtype) if k > 0 else None
            logits = view(k, hidden)
            take = self.confident(k, self.head_values(k, logits, hidden, prev))
            if self.candidates is not None:  # the gate opened: score the head's full distribution
                logits = heads(k, hidden[take])
            else:
                logits = logits[take]
            chosen = tuple(index[take] for index in where)
            out[chosen] = logits.to(out.dtype)
            exit_head[chosen] = k
            pending[chosen] = False
        return out, exit_head


def head_metric_values(
    metric: ConfidenceMetric,
    k: int,
    logits: torch.Tensor,
    hidden: torch.Tensor | None = None,
    prev_hidden: torch.Tensor | None = None,
) -> torch.Tensor:
    """Metric values of head k for the tokens of `logits` [..., vocab]. `hidden` is head k's input and
    `prev_hidden` head k-1's input (read only by hidden-state metrics, which are NaN at head 0: see the module
    docstring). The one definition of a head's metric value, for calibration data and decisions alike."""
    if not metric.needs_hidden:
        return metric(logits)
    if k == 0:
        return torch.full(logits.shape[:-1], math.nan, device=logits.device)
    return metric(logits, hidden, prev_hidden)


def head_inputs_of(hidden_states: Sequence[torch.Tensor], layers: Sequence[int]) -> list[torch.Tensor]:
    """Each head's input from a Hugging Face `output_hidden_states` tuple (entry l + 1 = residual after l)."""
    return [hidden_states[layer + 1] for layer in layers]
