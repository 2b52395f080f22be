"""`Engine.generate(..., eos_token_id=...)` takes an int or a list of ints, as generation configs hold either;
generation stops right after the first token that is any of them, exactly like `model.generate`."""

import pytest
import torch

from pipeline.engine import DSSD, Engine, Greedy, LayerSkip
from pipeline.exits.heads import EarlyExitHeads
from pipeline.exits.policy import ExitPolicy

from .conftest import tiny_gpt_neox

HEAD_LAYERS = [0, 1, 2]
NEW_TOKENS = 16


def _hf_greedy(model, prompt: torch.Tensor, eos: int | list[int] | None) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            prompt.view(1, -1),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            eos_token_id=eos,
            pad_token_id=0,
            attention_mask=torch.ones(1, prompt.numel(), dtype=torch.long),
        )
    return out[0, prompt.numel() :].tolist()


@pytest.fixture(scope="module")
def engine_and_model(one_thread):
    model = tiny_gpt_neox(num_layers=4, d_model=64, vocab=256).requires_grad_(False)
    model.generation_config.eos_token_id = None
    heads = EarlyExitHeads.from_backbone(model, HEAD_LAYERS, init="unembedding", seed=0)
    return Engine(model, heads), model


def _strategies():
    # Permissive thresholds (every head exits whenever its entropy is below 10 nats): many drafts, so DSSD
    # drafts past the stop token unless it recognises it.
    policy = ExitPolicy(HEAD_LAYERS, [10.0, 10.0, 10.0], "entropy")
    return [Greedy(), DSSD(policy, max_draft=6), LayerSkip(1, 4)]


def test_a_list_of_eos_ids_stops_at_the_first_of_them(engine_and_model):
    engine, model = engine_and_model
    gen = torch.Generator().manual_seed(3)
    checked = 0
    for _ in range(8):
        prompt = torch.randint(0, 256, (int(torch.randint(2, 9, (1,), generator=gen)),), generator=gen)
        free = _hf_greedy(model, prompt, None)
        later, earlier = free[-2], free[len(free) // 3]
        if later in free[: len(free) // 3 + 1]:
            continue  # `later` must not occur before `earlier`, or the case is not the one tested
        eos = [later, earlier]  # the list's first entry is not the one that stops generation
        ref = _hf_greedy(model, prompt, eos)
        assert ref == free[: free.index(earlier) + 1]
        for strategy in _strategies():
            result = engine.generate(prompt, strategy, NEW_TOKENS, eos_token_id=eos)
            assert result.tokens == ref, strategy.describe()
            result.stats.check()
            # An int still works and means the same as a one-element list.
            single = engine.generate(prompt, strategy, NEW_TOKENS, eos_token_id=earlier)
            assert single.tokens == ref, strategy.describe()
        checked += 1
    assert checked >= 4
