"""Is a lossless decoding run lossless? Each run is classified `exact`, `near_tie` or `mismatch`.

DSSD and LayerSkip must reproduce greedy decoding of the full model token for token. In fp32 they do, exactly.
In bf16/fp16 the verification pass scores k rows in one call where greedy scores one, and kernels may round
differently with the row count, so two tokens whose logits are within rounding of each other can swap places
(docs/design.md §9). The engine computes attention and the final norm + LM head in fp32 for such models,
which makes its blocks row-count invariant on CPU; GPU kernels, and transformers' own bf16 forward (the
`generate` reference), still round differently. Such a run is not a bug, but it is reported, never hidden.

The verdict of one run (`classify`), looking only at the first position where the outputs differ (after it
the two continue from different prefixes):

- `exact`: identical outputs.
- `near_tie`: the model's dtype is bf16 or fp16, and at the first differing position both tokens are within
  `tolerance` of the highest logit of the reference logits recomputed for that prefix — for two tokens: they
  are the top-2 and their gap is within `tolerance`. The reference logits come from the model's own forward
  over prompt + the common prefix in one pass (in its dtype) and the engine's fp32 final norm + LM head, and
  `tolerance = NEAR_TIE_ULPS` ulps of the model's dtype at the magnitude of the largest |logit|: the rounding
  of bf16 hidden states moves every logit by a few bf16 ulps of the logits' scale.
- `mismatch`: anything else — a token outside the near-tie set, a gap beyond tolerance, outputs of different
  lengths that agree where both exist, or any difference at all in fp32/fp64 (no allowance).

`check_lossless` raises `LosslessnessError` on a mismatch (naming the method, prompt, position, tokens and
gap) and returns the verdict otherwise; the decoding harness counts near-ties per setting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pipeline.engine import Engine

EXACT, NEAR_TIE, MISMATCH = "exact", "near_tie", "mismatch"
# Rounding a bf16/fp16 hidden state moves a logit by about one ulp of the logits' scale: the divergences measured
# on random bf16 GPT-NeoX/Llama/Qwen2 models (benchmarks/bf16_losslessness.py) had gaps of at most 1.6 ulps.
# 4 ulps leave room for a few roundings adding up; a real mismatch (a token outside the top few) is far beyond.
NEAR_TIE_ULPS = 4
LOW_PRECISION = (torch.bfloat16, torch.float16)


class LosslessnessError(RuntimeError):
    """A lossless decoding strategy produced tokens different from greedy decoding of the full model, and the
    difference is not a near-tie of a bf16/fp16 model."""


@dataclass(frozen=True)
class Divergence:
    """The first position (index among the new tokens) where two outputs differ, and the recomputed logits
    there. A token is None where its output has ended; the logits are NaN when they were not recomputed."""

    position: int
    reference_token: int | None
    token: int | None
    reference_logit: float = math.nan
    logit: float = math.nan
    top_logit: float = math.nan
    tolerance: float = 0.0

    @property
    def gap(self) -> float:
        """How far the lower of the two tokens' logits is below the top logit (0 for an exact tie)."""
        return self.top_logit - min(self.reference_logit, self.logit)

    def describe(self) -> str:
        if self.reference_token is None or self.token is None:
            return "one output ended where the other went on"
        if math.isnan(self.logit):
            return "logits not recomputed"
        return (
            f"recomputed logits: reference token {self.reference_token} {self.reference_logit:.6g}, token "
            f"{self.token} {self.logit:.6g}, top {self.top_logit:.6g}; gap {self.gap:.3g} vs near-tie "
            f"tolerance {self.tolerance:.3g}"
        )


@dataclass(frozen=True)
class Verdict:
    kind: str  # EXACT, NEAR_TIE or MISMATCH
    divergence: Divergence | None = None  # None when exact


def first_difference(reference: list[int], tokens: list[int]) -> int | None:
    """The first index where the outputs differ (where the shorter one ends, if one is a prefix of the
    other); None when they are identical."""
    if tokens == reference:
        return None
    return next(
        (i for i, (a, b) in enumerate(zip(reference, tokens, strict=False)) if a != b),
        min(len(reference), len(tokens)),
    )


def ulp(dtype: torch.dtype, magnitude: float) -> float:
    """The spacing of `dtype`'s numbers at `magnitude` (its unit in the last place)."""
    info = torch.finfo(dtype)
    magnitude = max(abs(magnitude), info.tiny)
    return info.eps * 2.0 ** math.floor(math.log2(magnitude))


def near_tie_tolerance(dtype: torch.dtype, logits: torch.Tensor, ulps: int = NEAR_TIE_ULPS) -> float:
    """The largest logit gap that counts as a near-tie for a model in `dtype`: `ulps` ulps of that dtype at
    the magnitude of the largest |logit|; 0 for fp32/fp64 models (no allowance)."""
    if dtype not in LOW_PRECISION:
        return 0.0
    return ulps * ulp(dtype, float(logits.abs().max()))


@torch.inference_mode()
def reference_logits(engine: Engine, prompt: torch.Tensor, prefix: list[int]) -> torch.Tensor:
    """[vocab] logits of the token after prompt + prefix: the model's own forward over the whole sequence in
    one pass (its dtype), then the final norm + LM head as the engine computes them (`adapter.logits`: fp32
    for a bf16/fp16 model)."""
    adapter = engine.adapter
    ids = torch.cat([prompt.view(-1).to(adapter.device), torch.tensor(prefix, device=adapter.device)])
    captured: list[torch.Tensor] = []
    # The final norm's input is the last block's output (transformers applies the norm inside the model).
    hook = adapter.final_norm.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
    try:
        engine.model(ids.view(1, -1).long(), use_cache=False)
    finally:
        hook.remove()
    return adapter.logits(captured[-1][:, -1:]).view(-1).float()


def classify(reference: list[int], tokens: list[int], prompt: torch.Tensor, engine: Engine) -> Verdict:
    """The verdict of one run: `tokens` (a lossless strategy's new tokens) against `reference` (greedy's),
    both decoded after `prompt` by `engine`'s model (module docstring)."""
    position = first_difference(reference, tokens)
    if position is None:
        return Verdict(EXACT)
    ref_token = reference[position] if position < len(reference) else None
    token = tokens[position] if position < len(tokens) else None
    dtype = engine.adapter.dtype
    if ref_token is None or token is None or dtype not in LOW_PRECISION:
        return Verdict(MISMATCH, Divergence(position, ref_token, token))
    logits = reference_logits(engine, prompt, reference[:position])
    return judge_divergence(logits, position, ref_token, token, dtype)


def judge_divergence(
    logits: torch.Tensor, position: int, reference_token: int, token: int, dtype: torch.dtype
) -> Verdict:
    """The verdict at a first differing position, from the reference logits recomputed there ([vocab]) and
    the model's dtype: `near_tie` when both tokens are within tolerance of the top logit, else `mismatch`."""
    divergence = Divergence(
        position,
        reference_token,
        token,
        reference_logit=float(logits[reference_token]),
        logit=float(logits[token]),
        top_logit=float(logits.max()),
        tolerance=near_tie_tolerance(dtype, logits),
    )
    near = dtype in LOW_PRECISION and divergence.gap <= divergence.tolerance
    return Verdict(NEAR_TIE if near else MISMATCH, divergence)


def check_lossless(
    reference: list[int],
    tokens: list[int],
    prompt: torch.Tensor,
    engine: Engine,
    what: str,
    against: str,
    split: str,
    index: int,
) -> Verdict:
    """`classify`, raising `LosslessnessError` on a mismatch: `what` (the method) against `against` (the
    reference's name) on `split` prompt `index`."""
    verdict = classify(reference, tokens, prompt, engine)
    if verdict.kind == MISMATCH:
        raise LosslessnessError(mismatch_message(reference, tokens, what, against, split, index, verdict))
    return verdict


def mismatch_message(
    reference: list[int],
    tokens: list[int],
    what: str,
    against: str,
    split: str,
    index: int,
    verdict: Verdict | None = None,
) -> str:
    """The error of a mismatch: method, prompt, first differing position, tokens there and (when
    recomputed) the logit gap."""
    first = first_difference(reference, tokens)
    detail = f" {verdict.divergence.describe()}." if verdict is not None and verdict.divergence else ""
    return (
        f"{what} is not lossless: on {split} prompt {index} its {len(tokens)} tokens differ from {against}'s "
        f"{len(reference)} tokens at position {first} "
        f"({tokens[first : first + 5]} vs {reference[first : first + 5]}).{detail} DSSD/LayerSkip/greedy "
        "must reproduce greedy decoding of the full model (in bf16/fp16 up to near-ties: "
        "pipeline/evaluation/losslessness.py); this is a bug in the engine or a numerically unstable model "
        "(try model.dtype=float32)."
    )
