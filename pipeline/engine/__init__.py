"""Layer-wise decoding engine: greedy, early exit, LayerSkip and DSSD on a jagged KV cache.

Public API::

    from pipeline.engine import Engine, Greedy, EarlyExit, LayerSkip, DSSD, Sampling
    from pipeline.exits.policy import ExitPolicy

    engine = Engine(model, heads)                      # model: GPT-NeoX or Llama/Mistral/Qwen2 causal LM
    policy = ExitPolicy(heads.layers, [2.1, 1.7, None, 0.9], "entropy")   # or ExitThresholds.for_eps(m, ε)
    result = engine.generate(input_ids, DSSD(policy), max_new_tokens=64, eos_token_id=None)
    result.tokens                                      # list[int], new tokens only
    result.stats.acceptance_rate, result.stats.layer_equivalents_per_token, result.stats.as_dict()
    bound = engine.oracle_bound(input_ids, max_new_tokens=64)   # earliest agreeing head per greedy token
    sampled = engine.generate(input_ids, DSSD(policy), max_new_tokens=64,
                              sampling=Sampling(temperature=0.8, top_k=0, top_p=1.0),
                              generator=torch.Generator().manual_seed(0))

- `Engine(model, heads=None, cost=None)`: `heads` is an `EarlyExitHeads` (block indices `heads.layers`);
  `cost` a `CostModel` (pipeline/exits/cost.py, re-exported here; default: a vocab projection costs
  d·V/(12·d²) blocks; `CostModel.from_adapter` counts the real block's multiply-adds instead).
- `Engine.generate(input_ids, strategy, max_new_tokens, eos_token_id=None, sampling=None, generator=None)
  -> GenerationResult(tokens, stats)`: batch size 1 (`input_ids` is [seq] or [1, seq]). Generation stops
  after `max_new_tokens` tokens or right after emitting `eos_token_id` (included), like `model.generate`.
  `sampling=None` is greedy (argmax) decoding. `Sampling(temperature, top_k=0, top_p=1.0)` (`sampling.py`;
  `top_k=0` / `top_p=1.0` are off; invalid values raise ValueError at construction;
  `Sampling.or_greedy(t)` is None for t = 0) samples instead: every distribution is the logits / temperature,
  then top-k, then top-p, then softmax. Random numbers come from `generator` (a `torch.Generator`; None:
  torch's global generator). Reproducible: the same generator seed gives the same tokens for the same
  strategy, prompt, model and machine (different strategies draw differently: their outputs agree in
  distribution, not sample by sample). For independent reproducible prompts seed one generator per prompt,
  e.g. `torch.Generator().manual_seed(base_seed + prompt_index)`.
- Strategies (`make_strategy(name, **kwargs)` builds them by name):
  `Greedy()` — full model; `EarlyExit(policy, fill="lazy"|"copy"|"recompute")` — lossy;
  `LayerSkip(head, draft_length)` and `DSSD(policy, max_draft=16)` — lossless (identical to greedy);
  `PerfectGate(bound.earliest_head, max_draft)` — DSSD with a perfect confidence gate, an analysis bound
  (it needs the greedy output in advance: `bound = engine.oracle_bound(prompt, n)`).
  With sampling: `Greedy` samples from the full model (the reference), `EarlyExit` from the exiting head
  (lossy), `LayerSkip` and `DSSD` draft from the exiting head and verify with the speculative-sampling rule
  (accept x w.p. min(1, p(x)/q(x)), else draw from normalize(max(0, p - q)); bonus drawn from p), so their
  output is distributed exactly as sampling from the full model (docs/design.md §1.8). DSSD's confidence
  test still decides whether to draft; `acceptance_rate` = accepted / drafted counts the rule's acceptances.
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
from pipeline.engine.sampling import Sampling
from pipeline.engine.stats import GenerationStats, OracleBound
from pipeline.engine.strategies import (
    DSSD,
    STRATEGIES,
    EarlyExit,
    Greedy,
    LayerSkip,
    PerfectGate,
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
    "Sampling",
    "CostModel",
    "GenerationStats",
    "OracleBound",
    "DSSD",
    "FILL_POLICIES",
    "STRATEGIES",
    "EarlyExit",
    "Greedy",
    "LayerSkip",
    "PerfectGate",
    "Strategy",
    "make_strategy",
]
