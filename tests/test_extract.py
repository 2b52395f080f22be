"""Extraction writes exactly the model's hidden states, in the documented layout."""

import numpy as np
import pytest
import torch

from pipeline.data.shards import ShardCorruptError, ShardReader, ShardWriter
from pipeline.stages.extract import extract_split

from .conftest import tiny_gpt_neox


def test_extracted_states_match_output_hidden_states(tmp_path):
    model = tiny_gpt_neox(num_layers=4, d_model=32)
    layers = [0, 1, 2]
    blocks = torch.randint(0, 128, (5, 16))
    writer = ShardWriter(tmp_path / "train", n_slots=len(layers) + 1, d_model=32, shard_tokens=24)
    n = extract_split(
        model, blocks, layers, writer, batch_size=2, device=torch.device("cpu"), progress=False, desc="t"
    )
    index = writer.close()
    assert n == 80 and index["n_tokens"] == 80 and len(index["shards"]) == 4  # 24+24+24+8
    reader = ShardReader(tmp_path / "train", verify=True)
    assert len(reader) == 80
    with torch.no_grad():
        reference = model(blocks, output_hidden_states=True).hidden_states
    order = np.random.default_rng(0).permutation(80)
    head_hidden, final_hidden, tokens = reader.get(order)
    flat = torch.stack([reference[layer + 1] for layer in layers], dim=2).flatten(0, 1)
    assert head_hidden.dtype == torch.float32 and head_hidden.shape == (80, 3, 32)
    # fp16 storage: relative error ~1e-3
    torch.testing.assert_close(head_hidden, flat[order], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(final_hidden, reference[-1].flatten(0, 1)[order], rtol=2e-3, atol=2e-3)
    assert torch.equal(tokens, blocks.flatten()[order])
    raw = np.load(tmp_path / "train" / "hidden_00000.npy", mmap_mode="r")
    assert raw.dtype == np.float16 and raw.shape == (24, 4, 32)


def test_truncated_shard_is_detected(tmp_path):
    writer = ShardWriter(tmp_path / "s", n_slots=2, d_model=4, shard_tokens=8)
    writer.add(torch.randn(10, 2, 4), torch.arange(10))
    writer.close()
    path = tmp_path / "s" / "hidden_00000.npy"
    path.write_bytes(path.read_bytes()[:-16])
    with pytest.raises(ShardCorruptError, match="force=true"):
        ShardReader(tmp_path / "s", verify=True)


def test_fp16_overflow_is_refused(tmp_path):
    writer = ShardWriter(tmp_path / "s", n_slots=1, d_model=2)
    with pytest.raises(OverflowError, match="bf16"):
        writer.add(torch.full((1, 1, 2), 1e6), torch.zeros(1))


def _tiny_llama(num_layers: int = 4, d_model: int = 32, vocab: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=d_model,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=4 * d_model,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("build", [tiny_gpt_neox, _tiny_llama], ids=["gpt_neox", "llama"])
def test_extraction_skips_the_lm_head_and_stores_identical_states(tmp_path, build):
    """The base model alone (no LM head, whose logits extraction would throw away) yields bit-for-bit the
    states the full causal LM's output_hidden_states gives, batch by batch."""
    model = build()
    layers, batch_size = [0, 2], 2
    blocks = torch.randint(0, 128, (5, 16), generator=torch.Generator().manual_seed(1))
    head_calls = []
    model.get_output_embeddings().register_forward_hook(lambda *args: head_calls.append(1))
    writer = ShardWriter(tmp_path / "s", n_slots=len(layers) + 1, d_model=32, shard_tokens=1000)
    extract_split(model, blocks, layers, writer, batch_size, torch.device("cpu"), progress=False, desc="t")
    writer.close()
    assert head_calls == []
    with torch.no_grad():
        reference = []
        for start in range(0, len(blocks), batch_size):
            states = model(blocks[start : start + batch_size], output_hidden_states=True).hidden_states
            slots = [states[layer + 1] for layer in layers] + [states[-1]]
            reference.append(torch.stack(slots, dim=2).flatten(0, 1))
    expected = torch.cat(reference).numpy().astype(np.float16)
    stored = np.load(tmp_path / "s" / "hidden_00000.npy")
    assert head_calls == [1, 1, 1]  # the reference did run the head
    np.testing.assert_array_equal(stored, expected)
