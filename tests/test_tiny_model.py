"""The offline tiny backbone: tokenizer round trip, a very small pretrain, save/load through load_backbone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.models.backbone import load_backbone
from pipeline.models.tiny_model import DEFAULTS, EOS_TOKEN, build_model, resolve_tiny_config, train_tokenizer
from pipeline.models.tiny_pretraining import (
    Muon,
    _optimizers,
    evaluate_lm,
    lr_factor,
    orthogonalize,
    pretrain_tiny_model,
)
from tests.conftest import ListSource


def _docs(n: int, offset: int = 0) -> list[str]:
    return [
        f'def function_{i}(value, other=None):\n    """Return value plus {i}."""\n'
        f"    if other is None:\n        return value + {i}\n    return value + other\n\n"
        for i in range(offset, offset + n)
    ]


SOURCE = ListSource(
    fingerprint="list-source",
    docs={"train": _docs(300), "validation": _docs(40, offset=1000), "test": _docs(10, 2000)},
)

SMALL = {
    "vocab_size": 300,
    "num_layers": 2,
    "d_model": 32,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "seq_len": 32,
    "train_tokens": 16384,  # more than the train split holds: exercises the second pass
    "batch_size": 8,
    "lr": 1e-2,
    "warmup_steps": 5,
    "eval_tokens": 1024,
    "seed": 0,
    "precision": "fp32",
    # One thread: with tiny matrices OpenMP sync dominates, and on a busy machine two spinning threads
    # made this test 30x slower.
    "num_threads": 1,
}


def test_tokenizer_round_trip_and_special_tokens() -> None:
    tok = train_tokenizer(iter(SOURCE.docs["train"]), vocab_size=300)
    assert len(tok) <= 300
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(tok, name) == EOS_TOKEN
    # Byte-level: any text round-trips, even characters never seen in training.
    text = "def f(x):\n\treturn x ** 2  # café ∑ 🐍\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.convert_tokens_to_ids(EOS_TOKEN) == tok.eos_token_id
    # Same corpus, same vocabulary (tokenizer training is deterministic).
    again = train_tokenizer(iter(SOURCE.docs["train"]), vocab_size=300)
    assert again.get_vocab() == tok.get_vocab()


def test_yaml_config_matches_code_defaults() -> None:
    from omegaconf import OmegaConf

    model_cfg = OmegaConf.load(Path(__file__).parents[1] / "conf" / "model" / "tiny.yaml")
    resolved = resolve_tiny_config(model_cfg.tiny)
    assert resolved["num_layers"] == model_cfg.num_layers and resolved["d_model"] == model_cfg.d_model
    assert resolved["max_position_embeddings"] == model_cfg.max_seq_len
    assert isinstance(resolved["betas"], list)  # plain values, not OmegaConf nodes
    # The yaml spells out every key, with the code's defaults (one place to read the real settings).
    assert set(model_cfg.tiny) == set(DEFAULTS) and resolved == DEFAULTS


def test_config_validation() -> None:
    assert resolve_tiny_config({})["num_layers"] == 6
    with pytest.raises(ValueError, match="unknown model.tiny key"):
        resolve_tiny_config({"num_layer": 3})
    with pytest.raises(ValueError, match="not divisible"):
        resolve_tiny_config({"d_model": 30, "num_attention_heads": 4})
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        resolve_tiny_config({"seq_len": 512, "max_position_embeddings": 256})
    with pytest.raises(ValueError, match="model.tiny.precision"):
        resolve_tiny_config({"precision": "fp16"})
    with pytest.raises(ValueError, match="model.tiny.schedule"):
        resolve_tiny_config({"schedule": "linear"})
    with pytest.raises(ValueError, match="model.tiny.cooldown_fraction"):
        resolve_tiny_config({"cooldown_fraction": 0.0})
    with pytest.raises(ValueError, match="model.tiny.init"):
        build_model(resolve_tiny_config({**SMALL, "init": "xavier"}), vocab_size=300, eos_token_id=0)


def test_pythia_init_scales() -> None:
    model = build_model(
        resolve_tiny_config({**SMALL, "zero_residual": False}), vocab_size=300, eos_token_id=0
    )
    layer = model.gpt_neox.layers[0]
    # small init sqrt(2/(5d)) = 0.112 for d=32; wang init 2/(L sqrt(d)) = 0.177 for L=2 (loose: few samples).
    assert layer.mlp.dense_h_to_4h.weight.std().item() == pytest.approx(0.112, rel=0.15)
    assert layer.mlp.dense_4h_to_h.weight.std().item() == pytest.approx(0.177, rel=0.15)
    assert layer.attention.query_key_value.bias.detach().abs().max().item() == 0.0


def test_zero_residual_starts_every_block_as_the_identity() -> None:
    model = build_model(resolve_tiny_config({**SMALL, "zero_residual": True}), vocab_size=300, eos_token_id=0)
    for layer in model.gpt_neox.layers:
        assert layer.attention.dense.weight.abs().max().item() == 0.0
        assert layer.mlp.dense_4h_to_h.weight.abs().max().item() == 0.0
        assert layer.mlp.dense_h_to_4h.weight.std().item() == pytest.approx(0.112, rel=0.15)  # untouched
    # Zero weights still get gradients: the blocks learn from the first step.
    blocks = torch.randint(0, 300, (2, 16))
    model(input_ids=blocks, labels=blocks).loss.backward()
    assert model.gpt_neox.layers[0].mlp.dense_4h_to_h.weight.grad.abs().max().item() > 0


def test_lr_schedule_shape() -> None:
    factors = [lr_factor(s, 100, 10, 0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)
    # wsd: warmup, flat until the last 40% of the steps, then a straight line down towards min_ratio.
    wsd = [lr_factor(s, 100, 10, 0.0, "wsd", 0.4) for s in range(100)]
    assert wsd[:10] == [pytest.approx((s + 1) / 10) for s in range(10)]
    assert wsd[10:61] == [1.0] * 51
    steps_down = [a - b for a, b in zip(wsd[60:], wsd[61:], strict=False)]
    assert steps_down == [pytest.approx(1 / 40)] * 39 and wsd[-1] == pytest.approx(1 / 40)


def test_embedding_takes_its_own_learning_rate() -> None:
    cfg = resolve_tiny_config(
        {**SMALL, "embedding_lr_scale": 10.0, "embedding_weight_decay": 0.0, "lr": 1e-3}
    )
    model = build_model(cfg, vocab_size=300, eos_token_id=0)
    for optimizer_name in ("muon", "adamw"):
        adamw = _optimizers(model, {**cfg, "optimizer": optimizer_name})[0]
        lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in adamw.param_groups for p in g["params"]}
        assert lr_of[id(model.gpt_neox.embed_in.weight)] == (pytest.approx(1e-2), 0.0)
        assert lr_of[id(model.get_output_embeddings().weight)] == (pytest.approx(1e-3), cfg["weight_decay"])


def test_muon_orthogonalises_a_stack_like_each_matrix_alone() -> None:
    torch.manual_seed(0)
    for shape in ((3, 16, 48), (3, 48, 16)):
        stack = torch.randn(shape)
        alone = torch.stack([orthogonalize(matrix) for matrix in stack])
        assert torch.allclose(orthogonalize(stack), alone, atol=1e-6)


@pytest.mark.parametrize("shape", [(24, 96), (96, 24), (32, 32)])
def test_orthogonalize_flattens_the_spectrum_and_keeps_the_directions(shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    # Singular values spread over 2.5 orders of magnitude.
    u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0]))
    v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1]))
    k = min(shape)
    matrix = u[:, :k] @ torch.diag(torch.logspace(-1.5, 1, k)) @ v[:, :k].T
    result = orthogonalize(matrix)
    singular = torch.linalg.svdvals(result)
    assert singular.min() > 0.6 and singular.max() < 1.25
    # Same singular vectors: u^T result v is (nearly) diagonal and positive.
    inner = u[:, :k].T @ result @ v[:, :k]
    assert (inner - torch.diag(torch.diagonal(inner))).abs().max() < 1e-4 and torch.diagonal(inner).min() > 0


def test_muon_update_has_adamw_like_rms_and_decays_weights() -> None:
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 256))
    before = weight.detach().clone()
    weight.grad = torch.randn(64, 256)
    Muon([weight], lr=1e-2, weight_decay=0.0).step()
    rms = (weight.detach() - before).pow(2).mean().sqrt().item()
    assert 0.1 * 1e-2 < rms < 0.3 * 1e-2  # ~0.2 x lr, the RMS of a typical AdamW update
    # A zero gradient on a fresh optimizer leaves only the decoupled decay, x (1 - lr * wd).
    decayed = torch.nn.Parameter(before.clone())
    decayed.grad = torch.zeros_like(before)
    Muon([decayed], lr=1e-2, weight_decay=0.5).step()
    assert torch.allclose(decayed.detach(), before * (1 - 1e-2 * 0.5))
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(3))], lr=1e-2)


def test_muon_takes_the_block_matrices_and_adamw_the_rest() -> None:
    model = build_model(resolve_tiny_config(SMALL), vocab_size=300, eos_token_id=0)
    adamw, muon = _optimizers(model, resolve_tiny_config({**SMALL, "optimizer": "muon"}))
    block_matrices = {id(p) for p in model.gpt_neox.layers.parameters() if p.dim() == 2}
    assert {id(p) for group in muon.param_groups for p in group["params"]} == block_matrices
    rest = {id(p) for group in adamw.param_groups for p in group["params"]}
    assert rest == {id(p) for p in model.parameters()} - block_matrices
    assert id(model.gpt_neox.embed_in.weight) in rest and id(model.get_output_embeddings().weight) in rest
    (only,) = _optimizers(model, resolve_tiny_config({**SMALL, "optimizer": "adamw"}))
    assert isinstance(only, torch.optim.AdamW)
    with pytest.raises(ValueError, match="model.tiny.optimizer"):
        resolve_tiny_config({"optimizer": "sgd"})


def test_logit_lens_on_a_prefix_leaves_perplexity_alone() -> None:
    torch.manual_seed(0)
    # Not zero_residual: untrained blocks that start as the identity would make every lens agree with the end.
    model = build_model(
        resolve_tiny_config({**SMALL, "zero_residual": False}), vocab_size=300, eos_token_id=0
    )
    blocks = torch.randint(0, 300, (10, 32))
    everything = evaluate_lm(model, blocks, batch_size=4)
    prefix = evaluate_lm(model, blocks, batch_size=4, lens_tokens=3 * 32 + 5)  # whole blocks: the first 3
    # Perplexity still covers every block; the lens is exactly the lens of the first 3 blocks alone.
    assert prefix["val_loss"] == pytest.approx(everything["val_loss"], rel=1e-6)
    assert prefix["eval_tokens"] == everything["eval_tokens"] == 320
    first_three = evaluate_lm(model, blocks[:3], batch_size=4)
    assert prefix["logit_lens_agreement"] == first_three["logit_lens_agreement"]
    assert prefix["logit_lens_agreement"] != everything["logit_lens_agreement"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tiny")
    metrics = pretrain_tiny_model(SMALL, SOURCE, out, progress=False)
    return out, metrics


def test_pretrain_learns_and_reports(pretrained: tuple[Path, dict]) -> None:
    _, metrics = pretrained
    assert metrics["final_train_loss"] < metrics["initial_train_loss"] - 1.0
    assert metrics["val_ppl"] < metrics["vocab_size"] / 4  # far better than uniform guessing
    assert metrics["train_tokens"] == 16384 and metrics["train_steps"] == 16384 // (8 * 32)
    assert metrics["train_epochs"] > 1.0 and metrics["n_layers"] == 2
    # The pool is the whole train split (smaller than the default train_pool_tokens): whole blocks of it.
    assert metrics["train_pool_tokens"] % 32 == 0
    assert metrics["train_epochs"] == pytest.approx(16384 / metrics["train_pool_tokens"], rel=0.02)
    assert set(metrics["logit_lens_agreement"]) == {0}
    assert 0.0 <= metrics["logit_lens_agreement"][0] == metrics["lens_agreement_block0"] <= 1.0
    assert metrics["corpus_fingerprint"] == "list-source"


def test_saved_model_round_trips_through_load_backbone(pretrained: tuple[Path, dict]) -> None:
    out, metrics = pretrained
    model, tok = load_backbone(out)
    assert type(model).__name__ == "GPTNeoXForCausalLM"
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 32
    assert model.config.use_parallel_residual
    assert model.config.rope_parameters["partial_rotary_factor"] == 0.25  # transformers 5 name of rotary_pct
    assert len(tok) == metrics["vocab_size"] == model.config.vocab_size
    assert tok.eos_token_id == model.config.eos_token_id
    assert (out / "pretraining.json").is_file()

    # Same weights as a fresh from_pretrained load, and logits that depend on the text.
    text = SOURCE.docs["validation"][0]
    ids = tok(text, return_tensors="pt")["input_ids"][:, :32]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    reloaded, _ = load_backbone(out, with_tokenizer=False)
    with torch.no_grad():
        assert torch.equal(logits, reloaded(input_ids=ids).logits)
    assert tok.decode(ids[0]) == text[: len(tok.decode(ids[0]))]


def test_pretrain_is_deterministic(pretrained: tuple[Path, dict], tmp_path: Path) -> None:
    out, metrics = pretrained
    # bf16-mixed here, so the autocast path is covered too (and is deterministic as well).
    quick = {**SMALL, "train_tokens": 2048, "eval_tokens": 256, "precision": "bf16-mixed"}
    a = pretrain_tiny_model(quick, SOURCE, tmp_path / "a", progress=False)
    b = pretrain_tiny_model(quick, SOURCE, tmp_path / "b", progress=False)
    assert a["val_loss"] == b["val_loss"] and a["final_train_loss"] == b["final_train_loss"]
    from safetensors.torch import load_file

    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
