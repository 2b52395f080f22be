import time

import pytest
import torch
import yaml

from pipeline.exits.heads import EarlyExitHeads, HeadsMismatchError
from pipeline.models.backbone import (
    BackboneError,
    backbone_fingerprint,
    default_head_layers,
    load_backbone,
    num_layers_of,
)

from .conftest import tiny_gpt_neox

CONF = __import__("pathlib").Path(__file__).resolve().parents[1] / "conf" / "model"


def test_pythia_configs_follow_the_head_rule():
    for path in sorted(CONF.glob("pythia-*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        assert cfg["head_layers"] == default_head_layers(cfg["num_layers"]), path.name
        assert cfg["source"] == f"EleutherAI/{cfg['name']}" and cfg["revision"]
    assert default_head_layers(6) == [1, 2, 3, 4]
    assert default_head_layers(32) == [6, 12, 19, 25]


def test_local_pythia70m_shaped_checkpoint_loads_through_the_normal_loader(tmp_path):
    """A GPT-NeoX with Pythia-70m's real config (random weights), saved and loaded like a hub model."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(  # EleutherAI/pythia-70m config.json
        vocab_size=50304,
        hidden_size=512,
        num_hidden_layers=6,
        num_attention_heads=8,
        intermediate_size=2048,
        hidden_act="gelu",
        rotary_pct=0.25,
        rotary_emb_base=10000,
        max_position_embeddings=2048,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        layer_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    GPTNeoXForCausalLM(config).save_pretrained(tmp_path / "pythia-70m-random")
    model, tokenizer = load_backbone(tmp_path / "pythia-70m-random", dtype="bfloat16", with_tokenizer=False)
    assert tokenizer is None and not model.training
    assert num_layers_of(model) == 6 and next(model.parameters()).dtype == torch.bfloat16
    assert all(not p.requires_grad for p in model.parameters())
    fp32, _ = load_backbone(tmp_path / "pythia-70m-random", dtype="float32", with_tokenizer=False)
    # Same checkpoint, different dtype: same fingerprint, so heads are portable across precisions.
    assert backbone_fingerprint(model) == backbone_fingerprint(fp32)


def test_unreachable_hub_model_fails_fast_with_alternatives(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.time()
    with pytest.raises(BackboneError, match="model=tiny"):
        load_backbone("EleutherAI/pythia-70m-not-cached", revision="step143000")
    assert time.time() - started < 10


def test_missing_local_directory_is_a_clear_error(tmp_path):
    with pytest.raises(BackboneError, match="does not exist"):
        load_backbone(str(tmp_path / "nope" / "model"))


def test_heads_round_trip_and_fingerprint_check(tmp_path):
    model = tiny_gpt_neox()
    heads = EarlyExitHeads.from_backbone(model, [1, 2], head_type="mlp", init="random", seed=0)
    hidden = torch.randn(3, 5, 32)
    expected = [heads(i, hidden) for i in range(2)]
    heads.save(tmp_path / "h")
    loaded = EarlyExitHeads.load(tmp_path / "h", model)
    for i in range(2):
        torch.testing.assert_close(loaded(i, hidden), expected[i], rtol=0, atol=0)
    with pytest.raises(HeadsMismatchError, match="fingerprint"):
        EarlyExitHeads.load(tmp_path / "h", tiny_gpt_neox(seed=1))
    with pytest.raises(HeadsMismatchError, match="wrong heads file"):
        EarlyExitHeads.load(tmp_path / "h", tiny_gpt_neox(d_model=64))


def test_logit_lens_at_the_last_block_reproduces_the_model_logits():
    model = tiny_gpt_neox()
    lens = EarlyExitHeads.from_backbone(model, [3], init="unembedding")
    captured = {}
    hook = model.gpt_neox.layers[3].register_forward_hook(
        lambda module, args, output: captured.update(h=output[0] if isinstance(output, tuple) else output)
    )
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        logits = model(ids).logits
    hook.remove()
    with torch.no_grad():
        torch.testing.assert_close(lens(0, captured["h"]), logits, rtol=1e-5, atol=1e-5)
