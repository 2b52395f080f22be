"""Per-generation statistics (docs/design.md §2).

Compute is priced by the one cost model, `pipeline/exits/cost.py`, in two measures: FLOP layer-equivalents
from row counters (`block_rows`, `head_evals`, `lm_head_rows`, `kv_only_rows`) and latency-equivalents from
call counters (`block_calls`, `head_evals` — a head always runs on one row —, `lm_head_calls`,
`kv_only_calls`): a call over k rows costs one call.

Prefill attribution: the prompt's rows are counted apart (`prefill_block_rows`), except its last row, which
produces the first generated token and is counted like any decoding step; the prefill's block and
unembedding calls are counted as that step's calls. So greedy decoding costs exactly L + head per generated
token in both measures.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pipeline.exits.cost import CostModel


@dataclass
class GenerationStats:
    """What one generation did. Counters cover the decoding phase (see the module docstring for prefill).

    Token accounting (exact, also when EOS stops early):
    `generated = prefill_tokens + accepted + corrections + bonus + full_tokens + exited`, where
    - `accepted`: drafts confirmed by verification (speculative strategies),
    - `corrections`: the full model's token replacing the first rejected draft,
    - `bonus`: the full model's extra token after a verification where every draft matched,
    - `full_tokens`: tokens from a final-layer pass that verified no draft (greedy steps, non-confident
      tokens of early exit, DSSD rounds whose first token found no confident head),
    - `exited`: tokens emitted by a head without verification (lossy early exit).
    """

    strategy: str
    num_layers: int
    cost: CostModel
    prompt_tokens: int = 0
    generated: int = 0
    prefill_tokens: int = 0
    drafted: int = 0
    accepted: int = 0
    corrections: int = 0
    bonus: int = 0
    full_tokens: int = 0
    exited: int = 0
    verifications: int = 0
    full_passes: int = 0
    exits_per_head: list[int] = field(default_factory=list)
    drafts_per_head: list[int] = field(default_factory=list)
    block_rows: int = 0
    head_evals: float = 0  # early-exit head evaluations in full-head units (a pruned view over K of V: K/V)
    lm_head_rows: int = 0
    kv_only_rows: int = 0
    prefill_block_rows: int = 0
    block_calls: int = 0
    lm_head_calls: int = 0
    kv_only_calls: int = 0
    wall_time_s: float = 0.0

    # -- derived ----------------------------------------------------------------------------------------------

    @property
    def acceptance_rate(self) -> float:
        """accepted / drafted (nan without drafts)."""
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def accepted_per_verification(self) -> float:
        """Mean drafts accepted per verification pass that checked at least one draft."""
        return self.accepted / self.verifications if self.verifications else float("nan")

    @property
    def tokens_per_full_pass(self) -> float:
        """Generated tokens per final-layer pass (the first token's pass included): 1 for greedy."""
        passes = self.full_passes + self.prefill_tokens
        return self.generated / passes if passes else float("nan")

    @property
    def layer_equivalents(self) -> float:
        """FLOP layer-equivalents: rows through blocks, heads, unembedding and K/V-only projections."""
        return self.cost.layer_equivalents(
            self.block_rows, self.head_evals + self.lm_head_rows, self.kv_only_rows
        )

    @property
    def layer_equivalents_per_token(self) -> float:
        return self.layer_equivalents / self.generated if self.generated else float("nan")

    @property
    def latency_equivalents(self) -> float:
        """Latency-equivalents: block, head, unembedding and K/V-only calls, whatever their number of rows."""
        return self.cost.layer_equivalents(
            self.block_calls, self.head_evals + self.lm_head_calls, self.kv_only_calls
        )

    @property
    def latency_equivalents_per_token(self) -> float:
        return self.latency_equivalents / self.generated if self.generated else float("nan")

    @property
    def tokens_per_second(self) -> float:
        return self.generated / self.wall_time_s if self.wall_time_s > 0 else float("nan")

    def check(self) -> None:
        """Raise AssertionError if the counters do not add up."""
        parts = (
            self.prefill_tokens
            + self.accepted
            + self.corrections
            + self.bonus
            + self.full_tokens
            + self.exited
        )
        assert parts == self.generated, f"token accounting: {parts} != generated {self.generated}: {self}"
        assert 0 <= self.accepted <= self.drafted, f"accepted {self.accepted} > drafted {self.drafted}"
        assert sum(self.drafts_per_head) == self.drafted
        assert sum(self.exits_per_head) == self.exited
        assert self.corrections + self.bonus <= self.verifications <= self.full_passes
        assert self.block_calls <= self.block_rows and self.lm_head_calls <= self.lm_head_rows
        assert self.kv_only_calls <= self.kv_only_rows

    def as_dict(self) -> dict:
        """Flat record with the derived metrics, for results tables."""
        out = asdict(self)
        out.pop("cost")
        out["head_cost"], out["kv_only_cost"] = self.cost.head, self.cost.kv_only
        for name in (
            "acceptance_rate",
            "accepted_per_verification",
            "tokens_per_full_pass",
            "layer_equivalents",
            "layer_equivalents_per_token",
            "latency_equivalents",
            "latency_equivalents_per_token",
            "tokens_per_second",
        ):
            out[name] = getattr(self, name)
        return out


@dataclass
class OracleBound:
    """Per token of a greedy generation: the earliest head whose argmax equals the full model's token.

    `earliest_head[t]` is None when no head agrees (the token needs the full model). The compute an oracle
    exit would need per token (no verification, no fill of skipped layers: a lower bound):
    `oracle_cost[t]` = blocks up to the exit + one head, or L blocks + the unembedding without an exit;
    `cascade_cost[t]` also pays every shallower head evaluated on the way (what a cascade that knew its
    thresholds perfectly would pay).
    """

    tokens: list[int]
    earliest_head: list[int | None]
    head_layers: list[int]
    oracle_cost: list[float]
    cascade_cost: list[float]
    full_cost: float

    @property
    def layer_equivalents_per_token(self) -> float:
        return sum(self.oracle_cost) / len(self.oracle_cost) if self.oracle_cost else float("nan")

    @property
    def cascade_layer_equivalents_per_token(self) -> float:
        return sum(self.cascade_cost) / len(self.cascade_cost) if self.cascade_cost else float("nan")

    @property
    def exit_fraction(self) -> float:
        """Share of tokens some head gets right."""
        n = len(self.earliest_head)
        return sum(h is not None for h in self.earliest_head) / n if n else float("nan")

    def exits_per_head(self) -> list[int]:
        counts = [0] * len(self.head_layers)
        for head in self.earliest_head:
            if head is not None:
                counts[head] += 1
        return counts
