"""Token streams: make_text_source dispatch, token_blocks layout and budget errors, seq_len checks."""

from __future__ import annotations

import pytest
import torch

from pipeline.data import tokens as data_mod
from pipeline.data.corpus import LocalTextCorpus
from pipeline.data.tokens import (
    DataUnavailableError,
    MiniPileSource,
    TextSource,
    check_seq_len,
    make_text_source,
    max_sequence_length,
    token_blocks,
)
from pipeline.models.tiny_model import train_tokenizer
from tests.conftest import ListSource

DOCS = {
    "train": [f"def f{i}(x):\n    return x * {i}\n" * 3 for i in range(30)],
    "validation": ["print('hello')\n"],
    "test": [],
}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(iter(DOCS["train"]), vocab_size=300, model_max_length=64)


def test_make_text_source_dispatch() -> None:
    local = make_text_source(
        {
            "kind": "local_text",
            "split_fractions": {"train": 0.9, "validation": 0.05, "test": 0.05},
            "split_seed": 3,
        }
    )
    assert isinstance(local, LocalTextCorpus) and local.split_seed == 3
    assert isinstance(local, TextSource)
    mini = make_text_source({"kind": "minipile", "hub_id": "JeanKaddour/minipile"})
    assert isinstance(mini, MiniPileSource) and isinstance(mini, TextSource)
    assert mini.fingerprint != MiniPileSource(revision="abc").fingerprint
    with pytest.raises(ValueError, match="unknown data kind"):
        make_text_source({"kind": "nope"})


def test_token_blocks_is_the_eos_joined_stream(tokenizer) -> None:
    source = ListSource(DOCS)
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for doc in DOCS["train"]:
        stream += tokenizer(doc, add_special_tokens=False)["input_ids"] + [eos]
    blocks = token_blocks(source, tokenizer, "train", n_tokens=100, seq_len=16)
    assert blocks.dtype == torch.long and blocks.shape == (6, 16)  # budget rounded down to whole blocks
    assert blocks.flatten().tolist() == stream[:96]
    assert (blocks == eos).any()
    # Deterministic: same call, same tensor.
    assert torch.equal(blocks, token_blocks(source, tokenizer, "train", n_tokens=100, seq_len=16))


def test_token_blocks_budget_errors(tokenizer) -> None:
    source = ListSource(DOCS)
    with pytest.raises(ValueError) as err:
        token_blocks(source, tokenizer, "validation", n_tokens=1000, seq_len=16)
    message = str(err.value)
    assert "validation split" in message and "1,000" in message and "data.budgets.validation" in message
    assert "holds only" in message
    with pytest.raises(ValueError, match="model.tiny.eval_tokens"):
        token_blocks(source, tokenizer, "test", n_tokens=64, seq_len=16, budget_key="model.tiny.eval_tokens")
    with pytest.raises(ValueError, match="smaller than one block"):
        token_blocks(source, tokenizer, "train", n_tokens=8, seq_len=16)
    # allow_short: every whole block there is, instead of an error.
    short = token_blocks(source, tokenizer, "validation", n_tokens=1000, seq_len=4, allow_short=True)
    n_val = len(tokenizer(DOCS["validation"][0], add_special_tokens=False)["input_ids"]) + 1
    assert short.shape == (n_val // 4, 4)


def test_local_text_blocks_and_split_hint(tokenizer, tmp_path) -> None:
    blocks = token_blocks(LocalTextCorpus(), tokenizer, "validation", n_tokens=2048, seq_len=128)
    assert blocks.shape == (16, 128) and int(blocks.max()) < len(tokenizer)
    for i in range(10):
        (tmp_path / f"m{i}.py").write_text(f"x = {i}\n")
    small = LocalTextCorpus(root=tmp_path)
    with pytest.raises(ValueError, match=r"data.split_fractions.test"):
        token_blocks(small, tokenizer, "test", n_tokens=10**6, seq_len=128)


def test_seq_len_helpers(tokenizer) -> None:
    from transformers import GPTNeoXConfig

    config = GPTNeoXConfig(
        max_position_embeddings=128,
        hidden_size=32,
        num_attention_heads=4,
        num_hidden_layers=1,
        intermediate_size=64,
        vocab_size=300,
    )
    assert max_sequence_length(config) == 128
    assert max_sequence_length(config, tokenizer) == 64  # tokenizer's model_max_length is tighter
    check_seq_len(64, config, tokenizer)
    with pytest.raises(ValueError, match="data.seq_len=129 exceeds"):
        check_seq_len(129, config)


def test_minipile_fails_fast_offline(monkeypatch) -> None:
    import pipeline.models.backbone

    monkeypatch.setattr(pipeline.models.backbone, "hub_reachable", lambda *a, **k: False)
    with pytest.raises(DataUnavailableError, match="data=local_text"):
        next(MiniPileSource().documents("train"))
    with pytest.raises(ValueError, match="unknown split"):
        next(MiniPileSource().documents("dev"))
    assert data_mod.SPLITS == ("train", "validation", "test")
