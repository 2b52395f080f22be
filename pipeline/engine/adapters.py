"""Backbone adapters: run a Hugging Face decoder one block at a time on our own KV buffers.

An adapter knows one architecture's block layout. It computes attention itself (scaled-dot-product attention
on preallocated per-layer K/V buffers) and reuses the model's own modules for norms and MLPs, so the numbers
are those of the Hugging Face forward (same operations, same order) without its per-call Cache and mask
machinery, which costs more than a small block's compute on CPU.

Adding an architecture = one subclass implementing `_qkv` (projections + rotary) and `_block_out`
(how attention and MLP outputs join the residual stream), plus an entry in `ADAPTERS`.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

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
        layer = self.layers[index]
        query, key, value = self._qkv(layer, hidden, self._cos[start:end], self._sin[start:end])
        keys, values = cache.keys[index], cache.values[index]
        keys[:, :, start:end] = key
        values[:, :, start:end] = value
        attn = self._attend(
            query, keys[:, :, :end], values[:, :, :end], start, rows, self.sliding_window[index]
        )
        return self._block_out(layer, hidden, attn.transpose(1, 2).reshape(1, rows, -1))

    def kv_only(self, index: int, hidden: torch.Tensor, cache: JaggedKVCache, start: int) -> None:
        """Write K/V of block `index` for rows at [start, start + rows) computed from `hidden` as that block's
        input, without running the block (CALM's state copying for skipped layers)."""
        end = start + hidden.shape[1]
        _, key, value = self._qkv(self.layers[index], hidden, self._cos[start:end], self._sin[start:end])
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

    def _qkv(self, layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        raise NotImplementedError

    def _block_out(self, layer: nn.Module, hidden: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
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

    def kv_only_macs(self) -> int:
        # The fused projection computes Q too; splitting the interleaved weight would save a third of it.
        return self.layers[0].attention.query_key_value.weight.numel()

    def _qkv(self, layer, hidden, cos, sin):
        rows = hidden.shape[1]
        qkv = layer.attention.query_key_value(layer.input_layernorm(hidden))
        qkv = qkv.view(1, rows, self.n_heads, 3 * self.head_dim).transpose(1, 2)
        query, key, value = qkv.chunk(3, dim=-1)
        rot = self.rotary_ndims
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
        q_rot, k_rot = query[..., :rot], key[..., :rot]
        # Same expression and order as transformers' apply_rotary_pos_emb (partial rotary).
        q_embed = torch.cat([(q_rot * cos) + (rotate_half(q_rot) * sin), query[..., rot:]], dim=-1)
        k_embed = torch.cat([(k_rot * cos) + (rotate_half(k_rot) * sin), key[..., rot:]], dim=-1)
        return q_embed, k_embed, value

    def _block_out(self, layer, hidden, attn):
        attn_output = layer.attention.dense(attn)
        if self.parallel:
            mlp_output = layer.mlp(layer.post_attention_layernorm(hidden))
            return mlp_output + attn_output + hidden
        attn_output = attn_output + hidden
        return layer.mlp(layer.post_attention_layernorm(attn_output)) + attn_output


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

    def _qkv(self, layer, hidden, cos, sin):
        rows = hidden.shape[1]
        attn = layer.self_attn
        normed = layer.input_layernorm(hidden)
        query = attn.q_proj(normed).view(1, rows, -1, self.head_dim).transpose(1, 2)
        key = attn.k_proj(normed).view(1, rows, -1, self.head_dim).transpose(1, 2)
        value = attn.v_proj(normed).view(1, rows, -1, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
        return (query * cos) + (rotate_half(query) * sin), (key * cos) + (rotate_half(key) * sin), value

    def _block_out(self, layer, hidden, attn):
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
