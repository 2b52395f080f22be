"""Pythia's architectures without their weights: random-weight GPT-NeoX models of the real checkpoints' shapes.

Benchmarks and rehearsals use them to measure speed and memory at Pythia's sizes where the hub is out of reach.
The numbers are the released checkpoints' configs (`EleutherAI/pythia-*`): parallel residual, rotary on 25% of
each attention head, untied unembedding, a 50,304-token vocabulary, 2,048 positions.
"""

from __future__ import annotations

import torch

PYTHIA_VOCAB = 50304
# name: (blocks, d_model, attention heads); the MLP is 4 · d_model wide in every size.
PYTHIA_SHAPES: dict[str, tuple[int, int, int]] = {
    "pythia-70m": (6, 512, 8),
    "pythia-160m": (12, 768, 12),
    "pythia-410m": (24, 1024, 16),
    "pythia-1b": (16, 2048, 8),
    "pythia-1.4b": (24, 2048, 16),
    "pythia-2.8b": (32, 2560, 32),
}


def pythia_config(name: str, vocab_size: int = PYTHIA_VOCAB, **overrides):
    """The `GPTNeoXConfig` of a Pythia checkpoint; `vocab_size` and `overrides` (GPTNeoXConfig arguments) shrink
    it for quick tests while keeping the architecture."""
    from transformers import GPTNeoXConfig

    if name not in PYTHIA_SHAPES:
        raise ValueError(f"unknown Pythia size {name!r}; known: {sorted(PYTHIA_SHAPES)}")
    layers, d_model, n_heads = PYTHIA_SHAPES[name]
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=d_model,
        num_hidden_layers=layers,
        num_attention_heads=n_heads,
        intermediate_size=4 * d_model,
        rotary_pct=0.25,
        max_position_embeddings=2048,
        use_parallel_residual=True,
        tie_word_embeddings=False,
    )
    return GPTNeoXConfig(**{**settings, **overrides})


def random_pythia(name: str, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A GPT-NeoX with the named checkpoint's exact architecture and seeded random weights, in eval mode."""
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(pythia_config(name))
    return model.to(device, dtype).eval().requires_grad_(False)
