"""Layer-wise decoding engine: greedy, early exit, LayerSkip and DSSD on a jagged KV cache.

Public API::

    from pipeline.engine import Engine, Greedy, EarlyExit, LayerSkip, DSSD
    from pipeline.exits.policy import ExitPolicy

    engine = Engine(model, heads)                      # model: GPT-NeoX or Llama/Mistral/Qwen2 causal LM
    policy = ExitPolicy(heads.layers, [2.1, 1.7, None, 0.9], "entropy")   # or ExitThresholds.for_eps(m, ε)
    result = engine.generate(input_ids, DSSD(policy), max_new_tokens=64, eos_token_id=None)
    result.tokens                                      # list[int], new tokens only
    result.stats.acceptance_rate, result.stats.layer_equivalents_per_token, result.stats.as_dict()
    bound = engine.oracle_bound(input_ids, max_new_tokens=64)   # earliest agreeing head per greedy token

- `Engine(model, heads=None, cost=None)`: `heads` is an `EarlyExitHeads` (block indices `heads.layers`);
  `cost` a `CostModel` (pipeline/exits/cost.py, re-exported here; default: a vocab projection costs
  d·V/(12·d²) blocks; `CostModel.from_adapter` counts the real block's multiply-adds instead).
- `Engine.generate(input_ids, strategy, max_new_tokens, eos_token_id=None) -> GenerationResult(tokens, stats)`:
  batch size 1 (`input_ids` is [seq] or [1, seq]), greedy (argmax) decoding. Generation stops after
  `max_new_tokens` tokens or right after emitting `eos_token_id` (included), like `model.generate`.
- Strategies (`make_strategy(name, **kwargs)` builds them by name):
  `Greedy()` — full model; `EarlyExit(policy, fill="lazy"|"copy"|"recompute")` — lossy;
  `LayerSkip(head, draft_length)` and `DSSD(policy, max_draft=16)` — lossless (identical to greedy).
  `policy` is an `ExitPolicy` (pipeline/exits/policy.py) for the engine's head layers: one threshold per
  head (`None` disables that head) and the confidence metric; the engine's step asks `policy.exits`.
- `GenerationStats` (see `stats.py`) counts tokens by origin, drafts, verifications, block rows and calls,
  head evaluations and wall time; `layer_equivalents_per_token` (FLOP measure), `latency_equivalents_per_token`
  (one per call, whatever its rows), `acceptance_rate` and `accepted_per_verification` are derived;
  `check()` asserts that the counters add up.

How it works: `adapters.py` runs one block at a time on preallocated per-layer K/V buffers (adding an
architecture is one class); `cache.py` keeps per-layer lengths, so a token that exits early leaves deeper
layers behind and the next token that goes deeper first runs the pending positions with itself in one
causal multi-row forward (exact hidden states); `strategies.py` decides exits and verification; speculative
rejections crop every layer.
"""

from pipeline.engine.adapters import ADAPTERS, BackboneAdapter, GPTNeoXAdapter, LlamaAdapter, adapter_for
from pipeline.engine.cache import JaggedKVCache
from pipeline.engine.engine import DecodeSession, Engine, GenerationResult, StepResult
from pipeline.engine.stats import GenerationStats, OracleBound
from pipeline.engine.strategies import (
    DSSD,
    STRATEGIES,
    EarlyExit,
    Greedy,
    LayerSkip,
    Strategy,
    make_strategy,
)
from pipeline.exits.cost import FILL_POLICIES, CostModel

__all__ = [
    "ADAPTERS",
    "BackboneAdapter",
    "GPTNeoXAdapter",
    "LlamaAdapter",
    "adapter_for",
    "JaggedKVCache",
    "DecodeSession",
    "Engine",
    "GenerationResult",
    "StepResult",
    "CostModel",
    "GenerationStats",
    "OracleBound",
    "DSSD",
    "FILL_POLICIES",
    "STRATEGIES",
    "EarlyExit",
    "Greedy",
    "LayerSkip",
    "Strategy",
    "make_strategy",
]
