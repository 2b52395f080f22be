"""Layer-wise decoding engine: exact numerics, jagged-cache exactness, losslessness, statistics."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from pipeline.engine import (
    DSSD,
    CostModel,
    EarlyExit,
    Engine,
    Greedy,
    LayerSkip,
    adapter_for,
    make_strategy,
)
from pipeline.exits.confidence import entropy
from pipeline.exits.heads import EarlyExitHeads
from pipeline.exits.policy import ExitPolicy
from pipeline.models.backbone import BackboneError

VOCAB = 256
HEAD_LAYERS = [0, 1, 2]
N_PROMPTS = 50
NEW_TOKENS = 20


def _neox(parallel: bool = True) -> torch.nn.Module:
    cfg = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=512,
        initializer_range=0.3,
        use_parallel_residual=parallel,
        rotary_pct=0.5,
    )
    return GPTNeoXForCausalLM(cfg)


def _llama() -> torch.nn.Module:
    # GQA (4 query heads, 2 KV heads) exercises the grouped attention path.
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
        initializer_range=0.3,
    )
    return LlamaForCausalLM(cfg)


def _build(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = {"neox": _neox, "neox_seq": lambda: _neox(parallel=False), "llama": _llama}[kind]()
    model.eval().requires_grad_(False)
    # No EOS/pad from the random config: generate() must run the full length unless a test asks for EOS.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _policy(thresholds) -> ExitPolicy:
    """An entropy policy over the test heads."""
    return ExitPolicy(HEAD_LAYERS, thresholds, "entropy")


def _hf_greedy(model, prompt: torch.Tensor, n: int, eos: int | None = None) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            prompt.view(1, -1),
            do_sample=False,
            max_new_tokens=n,
            eos_token_id=eos,
            pad_token_id=0,
            attention_mask=torch.ones(1, prompt.numel(), dtype=torch.long),
        )
    return out[0, prompt.numel() :].tolist()


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32 agreement to ~1e-5 of the tensor's scale: the random weights make residual streams reach ~50,
    where reordered float sums alone differ by 1e-5 in absolute terms."""
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, atol=1e-5 * scale, rtol=1e-5)


def _prompts(n: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 13, (n,), generator=gen).tolist()
    return [torch.randint(0, VOCAB, (length,), generator=gen) for length in lengths]


def _entropy_quantiles(engine: Engine, prompts, qs) -> list[list[float]]:
    """Per-head entropy quantiles over greedy tokens: thresholds that make heads exit at chosen rates."""
    ents: list[list[float]] = [[] for _ in engine.head_layers]
    with torch.no_grad():
        for prompt in prompts[:5]:
            out = engine.model(prompt.view(1, -1), output_hidden_states=True)
            for k, layer in enumerate(engine.head_layers):
                ents[k] += entropy(engine.heads(k, out.hidden_states[layer + 1][0])).tolist()
    return [[float(torch.tensor(e).quantile(q)) for e in ents] for q in qs]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here on one thread (conftest's `one_thread`, restored after the module)."""
    yield


@pytest.fixture(scope="module", params=["neox", "llama"])
def setup(request):
    model = _build(request.param)
    prompts = _prompts(N_PROMPTS, seed=1)
    refs = [_hf_greedy(model, p, NEW_TOKENS) for p in prompts]
    return request.param, model, prompts, refs


# -- adapters: block-by-block numerics equal the Hugging Face forward -----------------------------------------


def _models_for_numerics():
    torch.manual_seed(0)
    yield "neox", _build("neox")
    yield "neox_seq", _build("neox_seq")
    yield "llama", _build("llama")
    torch.manual_seed(0)
    yield (
        "qwen2",
        Qwen2ForCausalLM(
            Qwen2Config(
                vocab_size=VOCAB,
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=128,
                initializer_range=0.3,
            )
        ).eval(),
    )
    torch.manual_seed(0)
    # A window shorter than the sequence exercises the sliding-window mask.
    yield (
        "mistral",
        MistralForCausalLM(
            MistralConfig(
                vocab_size=VOCAB,
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=128,
                sliding_window=5,
                initializer_range=0.3,
            )
        ).eval(),
    )


def _hf_incremental_logits(model, ids: torch.Tensor, split: int) -> torch.Tensor:
    out = model(ids[:, :split], use_cache=True)
    cache, logits = out.cache, [out.logits]
    for pos in range(split, ids.shape[1]):
        out = model(ids[:, pos : pos + 1], cache=cache, use_cache=True)
        cache = out.cache
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize(
    "name,model", list(_models_for_numerics()), ids=lambda x: x if isinstance(x, str) else ""
)
def test_adapter_matches_hf_forward(name, model):
    ids = torch.randint(0, VOCAB, (1, 17), generator=torch.Generator().manual_seed(3))
    engine = Engine(model)
    with torch.no_grad():
        # Multi-row path: the whole sequence in one prefill against the full forward.
        ref = model(ids)
        sess = engine.session(ids, max_new_tokens=8)
        sess.prefill()
        logits = engine.adapter.logits(sess.cache.hidden[:, :17])
        torch.testing.assert_close(logits, ref.logits, atol=1e-5, rtol=1e-5)
        # Single-row path: prefill 9 positions, then one at a time, against HF's own cached decoding (the
        # random weights make hidden states large, so HF's cached and full forwards differ by ~1e-4 already).
        sess = engine.session(ids[:, :9], max_new_tokens=8)
        sess.prefill()
        for pos in range(9, 17):
            sess.step(pos, int(ids[0, pos]), verify_from=pos)
        logits = engine.adapter.logits(sess.cache.hidden[:, :17])
    torch.testing.assert_close(logits, _hf_incremental_logits(model, ids, 9), atol=1e-5, rtol=1e-5)


def test_unsupported_architecture_is_refused():
    class Fake(torch.nn.Module):
        pass

    with pytest.raises(BackboneError, match="does not support"):
        adapter_for(Fake())


# -- the jagged cache: arbitrary exit/crop sequences keep the full model's states -----------------------------


@pytest.mark.parametrize("kind", ["neox", "llama"])
def test_jagged_cache_exact_after_random_exits_and_crops(kind):
    model = _build(kind)
    heads = EarlyExitHeads.from_backbone(model, HEAD_LAYERS, init="random", seed=0)
    engine = Engine(model, heads)
    rng = random.Random(7)
    with torch.no_grad():
        for trial in range(6):
            prompt = torch.randint(
                0, VOCAB, (rng.randint(1, 6),), generator=torch.Generator().manual_seed(trial)
            )
            sess = engine.session(prompt, max_new_tokens=40, extra_capacity=8)
            token = sess.prefill()
            pos = sess.prompt_len
            exits: dict[int, int] = {}  # position -> block whose output is its frontier state
            for _ in range(30):
                op = rng.random()
                if op < 0.15 and pos > sess.prompt_len + 1:
                    # Crop back (as after a rejection) and continue from a different token.
                    pos = rng.randint(sess.prompt_len + 1, pos)
                    sess.crop(pos)
                    exits = {p: b for p, b in exits.items() if p < pos}
                    token = rng.randrange(VOCAB)
                    continue
                layer = rng.choice(HEAD_LAYERS + [None, None])
                rule = None if layer is None else ExitPolicy.fixed_head(HEAD_LAYERS, HEAD_LAYERS.index(layer))
                result = sess.step(
                    pos, token, rule, verify_from=sess.cache.lengths[-1] if layer is None else pos
                )
                exits[pos] = engine.num_layers - 1 if layer is None else layer
                sess.cache.check()
                token = rng.randrange(VOCAB) if rng.random() < 0.5 else result.token
                pos += 1
            # Compare every computed frontier state with the full forward of the same tokens.
            end = pos
            ref = model(sess.ids[:end].view(1, -1), output_hidden_states=True)
            for p, block in exits.items():
                if sess.cache.depth(p) != block + 1:  # overwritten by a later lazy fill
                    continue
                state = sess.cache.hidden[0, p]
                if block == engine.num_layers - 1:  # HF's last hidden state is after the final norm
                    state = engine.adapter.final_norm(state)
                _close(state, ref.hidden_states[block + 1][0, p])
            # Finish: a full-depth pass fills every layer; logits and K/V must equal a fresh prefill's.
            first_pending = sess.cache.lengths[-1]
            sess.step(end, rng.randrange(VOCAB), verify_from=first_pending)
            ref = model(sess.ids[: end + 1].view(1, -1))
            logits = engine.adapter.logits(sess.cache.hidden[:, first_pending : end + 1])
            _close(logits, ref.logits[:, first_pending : end + 1])
            keys = [k[:, :, : end + 1].clone() for k in sess.cache.keys]
            fresh = engine.session(sess.ids[: end + 1], max_new_tokens=1)
            fresh.prefill()
            for layer, k in enumerate(keys):
                _close(k, fresh.cache.keys[layer][:, :, : end + 1])


# -- losslessness: DSSD and LayerSkip are token-for-token greedy -----------------------------------------------


def _settings(engine: Engine, prompts):
    q25, q60, q100 = _entropy_quantiles(engine, prompts, [0.25, 0.6, 1.0])
    always = [t + 1.0 for t in q100]  # every enabled head is confident: drafting runs to the cap
    return [
        DSSD(_policy(q25), max_draft=8),
        DSSD(_policy(q60), max_draft=4),
        DSSD(_policy([None, q60[1], None]), max_draft=16),
        DSSD(_policy(always), max_draft=3),
        LayerSkip(head=0, draft_length=1),
        LayerSkip(head=1, draft_length=3),
        LayerSkip(head=2, draft_length=6),
    ]


@pytest.mark.parametrize("init", ["unembedding", "random"])
def test_speculative_is_lossless(setup, init):
    kind, model, prompts, refs = setup
    heads = EarlyExitHeads.from_backbone(model, HEAD_LAYERS, init=init, seed=0)
    engine = Engine(model, heads)
    totals = {"drafted": 0, "accepted": 0, "corrections": 0}
    for strategy in _settings(engine, prompts):
        for prompt, ref in zip(prompts, refs, strict=True):
            result = engine.generate(prompt, strategy, NEW_TOKENS)
            assert result.tokens == ref, f"{kind}/{init} {strategy.describe()} prompt {prompt.tolist()}"
            result.stats.check()
            for key in totals:
                totals[key] += getattr(result.stats, key)
            if isinstance(strategy, LayerSkip):
                assert result.stats.drafts_per_head[strategy.head] == result.stats.drafted
                assert result.stats.drafted <= strategy.max_draft * result.stats.verifications
    # The settings must exercise both acceptance and rejection paths.
    assert totals["corrections"] > 0 and totals["drafted"] > totals["accepted"]
    if init == "unembedding":
        assert totals["accepted"] > 0


@pytest.mark.parametrize("init", ["unembedding", "random"])
def test_layerskip_without_bonus_is_lossless(setup, init):
    """The paper author's baseline drops the bonus token after a fully accepted draft: the next round
    consumes the last draft again, so the output is still greedy decoding."""
    kind, model, prompts, refs = setup
    heads = EarlyExitHeads.from_backbone(model, HEAD_LAYERS, init=init, seed=0)
    engine = Engine(model, heads)
    totals = {"drafted": 0, "accepted": 0, "corrections": 0, "verifications": 0}
    for head, d in ((0, 1), (1, 3), (2, 6), (2, NEW_TOKENS + 4)):
        strategy = LayerSkip(head, d, bonus=False)
        for prompt, ref in zip(prompts, refs, strict=True):
            result = engine.generate(prompt, strategy, NEW_TOKENS)
            assert result.tokens == ref, f"{kind}/{init} {strategy.describe()} prompt {prompt.tolist()}"
            s = result.stats
            s.check()
            assert s.bonus == 0
            assert s.drafted <= d * s.verifications
            for key in totals:
                totals[key] += getattr(s, key)
    assert totals["corrections"] > 0 and totals["drafted"] > totals["accepted"]
    if init == "unembedding":
        # Fully accepted rounds happened (verifications without a correction), and emitted no bonus.
        assert totals["accepted"] > 0 and totals["verifications"] > totals["corrections"]


def test_bonus_token_saves_a_row_per_fully_accepted_round():
    """With heads that equal the full model's own unembedding at the last block, every draft is accepted:
    with the bonus each round emits d + 1 tokens, without it d tokens and one row is recomputed."""
    model = _build("neox")
    heads = EarlyExitHeads.from_backbone(model, [3], init="unembedding", seed=0)
    engine = Engine(model, heads)
    prompt = torch.arange(5)
    ref = _hf_greedy(model, prompt, NEW_TOKENS)
    with_bonus = engine.generate(prompt, LayerSkip(0, 3), NEW_TOKENS)
    without = engine.generate(prompt, LayerSkip(0, 3, bonus=False), NEW_TOKENS)
    assert with_bonus.tokens == without.tokens == ref
    assert with_bonus.stats.bonus > 0 and without.stats.bonus == 0
    assert with_bonus.stats.corrections == without.stats.corrections == 0
    assert without.stats.accepted == NEW_TOKENS - 1  # everything but the prompt's token is a draft
    assert without.stats.verifications > with_bonus.stats.verifications


def test_greedy_engine_equals_generate(setup):
    kind, model, prompts, refs = setup
    engine = Engine(model)
    for prompt, ref in zip(prompts, refs, strict=True):
        result = engine.generate(prompt, Greedy(), NEW_TOKENS)
        assert result.tokens == ref
        result.stats.check()
        assert result.stats.generated == NEW_TOKENS == result.stats.full_passes + 1
        assert result.stats.layer_equivalents_per_token == pytest.approx(engine.num_layers + engine.cost.head)


def test_eos_stops_like_generate():
    model = _build("neox")
    heads = EarlyExitHeads.from_backbone(model, HEAD_LAYERS, init="unembedding", seed=0)
    engine = Engine(model, heads)
    prompts = _prompts(12, seed=5)
    q60 = _entropy_quantiles(engine, prompts, [0.6])[0]
    for prompt in prompts:
        free = _hf_greedy(model, prompt, NEW_TOKENS)
        eos = free[len(free) // 2]  # a token greedy decoding does produce
        ref = _hf_greedy(model, prompt, NEW_TOKENS, eos=eos)
        assert ref[-1] == eos and len(ref) <= len(free)
        for strategy in (Greedy(), DSSD(_policy(q60), max_draft=6), LayerSkip(1, 4)):
            result = engine.generate(prompt, strategy, NEW_TOKENS, eos_token_id=eos)
            assert result.tokens == ref, strategy.describe()
            result.stats.check()


# -- early exit ----------------------------------------------------------------------------------------------


def test_early_exit_with_all_heads_disabled_is_greedy(setup):
    kind, model, prompts, refs = setup
    heads = EarlyExitHeads.from_backbone(model, HEAD_LAYERS, init="random", seed=0)
    engine = Engine(model, heads)
    for prompt, ref in list(zip(prompts, refs, strict=True))[:10]:
        result = engine.generate(prompt, EarlyExit(_policy([None, None, None])), NEW_TOKENS)
        assert result.tokens == ref
        assert result.stats.exited == 0 and result.stats.head_evals == 0


def test_early_exit_fill_policies():
    model = _build("neox")
    heads = EarlyExitHeads.from_backbone(model, HEAD_LAYERS, init="unembedding", seed=0)
    engine = Engine(model, heads)
    prompts = _prompts(8, seed=9)
    q50 = _entropy_quantiles(engine, prompts, [0.5])[0]
    cost = {}
    for prompt in prompts:
        runs = {
            fill: engine.generate(prompt, EarlyExit(_policy(q50), fill=fill), NEW_TOKENS)
            for fill in ("lazy", "recompute", "copy")
        }
        # Lazy fill and full recomputation compute the same exact hidden states: identical tokens.
        assert runs["lazy"].tokens == runs["recompute"].tokens
        for fill, run in runs.items():
            run.stats.check()
            assert len(run.tokens) == NEW_TOKENS
            cost[fill] = cost.get(fill, 0.0) + run.stats.layer_equivalents
        assert runs["copy"].stats.kv_only_rows > 0 or runs["copy"].stats.exited == 0
        assert sum(runs["lazy"].stats.exits_per_head) == runs["lazy"].stats.exited > 0
    assert cost["recompute"] > cost["lazy"]


# -- statistics and the oracle bound ----------------------------------------------------------------------------


def test_statistics_add_up_by_hand():
    model = _build("neox")
    heads = EarlyExitHeads.from_backbone(model, HEAD_LAYERS, init="unembedding", seed=0)
    engine = Engine(model, heads, cost=CostModel(head=2.0))
    prompt = torch.arange(5)
    result = engine.generate(prompt, LayerSkip(head=1, draft_length=2), NEW_TOKENS)
    s = result.stats
    s.check()
    L, exit_blocks = engine.num_layers, HEAD_LAYERS[1] + 1
    # Every draft ran blocks 0..1 and one head; every verification pass ran the rest for its rows plus one
    # full-depth row, and unembedded every row since the round began.
    assert s.head_evals == s.drafted
    # Rejected rows are computed too: no discount.
    assert s.block_rows == L + s.drafted * exit_blocks + s.full_passes * L + s.drafted * (L - exit_blocks)
    assert s.lm_head_rows == 1 + s.full_passes + s.drafted
    assert s.layer_equivalents == pytest.approx(s.block_rows + 2.0 * (s.head_evals + s.lm_head_rows))
    assert s.generated == NEW_TOKENS and s.prefill_block_rows == (prompt.numel() - 1) * L
    assert 0.0 <= s.acceptance_rate <= 1.0
    record = s.as_dict()
    assert record["acceptance_rate"] == s.acceptance_rate and record["head_cost"] == 2.0


def test_oracle_bound(setup):
    kind, model, prompts, refs = setup
    heads = EarlyExitHeads.from_backbone(model, HEAD_LAYERS, init="unembedding", seed=0)
    engine = Engine(model, heads)
    for prompt, ref in list(zip(prompts, refs, strict=True))[:5]:
        bound = engine.oracle_bound(prompt, NEW_TOKENS)
        assert bound.tokens == ref
        assert len(bound.earliest_head) == NEW_TOKENS
        # The earliest agreeing head is really the earliest: LayerSkip with d=1 at that head accepts it.
        with torch.no_grad():
            hidden = model(torch.cat([prompt, torch.tensor(ref)]).view(1, -1), output_hidden_states=True)
        for t, k in enumerate(bound.earliest_head):
            row = prompt.numel() - 1 + t
            agree = [
                int(heads(j, hidden.hidden_states[layer + 1][0, row]).argmax()) == ref[t]
                for j, layer in enumerate(HEAD_LAYERS)
            ]
            assert k == (agree.index(True) if any(agree) else None)
        assert bound.layer_equivalents_per_token <= bound.full_cost
        assert bound.layer_equivalents_per_token <= bound.cascade_layer_equivalents_per_token
        assert sum(bound.exits_per_head()) == sum(k is not None for k in bound.earliest_head)


def test_api_errors():
    model = _build("neox")
    heads = EarlyExitHeads.from_backbone(model, HEAD_LAYERS, init="random", seed=0)
    engine = Engine(model, heads)
    with pytest.raises(ValueError, match="batch size 1"):
        engine.generate(torch.zeros(2, 3, dtype=torch.long), Greedy(), 4)
    with pytest.raises(ValueError, match="thresholds"):
        engine.generate(torch.zeros(3, dtype=torch.long), DSSD(ExitPolicy([0], [1.0])), 4)
    with pytest.raises(ValueError, match="heads"):
        Engine(model).generate(torch.zeros(3, dtype=torch.long), LayerSkip(0, 2), 4)
    with pytest.raises(ValueError, match="fill policy"):
        EarlyExit(_policy([None] * 3), fill="nope")
    assert make_strategy("dssd", policy=_policy([1.0, None, 2.0])).name == "dssd"
    assert engine.generate(torch.zeros(3, dtype=torch.long), Greedy(), 0).tokens == []
