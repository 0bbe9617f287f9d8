"""The Llama-family decoder (Llama 2/3.x, Mistral, Qwen2, Qwen3): one model, four HF families.

    args = ModelArgs(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192)
    model = Transformer(args)                               # or optrush.models.io.build_model(args, ...)
    logits = model(input_ids)                               # (B, T, V)
    loss = model(input_ids, position_ids=pos, document_ids=docs, labels=labels, reduction="sum")

The families differ only in three switches: `qkv_bias` (Qwen2), `qk_norm` (per-head RMSNorm on q and k, Qwen3)
and `sliding_window` (Mistral v0.1). Labels come already aligned (see optrush.data.batch): no shift here.

Meta-device construction (FSDP2, big checkpoints): build under `torch.device("meta")`, `to_empty(device=...)`,
then `tie_weights()` and either `init_weights()` or a checkpoint load, then `init_rope()`. The RoPE tables are
non-persistent fp32 buffers, so they are never saved and must be rebuilt after materialising (or after `.to(dtype)`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from optrush.models import layers
from optrush.models.kv_cache import KVCache, LayerKVCache, cached_attention
from optrush.models.layers import FeedForward, RMSNorm


@dataclass(kw_only=True, slots=True)
class ModelArgs:
    vocab_size: int
    dim: int
    """Hidden size (HF hidden_size)."""
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None = n_heads."""
    head_dim: int | None = None
    """Per-head size; None = dim // n_heads. Qwen3 sets it independently (n_heads * head_dim != dim)."""
    ffn_dim: int
    """SwiGLU hidden size (HF intermediate_size)."""
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    """HF rope scaling dict without rope_theta, e.g. {"rope_type": "llama3", "factor": 8.0, ...}; None = plain RoPE."""
    max_seq_len: int = 4096
    """Longest sequence (HF max_position_embeddings); the RoPE tables have this many rows."""
    tie_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    """Attend to at most this many most recent tokens (Mistral v0.1); None = full causal attention."""
    model_type: str = "llama"
    """The HF family to save as: llama, mistral, qwen2 or qwen3."""
    bos_token_id: int | None = None
    """Token ids carried into the saved config.json for generation tools; the model itself never reads them."""
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.head_dim = self.head_dim or self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None
        # Plain attributes so optrush.kernels and optrush.peft can swap in other implementations with the same
        # signatures; `attend` is set together with the Transformer's mask builder by
        # `Transformer.set_attention_backend`.
        self.rotary = layers.apply_rotary
        self.attend = layers.sdpa_attention
        self.project = layers.project

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: LayerKVCache | None = None, cache_position: torch.Tensor | None = None):
        B, T, _ = x.shape
        q, k, v = self.project(x, self.wq, self.wk, self.wv)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(q, k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is None:
            out = self.attend(q, k, v, mask=mask)
        else:
            # Decoding attends over the whole static cache with the cache's dense mask, whatever the backend.
            k, v = cache.update(cache_position, k, v)
            out = cached_attention(q, k, v, mask=mask)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class TransformerBlock(nn.Module):
    """Pre-norm residual block; the unit that activation checkpointing, compile and FSDP2 wrap."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: LayerKVCache | None = None, cache_position: torch.Tensor | None = None):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, cache_position)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.vocab_size = args.vocab_size
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.tie_weights()
        # A plain attribute so a fused kernel can replace it: model.loss_fn = fused_linear_cross_entropy
        self.loss_fn = layers.linear_cross_entropy
        self.attention_backend = layers.SDPA
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.init_rope()

    def tie_weights(self) -> None:
        """Share the output projection with the embedding. Call again after `to_empty` or a load with
        `assign=True`: both replace parameter objects and so silently untie them."""
        if self.args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def set_attention_backend(self, backend: layers.AttentionBackend) -> None:
        """Attend with `backend` (e.g. optrush.kernels.attention.FLEX): its mask is built once per forward pass
        and its attention runs in every layer."""
        self.attention_backend = backend
        for block in self.layers:
            block.attention.attend = backend.attend

    def init_rope(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the fp32 RoPE tables on `device` (default: where the embedding lives)."""
        device = self.tok_embeddings.weight.device if device is None else device
        a = self.args
        inv_freq, scale = layers.rope_inv_freq(head_dim=a.head_dim, theta=a.rope_theta, scaling=a.rope_scaling,
                                               max_seq_len=a.max_seq_len)
        self.rope_cos, self.rope_sin = layers.rope_tables(inv_freq, scale, seq_len=a.max_seq_len, device=device)

    def set_rope(self, *, scaling: dict | None, max_seq_len: int) -> None:
        """Extend the context: new RoPE scaling (an HF rope_scaling dict, None = plain) and table length, saved
        with the model. Dynamic NTK becomes plain RoPE with the NTK base for `max_seq_len` (`layers.ntk_theta`),
        so the saved config gives transformers the very same tables."""
        scaling, theta = dict(scaling) if scaling else None, self.args.rope_theta
        if scaling and scaling.get("rope_type", scaling.get("type")) == "dynamic":
            theta = layers.ntk_theta(theta, head_dim=self.args.head_dim, factor=scaling["factor"],
                                     seq_len=max_seq_len, original=scaling["original_max_position_embeddings"])
            scaling = None
        # a new ModelArgs: the old one may be shared (a preset, another model built from the same args)
        self.args = dataclasses.replace(self.args, rope_theta=theta, rope_scaling=scaling, max_seq_len=max_seq_len)
        self.init_rope()

    @torch.no_grad()
    def init_weights(self, *, std: float = 0.02) -> None:
        """Random init: normal(0, std) everywhere (biases too: no zero-initialised weight anywhere), residual
        output projections scaled by 1/sqrt(2 * n_layers) as in GPT-2, norms at 1. Rebuilds the RoPE tables."""
        for name, param in self.named_parameters():
            self.init_parameter(name, param, std=std)
        self.init_rope()

    @torch.no_grad()
    def init_parameter(self, name: str, param: torch.Tensor, *, std: float = 0.02) -> None:
        """`init_weights`' rule for the one parameter called `name` (one draw from the global RNG, or none)."""
        if name.endswith("norm.weight"):
            nn.init.ones_(param)
        elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            nn.init.normal_(param, mean=0.0, std=std / math.sqrt(2 * self.args.n_layers))
        else:
            nn.init.normal_(param, mean=0.0, std=std)

    def forward(self, input_ids: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                reduction: str = "mean", cache: KVCache | None = None,
                cache_position: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) in the weights' dtype when `labels` is None, else the loss of
        `self.loss_fn` ("sum" or "mean" over labelled tokens). position_ids default to 0..T-1 in every row;
        document_ids (B, T) restrict attention to each packed document (padding: -1).
        Decoding (optrush.generate): `cache` stores keys and values at slots `cache_position` (T,), and the
        queries attend to every earlier valid slot of the cache (see optrush.models.kv_cache)."""
        B, T = input_ids.shape
        if T > self.rope_cos.shape[0]:
            raise ValueError(f"a sequence of {T} tokens is longer than max_seq_len={self.args.max_seq_len}: "
                             "shorten the data (data.max_length) or raise the model's max_seq_len")
        if position_ids is None:
            positions = torch.arange(T, device=input_ids.device) if cache is None else cache_position
            position_ids = positions.expand(B, T)
        cos, sin = self.rope_cos[position_ids], self.rope_sin[position_ids]
        h = self.tok_embeddings(input_ids)
        if cache is None:
            mask = self.attention_backend.build_mask(document_ids, seq_len=T,
                                                     sliding_window=self.args.sliding_window, device=input_ids.device)
            for block in self.layers:
                h = block(h, cos, sin, mask)
        else:
            mask = cache.mask(cache_position, sliding_window=self.args.sliding_window)
            for block, layer_cache in zip(self.layers, cache.layers):
                h = block(h, cos, sin, mask, layer_cache, cache_position)
        h = self.norm(h)
        if labels is None:
            return self.output(h)
        return self.loss_fn(h, self.output.weight, labels, reduction=reduction)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Distinct parameters (a tied matrix counts once); `exclude_embeddings` leaves out the embedding table."""
        total = sum(p.numel() for p in self.parameters())
        return total - self.tok_embeddings.weight.numel() if exclude_embeddings else total

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token for MFU: 6 * params + 6 * n_layers * seq_len * dim.

        Deliberately the same formula as the HF baseline we compare against (`../shared/gpu/baseline-hf.py`,
        issue #5) so that MFU ratios are like for like: every parameter counts (an untied embedding lookup too,
        which slightly flatters untied models), and the attention term is QK^T and AV at causal density (half
        of 12 * L * T * d, https://arxiv.org/abs/2204.02311 appendix B)."""
        return 6 * self.num_params() + 6 * self.args.n_layers * seq_len * self.args.dim
