"""HiddenStatesDataModule and HeadsModule on a tiny random GPT-NeoX and its extracted hidden states."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_modules import HeadsModule, HiddenStatesDataModule, held_out_range, kl_full_to_head
from lightning_modules.heads_module import NonFiniteLossError, lr_lambda
from lightning_modules.hidden_states import RandomTokenBatches
from pipeline.data.shards import ShardReader, ShardWriter
from pipeline.exits.heads import EarlyExitHeads

HEAD_LAYERS = [1, 2]


def tiny_backbone(seed: int = 0, vocab: int = 128, d_model: int = 32, layers: int = 4):
    """A random GPT-NeoX, frozen. The unembedding is scaled up so the teacher's distribution is peaked
    (at the default init std 0.02 it is nearly uniform and every KL is ~0, which tests nothing)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=d_model,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * d_model,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = GPTNeoXForCausalLM(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(std=0.5)
    return model.requires_grad_(False)


def write_extract(
    model,
    directory: Path,
    n_seqs: int = 64,
    seq_len: int = 64,
    layers=HEAD_LAYERS,
    shard_tokens: int = 1500,
    seed: int = 0,
) -> Path:
    """Shards as the extract stage writes them: slot h = hidden_states[layer + 1] (pre-norm residual after
    block `layer`), last slot = hidden_states[-1] (post final norm in transformers 5)."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    d = model.config.hidden_size
    writer = ShardWriter(directory, n_slots=len(layers) + 1, d_model=d, shard_tokens=shard_tokens)
    with torch.no_grad():
        for start in range(0, n_seqs, 16):
            ids = torch.randint(0, vocab, (min(16, n_seqs - start), seq_len), generator=gen)
            out = model(input_ids=ids, output_hidden_states=True)
            hs = out.hidden_states
            stacked = torch.stack([hs[layer + 1] for layer in layers] + [hs[-1]], dim=2)  # [b, t, slots, d]
            writer.add(stacked.reshape(-1, len(layers) + 1, d), ids.reshape(-1))
    writer.close()
    return directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = tiny_backbone()
    directory = write_extract(model, tmp_path_factory.mktemp("extract") / "train")
    return model, directory


# --- DataModule ---------------------------------------------------------------------------------------------


def test_batches_shapes_dtypes_and_disjoint_split(tiny):
    model, directory = tiny
    data = HiddenStatesDataModule(directory, batch_tokens=256, val_tokens=512, seed=3)
    assert (data.n_heads, data.d_model) == (2, 32)
    assert data.val_range == (4096 - 512, 4096) and data.n_train == 4096 - 512
    head_hidden, final_hidden = next(iter(data.train_dataloader()))
    assert head_hidden.shape == (256, 2, 32) and final_hidden.shape == (256, 32)
    assert head_hidden.dtype == final_hidden.dtype == torch.float32
    val = list(data.val_dataloader())
    assert sum(b[0].shape[0] for b in val) == 512

    # Every training index of a whole epoch stays below the validation slice, without repeats.
    stream = data.train_dataset()
    epoch = np.concatenate([stream.batch_indices(k) for k in range(stream.batches_per_epoch)])
    assert epoch.max() < data.val_range[0]
    assert len(np.unique(epoch)) == len(epoch) == stream.batches_per_epoch * 256


def test_batches_come_from_all_shards_and_match_the_reader(tiny):
    _, directory = tiny
    data = HiddenStatesDataModule(directory, batch_tokens=512, val_tokens=512, seed=0)
    stream = data.train_dataset()
    idx = stream.batch_indices(0)
    reader = ShardReader(directory)
    assert len(np.unique(np.searchsorted(reader.offsets, idx, side="right") - 1)) > 1
    head_hidden, final_hidden = next(iter(stream))
    ref_head, ref_final, _ = reader.get(idx)
    assert torch.equal(head_hidden, ref_head) and torch.equal(final_hidden, ref_final)


def test_stream_is_deterministic_and_seed_dependent(tiny):
    _, directory = tiny

    def first(seed: int, n: int = 3) -> list[torch.Tensor]:
        data = HiddenStatesDataModule(directory, batch_tokens=128, val_tokens=512, seed=seed)
        it = iter(data.train_dataloader())
        return [next(it)[1] for _ in range(n)]

    a, b, c = first(7), first(7), first(8)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


def test_workers_give_distinct_streams_and_the_same_stream_as_one_process(tiny):
    _, directory = tiny
    data = HiddenStatesDataModule(directory, batch_tokens=128, val_tokens=512, seed=1, num_workers=2)
    it = iter(data.train_dataloader())
    with_workers = [next(it)[1] for _ in range(6)]
    del it
    single = iter(
        HiddenStatesDataModule(directory, batch_tokens=128, val_tokens=512, seed=1).train_dataloader()
    )
    in_process = [next(single)[1] for _ in range(6)]
    # No two batches repeat (each worker its own slice of the stream) ...
    keys = {x.numpy().tobytes() for x in with_workers}
    assert len(keys) == 6
    # ... and the interleaved result is the very stream a single process produces.
    assert all(torch.equal(x, y) for x, y in zip(with_workers, in_process, strict=True))


def test_ranks_read_disjoint_tokens_and_resume_continues_the_stream(tiny):
    _, directory = tiny
    ranks = [RandomTokenBatches(directory, 3584, 128, seed=0, rank=r, world_size=2) for r in range(2)]
    n = ranks[0].batches_per_epoch
    per_rank = [np.concatenate([s.batch_indices(k) for k in range(n)]) for s in ranks]
    assert not set(per_rank[0]) & set(per_rank[1])
    resumed = RandomTokenBatches(directory, 3584, 128, seed=0, start_batch=5)
    fresh = RandomTokenBatches(directory, 3584, 128, seed=0)
    assert np.array_equal(next(iter(resumed))[1], fresh.reader.get(fresh.batch_indices(5))[1])


def test_data_pickles_without_the_memory_maps(tiny):
    # DataLoader workers and spawned DDP processes receive pickled copies: paths, not shard contents.
    _, directory = tiny
    stream = RandomTokenBatches(directory, 3584, 128)
    next(iter(stream))  # opens the reader
    assert len(pickle.dumps(stream)) < 10_000
    data = HiddenStatesDataModule(directory, 128, 512)
    list(data.val_dataloader())
    assert len(pickle.dumps(data)) < 10_000


def test_held_out_range_rejects_empty_training():
    assert held_out_range(100, 10) == (90, 100)
    with pytest.raises(ValueError, match="no training tokens"):
        held_out_range(100, 100)


# --- Module -------------------------------------------------------------------------------------------------


def test_kl_matches_manual_formula_and_is_fp32_under_bf16():
    torch.manual_seed(0)
    teacher, head = torch.randn(5, 50) * 3, torch.randn(5, 50) * 3
    p = teacher.softmax(-1)
    manual = (p * (p.log() - head.log_softmax(-1))).sum(-1)
    torch.testing.assert_close(kl_full_to_head(teacher, head), manual, rtol=1e-5, atol=1e-6)
    reference = F.kl_div(head.log_softmax(-1), p, reduction="none").sum(-1)
    torch.testing.assert_close(kl_full_to_head(teacher, head), reference, rtol=1e-5, atol=1e-6)
    assert kl_full_to_head(teacher.bfloat16(), head.bfloat16()).dtype == torch.float32
    assert torch.allclose(kl_full_to_head(teacher, teacher), torch.zeros(5), atol=1e-6)


def _module(model, **kw) -> HeadsModule:
    heads = EarlyExitHeads.from_backbone(model, HEAD_LAYERS, "linear", "random", seed=0)
    unembed = model.get_output_embeddings()
    return HeadsModule(heads, unembed.weight, unembed.bias, **kw)


def test_module_loss_is_mean_of_per_head_reference_kl(tiny):
    model, directory = tiny
    module = _module(model)
    head_hidden, final_hidden = next(iter(HiddenStatesDataModule(directory, 64, 512).train_dataloader()))
    kls, agrees = module.per_head_kl(head_hidden, final_hidden)
    teacher = model.get_output_embeddings()(final_hidden)
    for i in range(2):
        logits = module.heads(i, head_hidden[:, i])
        ref = F.kl_div(
            logits.log_softmax(-1), teacher.log_softmax(-1), reduction="batchmean", log_target=True
        )
        torch.testing.assert_close(kls[i], ref, rtol=1e-5, atol=1e-6)
        assert agrees[i] == (logits.argmax(-1) == teacher.argmax(-1)).float().mean()
    # The teacher is a frozen, non-persistent buffer: not a parameter, not in checkpoints or the heads file.
    assert "unembedding" not in dict(module.named_parameters())
    assert not any("unembedding" in k for k in module.state_dict())
    assert all(p.requires_grad for p in module.parameters())


def test_hparams_are_plain_values(tiny):
    module = _module(tiny[0], lr=3e-4, max_steps=10)
    allowed = (int, float, str, bool, type(None), list, tuple, dict)

    def plain(v) -> bool:
        if isinstance(v, dict):
            return all(plain(x) for x in v.values())
        if isinstance(v, list | tuple):
            return all(plain(x) for x in v)
        return isinstance(v, allowed)

    assert plain(dict(module.hparams)) and module.hparams.lr == 3e-4
    assert module.hparams.heads_spec["layers"] == HEAD_LAYERS


def test_nonfinite_loss_raises_clear_error(tiny):
    module = _module(tiny[0])
    with pytest.raises(NonFiniteLossError, match="last good checkpoint"):
        module._stop_if_not_finite(torch.tensor(float("nan")))


def test_schedule_warms_up_then_decays():
    values = [lr_lambda(s, warmup_steps=10, max_steps=100, min_lr_ratio=0.1) for s in range(101)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[9:], values[10:], strict=False))
    assert values[100] == pytest.approx(0.1)


def test_val_dataloader_is_fixed(tiny):
    _, directory = tiny
    data = HiddenStatesDataModule(directory, 64, 512, val_batch_tokens=200)
    first = [b[1] for b in data.val_dataloader()]
    again = [b[1] for b in DataLoader(data.val_dataset(), batch_size=None)]
    assert [len(b) for b in first] == [200, 200, 112]
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
