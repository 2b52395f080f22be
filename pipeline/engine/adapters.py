"""Backbone adapters: run a Hugging Face decoder one block at a time on our own KV buffers.

An adapter knows one architecture's block layout. It computes attention itself (scaled-dot-product attention
on preallocated per-layer K/V buffers) and applies the model's own weights and modules through the same
operations in the same order as the Hugging Face forward, so the numbers are the same, without its per-call
Cache and mask machinery, which costs more than a small block's compute on CPU.

Adding an architecture = one subclass implementing `_qkv(index, ...)` (projections + rotary) and
`_block_out(index, ...)` (how attention and MLP outputs join the residual stream), plus an entry in `ADAPTERS`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import GELUActivation

from pipeline.models.backbone import BackboneError, decoder_of, final_norm_of, unembedding_of

if TYPE_CHECKING:
    from pipeline.engine.cache import JaggedKVCache


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class BackboneAdapter:
    """Block-wise access to a causal decoder. Tensors are [1, rows, d_model] (batch size 1)."""

    #: Hugging Face class names this adapter drives.
    architectures: tuple[str, ...] = ()

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.decoder = decoder_of(model)
        self.layers = list(self.decoder.layers)
        self.num_layers = len(self.layers)
        self.embedding = model.get_input_embeddings()
        self.final_norm = final_norm_of(model)
        self.unembedding = unembedding_of(model)
        self.d_model = self.unembedding.in_features
        self.vocab_size = self.unembedding.out_features
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        # Losslessness needs a verification pass over k rows to compute what greedy's one-row steps compute.
        # In bf16/fp16 it would not: attention over k query rows rounds differently from attention over one
        # (CPU kernels), and logits rounded to 8/11 significant bits tie often. So for such models attention
        # and the final norm + LM head run in fp32 (the head on fp32 copies made once: the model must not
        # change under an engine); fp32/fp64 models run their own modules unchanged (docs/design.md §9).
        low_precision = self.dtype in (torch.float16, torch.bfloat16)
        if low_precision:
            self.head_norm = copy.deepcopy(self.final_norm).float()
            self.head_proj = copy.deepcopy(self.unembedding).float()
        else:
            self.head_norm, self.head_proj = self.final_norm, self.unembedding
        self.logits_dtype = self.head_proj.weight.dtype
        self.attention_dtype = torch.float32 if low_precision else self.dtype
        rope = dict(getattr(self.config, "rope_parameters", None) or {})
        if rope.get("rope_type", "default") in ("dynamic", "longrope"):
            # These rescale the frequencies with the running sequence length; a position table computed once
            # (what makes per-layer calls cheap) would then be wrong.
            raise BackboneError(f"rope type {rope['rope_type']!r} is not supported by the layer-wise engine")
        self.rotary = self.decoder.rotary_emb
        self._cos = self._sin = torch.empty(0)
        self.sliding_window: list[int | None] = [None] * self.num_layers

    # -- geometry the cache and the cost model need -----------------------------------------------------------

    n_kv_heads: int
    head_dim: int

    def block_macs(self) -> int:
        """Multiply-adds of one block for one position, from its weight matrices (attention scores excluded)."""
        return sum(m.weight.numel() for m in self.layers[0].modules() if isinstance(m, nn.Linear))

    # -- per-call pieces ----------------------------------------------------------------------------------------

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[rows] token ids -> [1, rows, d] input of block 0."""
        return self.embedding(token_ids.view(1, -1))

    def rope_table(self, capacity: int) -> None:
        """Precompute cos/sin for positions [0, capacity) with the model's own rotary module (same values the
        model computes per call: each position's angles are computed independently)."""
        if self._cos.shape[0] >= capacity:
            return
        positions = torch.arange(capacity, device=self.device).view(1, -1)
        probe = torch.empty(1, dtype=self.dtype, device=self.device)
        cos, sin = self.rotary(probe, position_ids=positions)
        self._cos, self._sin = cos[0], sin[0]

    def block(self, index: int, hidden: torch.Tensor, cache: JaggedKVCache, start: int) -> torch.Tensor:
        """Run block `index` on rows at positions [start, start + rows): write their K/V into the cache and
        attend causally to positions [0, start + rows) of that layer. Returns the block's output."""
        rows = hidden.shape[1]
        end = start + rows
        query, key, value = self._qkv(index, hidden, self._cos[start:end], self._sin[start:end])
        keys, values = cache.keys[index], cache.values[index]
        keys[:, :, start:end] = key
        values[:, :, start:end] = value
        attn = self._attend(
            query, keys[:, :, :end], values[:, :, :end], start, rows, self.sliding_window[index]
        )
        return self._block_out(index, hidden, attn.transpose(1, 2).reshape(1, rows, -1))

    def kv_only(self, index: int, hidden: torch.Tensor, cache: JaggedKVCache, start: int) -> None:
        """Write K/V of block `index` for rows at [start, start + rows) computed from `hidden` as that block's
        input, without running the block (CALM's state copying for skipped layers)."""
        end = start + hidden.shape[1]
        _, key, value = self._qkv(index, hidden, self._cos[start:end], self._sin[start:end])
        cache.keys[index][:, :, start:end] = key
        cache.values[index][:, :, start:end] = value

    def kv_only_macs(self) -> int:
        """Multiply-adds of `kv_only` for one position and one layer."""
        raise NotImplementedError

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head of [1, rows, d] final-block outputs, in `logits_dtype` (fp32 for a bf16/fp16
        model, the model's dtype otherwise)."""
        return self.head_proj(self.head_norm(hidden.to(self.logits_dtype)))

    # -- architecture-specific ----------------------------------------------------------------------------------

    def _qkv(self, index: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Block `index`'s rotated query and key and its value, each [1, heads, rows, head_dim]."""
        raise NotImplementedError

    def _block_out(self, index: int, hidden: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Block `index`'s output from its input `hidden` and the attention heads' output [1, rows, d]."""
        raise NotImplementedError

    def _attend(self, query, keys, values, start: int, rows: int, window: int | None) -> torch.Tensor:
        end = start + rows
        mask = None
        if rows > 1 or (window is not None and end > window):
            # Row r (position start + r) sees keys [0, start + r]; with a sliding window only the last `window`.
            q_pos = torch.arange(start, end, device=query.device).view(-1, 1)
            k_pos = torch.arange(end, device=query.device).view(1, -1)
            mask = k_pos <= q_pos
            if window is not None:
                mask &= k_pos > q_pos - window
        gqa = query.shape[1] != keys.shape[1]
        dtype = self.attention_dtype  # fp32 for a bf16/fp16 model (see __init__), a no-op otherwise
        out = F.scaled_dot_product_attention(
            query.to(dtype),
            keys.to(dtype),
            values.to(dtype),
            attn_mask=mask,
            scale=self.scaling,
            enable_gqa=gqa,
        )
        return out.to(query.dtype)

    scaling: float


class GPTNeoXAdapter(BackboneAdapter):
    """GPT-NeoX (Pythia): fused interleaved QKV, partial rotary, parallel or sequential residual."""

    architectures = ("GPTNeoXForCausalLM",)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        cfg = self.config
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = self.n_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.rotary_ndims = int(self.head_dim * cfg.rope_parameters.get("partial_rotary_factor", 1.0))
        self.scaling = self.head_dim**-0.5
        self.parallel = bool(cfg.use_parallel_residual)
        # Each block's parameters, read once: calling the functional ops on them skips nn.Module's per-call
        # dispatch (eight module calls per block), a fifth of a one-row block's time on CPU (same ops, same
        # order, same numbers as the modules' forward).
        self._weights = [_NeoXWeights.of(layer) for layer in self.layers]

    def kv_only_macs(self) -> int:
        # The fused projection computes Q too; splitting the interleaved weight would save a third of it.
        return self.layers[0].attention.query_key_value.weight.numel()

    def _qkv(self, index, hidden, cos, sin):
        rows, hd, rot = hidden.shape[1], self.head_dim, self.rotary_ndims
        w = self._weights[index]
        qkv = F.linear(F.layer_norm(hidden, w.ln1_shape, w.ln1_w, w.ln1_b, w.ln1_eps), w.qkv_w, w.qkv_b)
        qkv = qkv.view(1, rows, self.n_heads, 3, hd)  # interleaved per head: q, k, v of head_dim each
        # Query and key rotated together (one set of elementwise ops for both): element by element the same
        # expression and order as transformers' apply_rotary_pos_emb (partial rotary), so the same numbers.
        qk = qkv[:, :, :, :2]
        qk_rot = qk[..., :rot]
        cos, sin = cos.view(1, rows, 1, 1, rot), sin.view(1, rows, 1, 1, rot)
        qk = torch.cat([(qk_rot * cos) + (rotate_half(qk_rot) * sin), qk[..., rot:]], dim=-1)
        query, key = qk.transpose(1, 2).unbind(3)
        return query, key, qkv[:, :, :, 2].transpose(1, 2)

    def _block_out(self, index, hidden, attn):
        w = self._weights[index]
        attn_output = F.linear(attn, w.dense_w, w.dense_b)
        if self.parallel:
            mlp_output = self._mlp(w, F.layer_norm(hidden, w.ln2_shape, w.ln2_w, w.ln2_b, w.ln2_eps))
            return mlp_output + attn_output + hidden
        attn_output = attn_output + hidden
        return self._mlp(w, F.layer_norm(attn_output, w.ln2_shape, w.ln2_w, w.ln2_b, w.ln2_eps)) + attn_output

    @staticmethod
    def _mlp(w: _NeoXWeights, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(w.act(F.linear(hidden, w.fc_in_w, w.fc_in_b)), w.fc_out_w, w.fc_out_b)


class _NeoXWeights(NamedTuple):
    """One GPT-NeoX block's parameters and norm settings, as the functional ops take them."""

    ln1_shape: tuple[int, ...]
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    ln1_eps: float
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor
    dense_w: torch.Tensor
    dense_b: torch.Tensor
    ln2_shape: tuple[int, ...]
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    ln2_eps: float
    fc_in_w: torch.Tensor
    fc_in_b: torch.Tensor
    act: Callable[[torch.Tensor], torch.Tensor]
    fc_out_w: torch.Tensor
    fc_out_b: torch.Tensor

    @classmethod
    def of(cls, layer: nn.Module) -> _NeoXWeights:
        ln1, ln2, attn, mlp = (
            layer.input_layernorm,
            layer.post_attention_layernorm,
            layer.attention,
            layer.mlp,
        )
        # transformers' GELUActivation only forwards to its function: call that function directly.
        act = mlp.act.act if isinstance(mlp.act, GELUActivation) else mlp.act
        return cls(
            tuple(ln1.normalized_shape),
            ln1.weight,
            ln1.bias,
            ln1.eps,
            attn.query_key_value.weight,
            attn.query_key_value.bias,
            attn.dense.weight,
            attn.dense.bias,
            tuple(ln2.normalized_shape),
            ln2.weight,
            ln2.bias,
            ln2.eps,
            mlp.dense_h_to_4h.weight,
            mlp.dense_h_to_4h.bias,
            act,
            mlp.dense_4h_to_h.weight,
            mlp.dense_4h_to_h.bias,
        )


class LlamaAdapter(BackboneAdapter):
    """Llama family (Llama, Mistral, Qwen2): separate q/k/v projections (optional bias), GQA, full rotary,
    pre-norm sequential residual, optional sliding-window layers."""

    architectures = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

    def __init__(self, model: nn.Module):
        super().__init__(model)
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.n_heads = attn.q_proj.out_features // self.head_dim
        self.n_kv_heads = attn.k_proj.out_features // self.head_dim
        self.scaling = attn.scaling
        cfg = self.config
        window = getattr(cfg, "sliding_window", None)
        layer_types = getattr(cfg, "layer_types", None)
        if window is not None:
            if layer_types is not None:  # Qwen2: only layers typed "sliding_attention" use the window
                self.sliding_window = [window if t == "sliding_attention" else None for t in layer_types]
            else:  # Mistral: every layer
                self.sliding_window = [window] * self.num_layers

    def kv_only_macs(self) -> int:
        attn = self.layers[0].self_attn
        return attn.k_proj.weight.numel() + attn.v_proj.weight.numel()

    def _qkv(self, index, hidden, cos, sin):
        rows = hidden.shape[1]
        layer = self.layers[index]
        attn = layer.self_attn
        normed = layer.input_layernorm(hidden)
        query = attn.q_proj(normed).view(1, rows, -1, self.head_dim).transpose(1, 2)
        key = attn.k_proj(normed).view(1, rows, -1, self.head_dim).transpose(1, 2)
        value = attn.v_proj(normed).view(1, rows, -1, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
        return (query * cos) + (rotate_half(query) * sin), (key * cos) + (rotate_half(key) * sin), value

    def _block_out(self, index, hidden, attn):
        layer = self.layers[index]
        hidden = hidden + layer.self_attn.o_proj(attn)
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


ADAPTERS: dict[str, type[BackboneAdapter]] = {
    name: cls for cls in (GPTNeoXAdapter, LlamaAdapter) for name in cls.architectures
}


def adapter_for(model: nn.Module) -> BackboneAdapter:
    """The adapter for `model`'s architecture; a clear error naming the supported ones otherwise."""
    name = type(model).__name__
    if name not in ADAPTERS:
        raise BackboneError(f"the decoding engine does not support {name}; supported: {sorted(ADAPTERS)}")
    return ADAPTERS[name](model)
