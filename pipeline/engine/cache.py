"""The jagged KV cache: per-layer prefixes of positions, preallocated, with lazy fill (docs/design.md §9).

Layer i holds K/V for positions [0, lengths[i]). Lengths never increase with depth: a token that exited at
block k left blocks > k without its K/V. `hidden[p]` is position p's *frontier* hidden state: the output of
the deepest block it has run. When a token must run block i, every position in [lengths[i], p) has run
exactly blocks 0..i-1 (each block on the way was filled first), so their frontier states are block i's
inputs: block i runs on the contiguous rows hidden[lengths[i] : p + 1] in one causal multi-row forward, and
all hidden states stay exactly the full model's.

Buffers are allocated once with a capacity and reused across generations; nothing is reallocated per step.
"""

from __future__ import annotations

import torch


class JaggedKVCache:
    def __init__(
        self,
        num_layers: int,
        n_kv_heads: int,
        head_dim: int,
        d_model: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.num_layers = num_layers
        self._shape = (n_kv_heads, head_dim, d_model)
        self.dtype, self.device = dtype, device
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.hidden = torch.empty(0)
        self.lengths = [0] * num_layers
        self.reserve(capacity)

    def reserve(self, capacity: int) -> None:
        """Grow the buffers to hold at least `capacity` positions, keeping their contents."""
        if capacity <= self.capacity:
            return
        n_kv_heads, head_dim, d_model = self._shape
        kw = {"dtype": self.dtype, "device": self.device}
        old_keys, old_values, old_hidden, old = self.keys, self.values, self.hidden, self.capacity
        self.keys = [torch.empty(1, n_kv_heads, capacity, head_dim, **kw) for _ in range(self.num_layers)]
        self.values = [torch.empty(1, n_kv_heads, capacity, head_dim, **kw) for _ in range(self.num_layers)]
        self.hidden = torch.empty(1, capacity, d_model, **kw)
        if old:
            for new, prev in zip(self.keys + self.values, old_keys + old_values, strict=True):
                new[:, :, :old] = prev
            self.hidden[:, :old] = old_hidden
        self.capacity = capacity

    def reset(self) -> None:
        self.lengths = [0] * self.num_layers

    def crop(self, length: int) -> None:
        """Forget every position >= `length` in every layer (rejected drafts)."""
        self.lengths = [min(n, length) for n in self.lengths]

    def depth(self, position: int) -> int:
        """How many blocks position `position` has run (its K/V exist in layers [0, depth))."""
        return sum(1 for n in self.lengths if n > position)

    def check(self) -> None:
        """Assert the invariant the lazy fill relies on: lengths non-increasing with depth."""
        for shallow, deep in zip(self.lengths, self.lengths[1:], strict=False):
            if deep > shallow:
                raise AssertionError(f"jagged cache lengths must not increase with depth: {self.lengths}")
