"""The offline tiny backbone: its config, a byte-level BPE tokenizer and a small Pythia-shaped GPT-NeoX.

This is the model `python -m pipeline` uses when the hub is out of reach (docs/design.md §4). It is built to go
through exactly the Pythia code path: same architecture class (`GPTNeoXForCausalLM`, parallel residual,
partial rotary), saved with `save_pretrained` and read back by `pipeline.models.backbone.load_backbone`.
This module says what the model *is*; `pipeline.models.tiny_pretraining` trains it from scratch on CPU.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # transformers is imported lazily: it is slow to import and only needed when training
    from transformers import GPTNeoXForCausalLM, PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"

# Defaults for every key of `model.tiny` (conf/model/tiny.yaml), so callers and tests can pass a partial
# mapping. `num_layers`, `d_model` and `max_position_embeddings` are interpolated from the model config
# there, keeping one source of truth for the architecture facts other stages read.
DEFAULTS: dict[str, Any] = {
    "vocab_size": 4096,
    "num_layers": 6,
    "d_model": 128,
    "num_attention_heads": 4,
    "intermediate_size": 512,
    "max_position_embeddings": 256,
    "rotary_pct": 0.25,
    "init": "pythia",
    "zero_residual": True,
    "tie_word_embeddings": False,
    "seq_len": 128,
    "train_tokens": 1_700_000,
    "train_pool_tokens": 4_000_000,
    "batch_size": 16,
    "optimizer": "muon",
    "lr": 6.0e-3,
    "embedding_lr_scale": 30.0,
    "embedding_weight_decay": 0.0,
    "schedule": "wsd",
    "cooldown_fraction": 0.5,
    "min_lr_ratio": 0.0,
    "warmup_steps": 50,
    "weight_decay": 0.1,
    "betas": [0.9, 0.95],
    "grad_clip": 1.0,
    "eval_tokens": 100_000,
    "lens_eval_tokens": 16_384,
    "eval_batch_size": 64,
    "tokenizer_min_frequency": 2,
    "tokenizer_max_bytes": 64_000_000,
    "precision": "fp32",
    "num_threads": 2,
    "seed": 0,
}


def resolve_tiny_config(tiny_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """`tiny_cfg` over the defaults, rejecting unknown keys (a typo would otherwise be silently ignored).

    Accepts an OmegaConf node (`cfg.model.tiny`, whose interpolations resolve against the model config)
    and returns plain Python values.
    """
    from omegaconf import DictConfig, OmegaConf

    if isinstance(tiny_cfg, DictConfig):
        tiny_cfg = OmegaConf.to_container(tiny_cfg, resolve=True)
    unknown = set(tiny_cfg) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown model.tiny key(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    cfg = {**DEFAULTS, **dict(tiny_cfg)}
    if cfg["d_model"] % cfg["num_attention_heads"]:
        raise ValueError(
            f"d_model={cfg['d_model']} is not divisible by num_attention_heads={cfg['num_attention_heads']}"
        )
    if cfg["optimizer"] not in ("adamw", "muon"):
        raise ValueError(f"model.tiny.optimizer must be 'adamw' or 'muon', got {cfg['optimizer']!r}")
    if cfg["schedule"] not in ("cosine", "wsd"):
        raise ValueError(f"model.tiny.schedule must be 'cosine' or 'wsd', got {cfg['schedule']!r}")
    if not 0.0 < float(cfg["cooldown_fraction"]) <= 1.0:
        raise ValueError(f"model.tiny.cooldown_fraction must be in (0, 1], got {cfg['cooldown_fraction']}")
    if cfg["precision"] not in ("fp32", "bf16-mixed"):
        raise ValueError(f"model.tiny.precision must be 'fp32' or 'bf16-mixed', got {cfg['precision']!r}")
    if cfg["seq_len"] > cfg["max_position_embeddings"]:
        raise ValueError(
            f"model.tiny.seq_len={cfg['seq_len']} exceeds max_position_embeddings="
            f"{cfg['max_position_embeddings']}"
        )
    return cfg


# --- tokenizer -----------------------------------------------------------------------------------------------


def train_tokenizer(
    texts: Iterator[str], vocab_size: int, min_frequency: int = 2, model_max_length: int = 2048
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2/Pythia style) trained on `texts`, as a `PreTrainedTokenizerFast`.

    Byte-level means no unknown tokens ever, so `<|endoftext|>` can double as bos/eos/pad/unk exactly as in
    Pythia's tokenizer. No prefix space is added: code is not prose, and Pythia's tokenizer adds none.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        # All 256 byte symbols up front, so any text round-trips even if some byte never occurs in training.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=model_max_length,
    )


# --- model -----------------------------------------------------------------------------------------------------


def build_model(cfg: Mapping[str, Any], vocab_size: int, eos_token_id: int) -> GPTNeoXForCausalLM:
    """A randomly initialised GPT-NeoX shaped like Pythia (parallel residual, partial rotary, untied head)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=int(cfg["d_model"]),
        num_hidden_layers=int(cfg["num_layers"]),
        num_attention_heads=int(cfg["num_attention_heads"]),
        intermediate_size=int(cfg["intermediate_size"]),
        max_position_embeddings=int(cfg["max_position_embeddings"]),
        rotary_pct=float(cfg["rotary_pct"]),
        use_parallel_residual=True,
        tie_word_embeddings=bool(cfg["tie_word_embeddings"]),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )
    model = GPTNeoXForCausalLM._from_config(config, attn_implementation="sdpa")
    init = cfg["init"]
    if init == "pythia":
        _pythia_init(model)
    elif not (isinstance(init, int | float) and not isinstance(init, bool)):
        raise ValueError(f"model.tiny.init must be 'pythia' or a float std, got {init!r}")
    else:
        _normal_init(model, float(init), float(init))
    if cfg["zero_residual"]:
        _zero_residual_writers(model)
    return model


def _normal_init(model: torch.nn.Module, std: float, out_std: float) -> None:
    """Normal(0, std) for embeddings and projections, `out_std` for the projections that write into the
    residual stream (attention output, MLP down-projection); zero biases; LayerNorms untouched (1, 0)."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear | torch.nn.Embedding):
                writes_residual = name.endswith(("attention.dense", "mlp.dense_4h_to_h"))
                module.weight.normal_(0.0, out_std if writes_residual else std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()


def _zero_residual_writers(model: torch.nn.Module) -> None:
    """Zero the projections that write into the residual stream (attention output, MLP down-projection), so
    every block starts as the identity (as in modded-nanogpt's speed runs). Their gradients are not zero (they
    depend on the block's input), so they learn from the first step; in 1M-token trials this, with the
    embedding's larger learning rate and the wsd schedule, took held-out perplexity from 55.6 to 50.6 (49.7
    with the embedding's lr at 30x)."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("attention.dense", "mlp.dense_4h_to_h")):
                module.weight.zero_()


def _pythia_init(model: torch.nn.Module) -> None:
    """GPT-NeoX/Pythia's init: "small init" sqrt(2 / (5 d)) everywhere, "wang init" 2 / (L sqrt(d)) for the
    residual-writing projections. transformers initialises everything at 0.02 instead, too small for
    d=128 (1/sqrt(d) = 0.09): in 600k-token trials 0.02 gave held-out perplexity 94.6, this init 80.8."""
    d, n_layers = model.config.hidden_size, model.config.num_hidden_layers
    _normal_init(model, std=math.sqrt(2.0 / (5.0 * d)), out_std=2.0 / (n_layers * math.sqrt(d)))
