"""Sampling: the temperature / top-k / top-p transform and the speculative-sampling acceptance rule.

`Sampling(temperature, top_k, top_p).probs(logits)` turns logits into the distribution a token is drawn
from: logits / temperature, then top-k (keep the k largest logits, ties included), then top-p (keep the
smallest set of most probable tokens whose mass reaches top_p), then a float32 softmax over what is kept.
The engine applies the same transform to the full model's logits (the target p) and to an exiting head's
logits (the draft distribution q).

Speculative sampling (Leviathan et al. 2023, Chen et al. 2023; docs/design.md §1.8): a draft x ~ q is
accepted with probability min(1, p(x)/q(x)); on rejection the token is drawn from normalize(max(0, p - q)).
Whatever q is, the kept token is then distributed exactly as p:

    P(x) = q(x) min(1, p(x)/q(x)) + (1 - Σ_y min(p(y), q(y))) (p(x) - q(x))+ / Σ_y (p(y) - q(y))+
         = min(p(x), q(x)) + (p(x) - q(x))+ = p(x)

because Σ_y (p(y) - q(y))+ = 1 - Σ_y min(p(y), q(y)). The functions below are that rule, one token at a
time, on tensors built by hand in the tests.

Random numbers come from a `torch.Generator` (None: torch's global generator). Distributions are moved to the
generator's device before drawing, so a CPU generator gives the same draws whatever device the model runs on.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """How tokens are drawn: `temperature` > 0, `top_k` >= 0 (0: off), `top_p` in (0, 1] (1: off)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t <= 0:
            raise ValueError(
                f"Sampling temperature is {t!r}: it must be a finite number > 0 "
                "(for greedy decoding pass sampling=None, or use Sampling.or_greedy(0.0))"
            )
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
            raise ValueError(f"Sampling top_k is {k!r}: it must be an integer >= 0 (0 turns top-k off)")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p <= 1:
            raise ValueError(f"Sampling top_p is {p!r}: it must be in (0, 1] (1.0 turns top-p off)")
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "top_k", int(k))
        object.__setattr__(self, "top_p", float(p))

    @classmethod
    def or_greedy(cls, temperature: float, top_k: int = 0, top_p: float = 1.0) -> Sampling | None:
        """None (greedy decoding) for temperature 0, else `Sampling(temperature, top_k, top_p)`: the mapping
        of a config's list of temperatures, where 0 means greedy."""
        if temperature == 0:
            return None
        return cls(temperature, top_k, top_p)

    def describe(self) -> dict:
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The float32 distribution over the last dimension of `logits` ([..., vocab]) after temperature,
        top-k and top-p; removed tokens have probability exactly 0."""
        scaled = logits.float() / self.temperature
        if 0 < self.top_k < scaled.shape[-1]:
            kth = torch.topk(scaled, self.top_k, dim=-1).values[..., -1:]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_probs, order = torch.sort(torch.softmax(scaled, dim=-1), dim=-1, descending=True)
            # Keep a token while the mass of the more probable tokens before it is below top_p: the smallest
            # prefix reaching top_p, and always the most probable token.
            mass_before = sorted_probs.cumsum(-1) - sorted_probs
            removed = torch.zeros_like(scaled, dtype=torch.bool).scatter(-1, order, mass_before >= self.top_p)
            scaled = scaled.masked_fill(removed, float("-inf"))
        return torch.softmax(scaled, dim=-1)


# -- drawing ---------------------------------------------------------------------------------------------------


def _on_generator_device(t: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return t if generator is None else t.to(generator.device)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """One token id drawn from the distribution `probs` ([vocab], summing to 1)."""
    probs = _on_generator_device(probs, generator)
    return int(torch.multinomial(probs, 1, generator=generator))


def uniform(generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> float:
    """One draw from U[0, 1) (on the generator's device when given)."""
    if generator is not None:
        device = generator.device
    return float(torch.rand((), generator=generator, device=device, dtype=torch.float64))


# -- the speculative-sampling rule -----------------------------------------------------------------------------


def acceptance_probability(p: torch.Tensor, q: torch.Tensor, token: int) -> float:
    """min(1, p(x)/q(x)) for the draft x = `token` drawn from q, with p the target distribution.

    q(x) = 0 cannot happen for a draft drawn from q; should it happen anyway, the draft is accepted when
    p(x) > 0 (the ratio is infinite) and rejected when p(x) = 0 (a token p never emits is never kept)."""
    px, qx = float(p[token]), float(q[token])
    if qx <= 0.0:
        return 1.0 if px > 0.0 else 0.0
    return min(1.0, px / qx)


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """normalize(max(0, p - q)): where a rejected draft's replacement is drawn from.

    If p - q has no positive entry (p equals q up to rounding, so a rejection had probability ~0 and was
    caused by rounding alone), the replacement is drawn from p itself, the limit of the rule as q -> p."""
    residual = (p - q).clamp_min(0.0)
    total = residual.sum()
    if not total > 0:
        return p
    return residual / total


def verify_drafts(
    p: torch.Tensor,
    q: torch.Tensor,
    drafts: Sequence[int],
    generator: torch.Generator | None = None,
) -> tuple[int, int | None]:
    """Speculative sampling over a chain of drafts: how many are kept, and the replacement of the first
    rejected one.

    `p[j]` is the target distribution of draft j's position (given the prefix and drafts 0..j-1) and `q[j]`
    the distribution draft j was drawn from ([n, vocab] each, n = len(drafts); extra rows of p are ignored).
    Drafts are accepted in order, each with probability min(1, p(x)/q(x)); at the first rejection the chain
    stops and the replacement token is drawn from normalize(max(0, p - q)). Returns (accepted, replacement)
    with replacement None when every draft was accepted (the caller then draws the bonus token from p of the
    row after the last draft).
    """
    for j, token in enumerate(drafts):
        if uniform(generator, p.device) < acceptance_probability(p[j], q[j], token):
            continue
        return j, sample(residual_distribution(p[j], q[j]), generator)
    return len(drafts), None
