"""A static key/value cache for decoding: one preallocated (B, n_kv_heads, max_len, head_dim) buffer per layer.

    cache = KVCache.for_model(model, batch_size=4, max_len=256)
    logits = model(prompt_ids, position_ids=pos, cache=cache, cache_position=torch.arange(T))   # prefill
    logits = model(next_ids, position_ids=pos + T, cache=cache, cache_position=torch.tensor([T]))  # one step

Every decode step has the same shapes (one query per row attends to all `max_len` slots through a boolean mask),
so it can be compiled once. Rows of different prompt lengths are left-padded: `valid` marks the slots that hold a
real token, and padding is never attended to. `cache_position` is the slot each input column is written to, the
same for every row; position ids (RoPE) are per row and are the caller's business.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerKVCache:
    """The key and value buffers of one attention layer."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v

    def update(self, cache_position: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H_kv, T, D) at slots `cache_position` (T,); return the whole buffers."""
        self.k.index_copy_(2, cache_position, k.to(self.k.dtype))
        self.v.index_copy_(2, cache_position, v.to(self.v.dtype))
        return self.k, self.v


class KVCache:
    def __init__(self, *, n_layers: int, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.layers = [LayerKVCache(torch.zeros(shape, dtype=dtype, device=device),
                                    torch.zeros(shape, dtype=dtype, device=device)) for _ in range(n_layers)]
        self.max_len = max_len
        self.valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        """(B, max_len): False at left-padding slots, which no query may attend to."""

    @classmethod
    def for_model(cls, model: nn.Module, *, batch_size: int, max_len: int) -> KVCache:
        """An empty cache for `model` (an optrush Transformer), in its weights' dtype and device."""
        a, weight = model.args, model.tok_embeddings.weight
        return cls(n_layers=a.n_layers, batch_size=batch_size, n_kv_heads=a.n_kv_heads, max_len=max_len,
                   head_dim=a.head_dim, dtype=weight.dtype, device=weight.device)

    def mask(self, cache_position: torch.Tensor, *, sliding_window: int | None) -> torch.Tensor:
        """(B, 1, T, max_len) boolean mask: query column t sees the valid slots up to cache_position[t]. It always
        sees its own slot, so a padding query has a non-empty row (no NaN); no real token ever sees padding."""
        slots = torch.arange(self.max_len, device=cache_position.device)
        query = cache_position[:, None]
        causal = slots[None, :] <= query
        if sliding_window is not None:
            causal = causal & (query - slots[None, :] < sliding_window)
        own_slot = slots[None, :] == query
        return ((causal[None] & self.valid[:, None, :]) | own_slot[None])[:, None]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep rows `rows` (B,) of every buffer, in that order (beam search: each beam takes its parent's cache)."""
        for layer in self.layers:
            layer.k.copy_(layer.k.index_select(0, rows))
            layer.v.copy_(layer.v.index_select(0, rows))
        self.valid.copy_(self.valid.index_select(0, rows))


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor) -> torch.Tensor:
    """SDPA of q (B, H, T, D) over the whole cache k, v (B, H_kv, L, D) under `KVCache.mask` (B, 1, T, L).

    The query heads that share a KV head are folded into the query length (head h reads KV head h // groups), so
    the cache is read in place instead of being repeated `groups` times per layer and step."""
    B, H, T, D = q.shape
    groups = H // k.shape[1]
    q = q.reshape(B, k.shape[1], groups * T, D)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.repeat(1, 1, groups, 1))
    return out.reshape(B, H, T, D)
