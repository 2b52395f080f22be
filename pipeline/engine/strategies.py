"""Decoding strategies on one engine: greedy, early exit (lossy), LayerSkip and DSSD (both lossless).

Each strategy is a small object with `run(session, first_token)`: the session has already run the prompt
and emitted the full model's first token. Strategies only decide *where* tokens exit and *when* to verify;
the engine's step does the compute, the counting and the choice of each token (argmax, or a draw when the
session samples; the speculative strategies then verify drafts with the speculative-sampling rule).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.engine.engine import DecodeSession, Engine, StepResult
from pipeline.engine.sampling import verify_drafts
from pipeline.exits.cost import FILL_POLICIES
from pipeline.exits.draft_stop import DraftAccuracy
from pipeline.exits.policy import ExitPolicy


class Strategy:
    name = "strategy"
    extra_capacity = 0  # positions beyond the output that drafting may occupy before a crop

    def validate(self, engine: Engine) -> None:
        """Raise ValueError when this strategy cannot run on `engine` (e.g. wrong number of thresholds)."""

    def run(self, session: DecodeSession, first_token: int) -> None:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"strategy": self.name}


def _check_policy(engine: Engine, policy: ExitPolicy) -> None:
    if engine.heads is None:
        raise ValueError("this strategy needs early-exit heads: Engine(model, heads)")
    if list(policy.layers) != list(engine.head_layers):
        raise ValueError(
            f"the policy's {policy.n_heads} thresholds are for heads at blocks {list(policy.layers)}; "
            f"the engine's heads are at blocks {engine.head_layers} (one threshold per head)"
        )


def _as_policy(policy: ExitPolicy, strategy: str) -> ExitPolicy:
    if not isinstance(policy, ExitPolicy):
        raise TypeError(
            f"{strategy} takes an ExitPolicy (e.g. ExitThresholds.for_eps(method, eps)), got {type(policy)}"
        )
    return policy


class Greedy(Strategy):
    """The full model, one token per step, through the engine (the reference for losslessness)."""

    name = "greedy"

    def run(self, session: DecodeSession, first_token: int) -> None:
        position, token = session.prompt_len, first_token
        while True:
            token = session.step(position, token).token
            session.stats.full_passes += 1
            position += 1
            if not session.emit(token, "full_tokens"):
                return


class EarlyExit(Strategy):
    """Lossy early exit: a token leaves at the first head whose confidence metric passes its threshold.

    `fill` decides the K/V of blocks a token skipped: `lazy` (exact: computed when a later token needs that
    block), `copy` (CALM: projected from the exit hidden state at once, approximate) or `recompute` (no cache:
    every step reruns the whole prefix through the blocks it needs; exact and expensive).
    """

    name = "early_exit"

    def __init__(self, policy: ExitPolicy, fill: str = "lazy"):
        if fill not in FILL_POLICIES:
            raise ValueError(f"unknown fill policy {fill!r}; choose one of {FILL_POLICIES}")
        self.policy = _as_policy(policy, "EarlyExit")
        self.fill = fill

    def validate(self, engine: Engine) -> None:
        _check_policy(engine, self.policy)

    def describe(self) -> dict:
        return {
            "strategy": self.name,
            "metric": self.policy.metric,
            "fill": self.fill,
            "thresholds": list(self.policy.thresholds),
        }

    def advance(self, session: DecodeSession, position: int, token: int) -> StepResult:
        """One early-exit step of `token` at `position`, its KV fill and its exit counted; the caller counts
        the produced token (as `exited` when `result.head` is set, else `full_tokens`)."""
        if self.fill == "recompute":
            session.reset_for_recompute(position)
        result = session.step(position, token, self.policy)
        if result.head is None:
            session.stats.full_passes += 1
        else:
            if self.policy.candidates is not None:
                result = _full_head(session, position, result)
            session.stats.exits_per_head[result.head] += 1
            if self.fill == "copy":
                session.copy_fill(position, session.engine.head_layers[result.head])
        return result

    def run(self, session: DecodeSession, first_token: int) -> None:
        position, token = session.prompt_len, first_token
        while True:
            result = self.advance(session, position, token)
            token = result.token
            position += 1
            if not session.emit(token, "full_tokens" if result.head is None else "exited"):
                return


def _full_head(session: DecodeSession, position: int, result: StepResult) -> StepResult:
    """A pruned signal's gate opened at `result.head` (its logits cover only the candidates): lossy early exit
    emits the head's own prediction from its full logits, as calibrated and as the scoring cascade does
    (pipeline/exits/vocab_pruning.py). One full head evaluation; the position's hidden state in the cache is
    the head's input (the step stopped at the head's block)."""
    engine = session.engine
    hidden = session.cache.hidden[:, position : position + 1].to(engine.head_dtype)
    logits = engine.heads(result.head, hidden).reshape(-1)
    session.stats.head_evals += 1
    token, probs = session.choose(logits)
    return StepResult(result.head, token, logits=logits, probs=probs, value=result.value)


class _Speculative(Strategy):
    """Draft with early exits, verify with the final layer over all drafts at once, keep the longest
    matching prefix. Output is exactly greedy decoding of the full model.

    With sampling, drafts are drawn from the exiting head's distribution q and verified by the
    speculative-sampling rule (`sampling.verify_drafts`): kept with probability min(1, p(x)/q(x)), the first
    rejected one replaced by a draw from normalize(max(0, p - q)), the bonus token drawn from p. The output is
    then distributed exactly as sampling from the full model (docs/design.md §1.8).

    `bonus`: after a verification where every draft matched, the verifying pass has also computed the full
    model's next token (from the row of the last draft) and emits it as a bonus. Without the bonus (the
    DSSD paper author's LayerSkip baseline) that token is dropped: the row of the last draft is cropped from
    the cache and the next round consumes the last draft again at the same position, so the output stays
    greedy decoding (the dropped token is what that row recomputes) at the price of one recomputed row;
    with sampling the next round drafts that position afresh, still exact in distribution.
    """

    max_draft: int
    bonus: bool = True
    # Adaptive draft length (DSSD): stop drafting once the estimated probability that every pending draft is
    # accepted falls below `min_chain_prob` (pipeline/exits/draft_stop.py); 0 never stops early.
    min_chain_prob: float = 0.0
    draft_accuracy: DraftAccuracy | None = None

    def _policy(self, engine: Engine) -> ExitPolicy:
        raise NotImplementedError

    def _draft_policy(self, session: DecodeSession, position: int, policy: ExitPolicy) -> ExitPolicy | None:
        """The exit policy of the step at `position` while drafting (None: stop drafting and verify)."""
        return policy

    def run(self, session: DecodeSession, first_token: int) -> None:
        policy = self._policy(session.engine)
        stats, eos = session.stats, session.eos_token_ids
        position, token = session.prompt_len, first_token
        while True:
            base = position
            drafts: list[int] = []
            draft_heads: list[int] = []
            draft_probs: list[torch.Tensor] = []  # sampling: the distribution q each draft was drawn from
            # A verification pass with the bonus yields one more token, so never draft past the output budget.
            cap = min(self.max_draft, session.remaining - int(self.bonus))
            chain = 1.0  # estimated probability that every pending draft is accepted
            while True:
                forced = len(drafts) >= cap or (drafts and drafts[-1] in eos) or chain < self.min_chain_prob
                step_policy = None if forced else self._draft_policy(session, position, policy)
                result = session.step(position, token, step_policy, verify_from=base)
                if result.head is None:
                    break
                drafts.append(result.token)
                draft_heads.append(result.head)
                draft_probs.append(result.probs)
                if self.draft_accuracy is not None:
                    chain *= self.draft_accuracy(result.head, result.value)
                position += 1
                token = result.token
            stats.full_passes += 1
            stats.drafted += len(drafts)
            for head in draft_heads:
                stats.drafts_per_head[head] += 1
            if drafts:
                stats.verifications += 1
            matched, next_token = self._verify(session, drafts, draft_probs, result)
            for j in range(matched):
                session.accepted_per_head[draft_heads[j]] += 1
                if not session.emit(drafts[j], "accepted"):
                    return
            if drafts and matched == len(drafts) and not self.bonus:
                # No bonus: drop the last draft's row; the next round consumes that draft at its position.
                position = base + matched
                session.crop(position)
                token = drafts[-1]
                continue
            kind = "corrections" if matched < len(drafts) else ("bonus" if drafts else "full_tokens")
            token = next_token
            # Rows after the first mismatch were computed from a wrong token: drop them from every layer.
            position = base + matched + 1
            session.crop(position)
            if not session.emit(token, kind):
                return

    @staticmethod
    def _verify(
        session: DecodeSession, drafts: list[int], draft_probs: list[torch.Tensor], result: StepResult
    ) -> tuple[int, int]:
        """How many drafts the verification pass `result` keeps, and the full model's token after them (the
        correction of the first rejected draft, or the bonus token of the row after the last draft)."""
        if session.sampling is None:
            # Greedy: keep the longest prefix equal to the full model's argmax; `full[j]` is its token after
            # row base + j.
            full = result.final_tokens
            matched = 0
            while matched < len(drafts) and drafts[matched] == full[matched]:
                matched += 1
            return matched, full[matched]
        if not drafts:
            return 0, result.token
        p = session.sampling.probs(result.final_logits[: len(drafts)])
        matched, replacement = verify_drafts(p, torch.stack(draft_probs), drafts, session.generator)
        # Every draft kept: the bonus token is the step's own draw from p of the last row.
        return matched, result.token if replacement is None else replacement


class DSSD(_Speculative):
    """Dynamic self-speculative decoding: draft while some head is confident (per-head thresholds for one
    ε), stop drafting when a token finds no confident head (it then reaches the final layer, which
    verifies every draft in the same pass) or at `max_draft` drafts.

    Adaptive draft length: with `draft_accuracy` (per-draft accuracy from calibration) and
    `min_chain_prob=γ > 0`, drafting also stops once the product of the pending drafts' accuracies falls
    below γ (pipeline/exits/draft_stop.py). γ = 0 is the paper's rule."""

    name = "dssd"

    def __init__(
        self,
        policy: ExitPolicy,
        max_draft: int = 16,
        min_chain_prob: float = 0.0,
        draft_accuracy: DraftAccuracy | None = None,
    ):
        if max_draft < 0:
            raise ValueError("max_draft must be >= 0")
        if not 0.0 <= min_chain_prob <= 1.0:
            raise ValueError(f"min_chain_prob (γ) must lie in [0, 1], got {min_chain_prob}")
        if min_chain_prob > 0 and draft_accuracy is None:
            raise ValueError(
                "min_chain_prob > 0 needs draft_accuracy (the calibrate stage's per-draft accuracy: "
                "ExitThresholds.draft_accuracy)"
            )
        self.policy = _as_policy(policy, "DSSD")
        if draft_accuracy is not None and draft_accuracy.metric != self.policy.metric:
            raise ValueError(
                f"draft_accuracy is a function of {draft_accuracy.metric!r} but the policy exits on "
                f"{self.policy.metric!r}: calibrate both on the same metric"
            )
        self.max_draft = max_draft
        self.extra_capacity = max_draft
        self.min_chain_prob = float(min_chain_prob)
        self.draft_accuracy = draft_accuracy if min_chain_prob > 0 else None

    def validate(self, engine: Engine) -> None:
        _check_policy(engine, self.policy)
        if self.draft_accuracy is not None and self.draft_accuracy.n_heads != len(engine.head_layers):
            raise ValueError(
                f"draft_accuracy covers {self.draft_accuracy.n_heads} heads, the engine has "
                f"{len(engine.head_layers)}"
            )

    def describe(self) -> dict:
        return {
            "strategy": self.name,
            "metric": self.policy.metric,
            "max_draft": self.max_draft,
            "min_chain_prob": self.min_chain_prob,
            "thresholds": list(self.policy.thresholds),
        }

    def _policy(self, engine: Engine) -> ExitPolicy:
        return self.policy


class LayerSkip(_Speculative):
    """LayerSkip-style self-speculation: every draft exits at one fixed head, `draft_length` drafts per
    verification (no confidence test). `bonus=False` is the DSSD paper author's baseline: no bonus token
    after a fully accepted draft (see `_Speculative`)."""

    name = "layerskip"

    def __init__(self, head: int, draft_length: int, bonus: bool = True):
        if draft_length < 1:
            raise ValueError("draft_length must be >= 1")
        self.head = head
        self.max_draft = draft_length
        self.extra_capacity = draft_length
        self.bonus = bonus

    def validate(self, engine: Engine) -> None:
        if engine.heads is None:
            raise ValueError("layerskip needs early-exit heads: Engine(model, heads)")
        if not 0 <= self.head < len(engine.head_layers):
            raise ValueError(f"head index {self.head} out of range: {len(engine.head_layers)} heads")

    def describe(self) -> dict:
        return {"strategy": self.name, "head": self.head, "draft_length": self.max_draft, "bonus": self.bonus}

    def _policy(self, engine: Engine) -> ExitPolicy:
        return ExitPolicy.fixed_head(engine.head_layers, self.head)


class PerfectGate(_Speculative):
    """DSSD with a perfect confidence gate: an analysis bound, not a decoder (it needs the greedy output in
    advance). `earliest_head[j]` is the earliest head whose argmax is greedy's token j of this prompt, None
    where no head has it (`Engine.oracle_bound(prompt).earliest_head`). Each token is drafted at that head
    exactly when one exists: drafting never wastes a draft, never misses one, and the gate itself costs
    nothing; drafts are verified like every draft (so the output is greedy's, checked like the others).

    Its speed is the most any confidence signal could get out of these heads under DSSD's rules (same engine,
    same verification, same `max_draft`): what separates DSSD from it is the gate, what separates it from
    greedy is the heads and the step's costs (docs/design.md §1.6)."""

    name = "dssd_perfect_gate"

    def __init__(self, earliest_head: Sequence[int | None], max_draft: int = 16):
        if max_draft < 1:
            raise ValueError("max_draft must be >= 1")
        self.earliest_head = list(earliest_head)
        self.max_draft = max_draft
        self.extra_capacity = max_draft
        self._fixed: dict[int, ExitPolicy] = {}

    def validate(self, engine: Engine) -> None:
        if engine.heads is None:
            raise ValueError("dssd_perfect_gate needs early-exit heads: Engine(model, heads)")
        n_heads = len(engine.head_layers)
        if any(h is not None and not 0 <= h < n_heads for h in self.earliest_head):
            raise ValueError(f"earliest_head names a head outside the engine's {n_heads} heads")
        self._fixed = {k: ExitPolicy.fixed_head(engine.head_layers, k) for k in range(n_heads)}

    def describe(self) -> dict:
        return {"strategy": self.name, "max_draft": self.max_draft}

    def _policy(self, engine: Engine) -> ExitPolicy:
        return ExitPolicy.disabled(engine.head_layers)

    def _draft_policy(self, session: DecodeSession, position: int, policy: ExitPolicy) -> ExitPolicy | None:
        # The step at `position` predicts generated token j (the prefill produced token 0).
        j = position - session.prompt_len + 1
        head = self.earliest_head[j] if j < len(self.earliest_head) else None
        return None if head is None else self._fixed[head]


STRATEGIES = {cls.name: cls for cls in (Greedy, EarlyExit, LayerSkip, DSSD)}


def make_strategy(name: str, **kwargs) -> Strategy:
    """Build a strategy by name: greedy, early_exit, layerskip, dssd (keyword arguments as the classes)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}")
    return STRATEGIES[name](**kwargs)
