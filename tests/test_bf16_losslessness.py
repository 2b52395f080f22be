"""Losslessness in bf16: the classifier (exact / near_tie / mismatch) on hand-built logits, and LayerSkip / DSSD
on small random bf16 GPT-NeoX, Llama and Qwen2 models against the engine's greedy and transformers' `generate`:
every divergence is a near-tie, never a mismatch; fp32 stays exact; a corrupted output raises."""

from __future__ import annotations

import pytest
import torch

from benchmarks.bf16_losslessness import HEAD_LAYERS, VOCAB, entropy_policies, random_model, random_prompts
from pipeline.engine import DSSD, Engine, Greedy, LayerSkip
from pipeline.engine.adapters import adapter_for
from pipeline.engine.cache import JaggedKVCache
from pipeline.evaluation.decoding_harness import check_identical, hf_greedy
from pipeline.evaluation.decoding_report import Setting, setting_rows
from pipeline.evaluation.losslessness import (
    EXACT,
    MISMATCH,
    NEAR_TIE,
    NEAR_TIE_ULPS,
    LosslessnessError,
    check_lossless,
    classify,
    judge_divergence,
    reference_logits,
    ulp,
)
from pipeline.exits.heads import EarlyExitHeads

ARCHS = ["neox", "llama", "qwen2"]
NEW_TOKENS = 16
pytestmark = pytest.mark.usefixtures("one_thread")


# --- the classifier on hand-built logits --------------------------------------------------------------------


def test_ulp_is_the_spacing_of_the_dtype_at_that_magnitude():
    assert ulp(torch.bfloat16, 1.0) == 2.0**-7
    assert ulp(torch.bfloat16, 3.0) == 2.0**-6  # [2, 4): twice the spacing of [1, 2)
    assert ulp(torch.bfloat16, -0.3) == 2.0**-9
    assert ulp(torch.float16, 1.0) == 2.0**-10
    assert torch.tensor(1.0 + ulp(torch.bfloat16, 1.0), dtype=torch.bfloat16).item() > 1.0


def _logits(top: float, second: float, rest: float = -5.0) -> torch.Tensor:
    logits = torch.full((8,), rest)
    logits[3], logits[5] = top, second
    return logits


def test_an_exact_tie_is_a_near_tie_in_bf16_and_fp16_and_a_mismatch_in_fp32():
    tie = _logits(4.0, 4.0)
    for dtype in (torch.bfloat16, torch.float16):
        verdict = judge_divergence(tie, 7, 3, 5, dtype)
        assert verdict.kind == NEAR_TIE and verdict.divergence.gap == 0.0
    for dtype in (torch.float32, torch.float64):  # no allowance in full precision
        assert judge_divergence(tie, 7, 3, 5, dtype).kind == MISMATCH


def test_a_one_ulp_gap_is_a_near_tie_either_way_round():
    one_ulp = ulp(torch.bfloat16, 4.0)
    logits = _logits(4.0 + one_ulp, 4.0)
    assert judge_divergence(logits, 0, 3, 5, torch.bfloat16).kind == NEAR_TIE  # emitted the runner-up
    assert judge_divergence(logits, 0, 5, 3, torch.bfloat16).kind == NEAR_TIE  # the reference took it
    assert judge_divergence(logits, 0, 3, 5, torch.float32).kind == MISMATCH


def test_the_tolerance_is_a_few_ulps_at_the_logits_scale():
    step = ulp(torch.bfloat16, 4.0)
    within = judge_divergence(_logits(4.0 + NEAR_TIE_ULPS * step, 4.0), 0, 3, 5, torch.bfloat16)
    beyond = judge_divergence(_logits(4.0 + (NEAR_TIE_ULPS + 1) * step, 4.0), 0, 3, 5, torch.bfloat16)
    assert within.kind == NEAR_TIE and beyond.kind == MISMATCH
    assert within.divergence.tolerance == NEAR_TIE_ULPS * step
    # The scale is the largest |logit|: a strongly negative logit elsewhere widens the tolerance.
    wide = judge_divergence(_logits(4.0 + 6 * step, 4.0, rest=-20.0), 0, 3, 5, torch.bfloat16)
    assert wide.kind == NEAR_TIE and wide.divergence.tolerance == NEAR_TIE_ULPS * ulp(torch.bfloat16, 20.0)


def test_a_large_gap_or_a_token_outside_the_top_is_a_mismatch():
    assert judge_divergence(_logits(6.0, 4.0), 0, 3, 5, torch.bfloat16).kind == MISMATCH
    # Tokens 3 and 5 tie at the top, but the emitted token 0 is far below them.
    verdict = judge_divergence(_logits(4.0, 4.0), 2, 3, 0, torch.bfloat16)
    assert verdict.kind == MISMATCH
    assert "gap 9" in verdict.divergence.describe()


# --- on models ----------------------------------------------------------------------------------------------


def _engine(arch: str, dtype: torch.dtype) -> Engine:
    model = random_model(arch, 0, dtype)
    # fp32 heads, as `EarlyExitHeads.load` gives the decoding stage whatever the backbone's dtype.
    heads = EarlyExitHeads.from_backbone(model, HEAD_LAYERS, init="unembedding", seed=0).float()
    return Engine(model, heads)


@pytest.fixture(scope="module")
def bf16_engines(one_thread) -> dict[str, Engine]:
    return {arch: _engine(arch, torch.bfloat16) for arch in ARCHS}


def _strategies(engine: Engine, prompts) -> list:
    policies = entropy_policies(engine.model, engine.heads, prompts)
    return [LayerSkip(0, 3), LayerSkip(2, 7), LayerSkip(3, 1), *(DSSD(p, max_draft=16) for p in policies)]


def _verdicts(engine: Engine, prompts, strategies) -> list[str]:
    """Every strategy against the engine's greedy, and greedy and every strategy against `generate`."""
    kinds = []
    for prompt in prompts:
        greedy = engine.generate(prompt, Greedy(), NEW_TOKENS).tokens
        generate = hf_greedy(engine.model, prompt, NEW_TOKENS)
        kinds.append(classify(generate, greedy, prompt, engine).kind)
        for strategy in strategies:
            tokens = engine.generate(prompt, strategy, NEW_TOKENS).tokens
            kinds += [
                classify(greedy, tokens, prompt, engine).kind,
                classify(generate, tokens, prompt, engine).kind,
            ]
    return kinds


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_speculative_decoding_diverges_only_at_near_ties(bf16_engines, arch):
    engine = bf16_engines[arch]
    prompts = random_prompts(4, seed=1)
    kinds = _verdicts(engine, prompts, _strategies(engine, prompts))
    assert MISMATCH not in kinds
    assert kinds.count(EXACT) > len(kinds) // 2  # divergences stay the exception


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_speculative_decoding_is_exact(arch):
    engine = _engine(arch, torch.float32)
    prompts = random_prompts(2, seed=2)
    assert set(_verdicts(engine, prompts, _strategies(engine, prompts))) == {EXACT}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_many_prompts_never_mismatch(bf16_engines, arch):
    engine = bf16_engines[arch]
    prompts = random_prompts(40, seed=3)
    strategies = [
        *(LayerSkip(k, d) for k in range(len(HEAD_LAYERS)) for d in (1, 3, 7)),
        *(DSSD(p, max_draft=16) for p in entropy_policies(engine.model, engine.heads, prompts)),
    ]
    assert MISMATCH not in _verdicts(engine, prompts, strategies)


def test_reference_logits_are_the_models_own_logits():
    engine = _engine("llama", torch.float32)
    prompt, prefix = torch.tensor([17, 40, 3]), [9, 250]
    expected = engine.model(torch.tensor([[17, 40, 3, 9, 250]])).logits[0, -1]
    torch.testing.assert_close(reference_logits(engine, prompt, prefix), expected, atol=1e-5, rtol=1e-5)


def test_a_corrupted_output_is_a_mismatch_and_raises(bf16_engines):
    engine = bf16_engines["llama"]
    prompt = torch.tensor([17, 40])
    greedy = engine.generate(prompt, Greedy(), NEW_TOKENS).tokens
    worst = int(reference_logits(engine, prompt, greedy[:5]).argmin())  # the least likely token at position 5
    corrupted = [*greedy[:5], worst, *greedy[6:]]
    verdict = classify(greedy, corrupted, prompt, engine)
    assert verdict.kind == MISMATCH and verdict.divergence.position == 5
    with pytest.raises(LosslessnessError) as err:
        check_lossless(greedy, corrupted, prompt, engine, "dssd eps=0.8", "greedy", "test", 3)
    message = str(err.value)
    assert "dssd eps=0.8 is not lossless: on test prompt 3" in message and "position 5" in message
    assert f"token {worst}" in message and "gap" in message and "tolerance" in message
    # An output that stops early is a mismatch too, whatever the dtype.
    assert classify(greedy, greedy[:-1], prompt, engine).kind == MISMATCH


def _a_near_tie(engine: Engine) -> tuple[torch.Tensor, list[int], list[int]]:
    """A prompt, greedy's output after it, and that output with its first near-tied token swapped for the
    runner-up (a run that diverged at a near-tie), found among random prompts."""
    for prompt in random_prompts(30, seed=4):
        greedy = engine.generate(prompt, Greedy(), NEW_TOKENS).tokens
        for position in range(len(greedy)):
            logits = reference_logits(engine, prompt, greedy[:position])
            top2 = logits.topk(2).indices.tolist()
            other = top2[1] if top2[0] == greedy[position] else top2[0]
            swapped = [*greedy[:position], other]
            if classify(greedy[: position + 1], swapped, prompt, engine).kind == NEAR_TIE:
                return prompt, greedy[: position + 1], swapped
    raise AssertionError("no near-tie among 30 random prompts of a random bf16 model")


def test_a_near_tie_passes_the_harness_check_and_is_counted_in_the_rows(bf16_engines):
    engine = bf16_engines["qwen2"]
    prompt, reference, tokens = _a_near_tie(engine)
    setting = Setting("dssd", eps=0.8, tokens=[tokens])
    verdict = check_identical(
        reference, tokens, "dssd eps=0.8", "greedy", "test", 0, prompt=prompt, engine=engine, setting=setting
    )
    assert verdict.kind == NEAR_TIE and setting.near_ties == 1
    rows = {r["metric"]: r["value"] for r in setting_rows(setting, 1.0, [reference])}
    assert rows["near_ties"] == 1.0 and rows["identical"] == 0.0
    # Without the model to recompute the logits, any difference still raises.
    with pytest.raises(LosslessnessError, match="position"):
        check_identical(reference, tokens, "dssd eps=0.8", "greedy", "test", 0)


def _block_outputs(adapter, ids: torch.Tensor, first_call_rows: int) -> torch.Tensor:
    """Final-block outputs of `ids`: the first `first_call_rows` rows in one call per block, then one call
    per row (greedy's pattern)."""
    n = ids.numel()
    adapter.rope_table(n)
    cache = JaggedKVCache(
        adapter.num_layers, adapter.n_kv_heads, adapter.head_dim, adapter.d_model, n, adapter.dtype, "cpu"
    )
    hidden = adapter.embed(ids)
    for i in range(adapter.num_layers):
        parts = [adapter.block(i, hidden[:, :first_call_rows], cache, 0)]
        parts += [adapter.block(i, hidden[:, p : p + 1], cache, p) for p in range(first_call_rows, n)]
        hidden = torch.cat(parts, dim=1)
    return hidden


def test_bf16_blocks_are_row_count_invariant_on_cpu(bf16_engines):
    """With attention in fp32, a block's output for a row does not depend on how many rows share its call: a
    verification pass over k rows computes what k one-row greedy steps compute (on this CPU; GPU matmul
    kernels may differ by row count, which the near-tie check then covers)."""
    ids = torch.randint(0, VOCAB, (16,), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        for arch, engine in bf16_engines.items():
            adapter = adapter_for(engine.model)
            assert torch.equal(_block_outputs(adapter, ids, 16), _block_outputs(adapter, ids, 1)), arch
