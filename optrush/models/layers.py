"""The building blocks shared by every model family: RMSNorm, rotary embeddings, attention, SwiGLU and the loss.

These are the *reference* PyTorch paths: plain, exact and readable. Fused kernels (optrush.kernels) must match them
in output and gradients, and replace them by assignment (e.g. `model.loss_fn = fused_linear_cross_entropy`).

    inv_freq, scale = rope_inv_freq(head_dim=128, theta=5e5, scaling={"rope_type": "llama3", ...}, max_seq_len=131072)
    cos, sin = rope_tables(inv_freq, scale, seq_len=8192, device="cuda")   # (seq_len, head_dim // 2), fp32
    q, k = apply_rotary(q, k, cos[position_ids], sin[position_ids])       # q, k: (B, T, heads, head_dim)
    mask = attention_mask(document_ids, seq_len=T, sliding_window=None)    # None = plain causal
    out = sdpa_attention(q, k, v, mask=mask)                               # (B, heads, T, head_dim)

RoPE scaling follows transformers' definitions (modeling_rope_utils.py) so that HF checkpoints give the same logits.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from optrush.data.batch import IGNORE_INDEX

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back before the weight (as HF Llama does, for bf16 parity)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def project(x: torch.Tensor, *linears: nn.Module) -> tuple[torch.Tensor, ...]:
    """Each of `linears` applied to the same input `x` (attention's q, k, v; the MLP's gate and up). A plain
    function held as a module attribute, so that a transform can substitute one that shares work between the
    layers (optrush.peft.lora.project_shared_input reads x once for all their adapters)."""
    return tuple(linear(x) for linear in linears)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x) (w1 = HF gate_proj, w3 = up_proj, w2 = down_proj)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.project = project

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.project(x, self.w1, self.w3)
        return self.w2(F.silu(gate) * up)


# ---------------------------------------------------------------------------------------------------------- RoPE

def rope_inv_freq(*, head_dim: int, theta: float, scaling: dict | None,
                  max_seq_len: int) -> tuple[torch.Tensor, float]:
    """(inv_freq of shape (head_dim // 2,), attention factor that multiplies cos and sin).

    `scaling` is an HF `rope_scaling`/`rope_parameters` dict without rope_theta (None = plain RoPE). The formulas
    mirror transformers' `_compute_*_parameters` operation for operation so tables match bit for bit on CPU.
    """
    scaling = scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    base = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    inv_freq = 1.0 / base
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / scaling["factor"], 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(base, head_dim=head_dim, theta=theta, scaling=scaling, max_seq_len=max_seq_len)
    if rope_type == "dynamic":
        if "original_max_position_embeddings" not in scaling:
            raise ValueError("rope_type 'dynamic' (NTK) needs original_max_position_embeddings, the pretraining "
                             "length the factor extends (transformers reads it from max_position_embeddings)")
        theta = ntk_theta(theta, head_dim=head_dim, factor=scaling["factor"], seq_len=max_seq_len,
                          original=scaling["original_max_position_embeddings"])
        return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim), 1.0
    raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")


def ntk_theta(theta: float, *, head_dim: int, factor: float, seq_len: int, original: int) -> float:
    """NTK-aware base for `seq_len` tokens (transformers' dynamic NTK at that length): plain RoPE with this theta.

    transformers recomputes it from the running length at inference; training uses fixed tables, so optrush
    evaluates it once at the table length, which is static NTK scaling (https://redd.it/14mrgpr)."""
    seq_len = max(seq_len, original)
    return theta * ((factor * seq_len / original) - (factor - 1)) ** (head_dim / (head_dim - 2))


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between.
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_context / high) * ~(wavelen > old_context / low)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(base: torch.Tensor, *, head_dim: int, theta: float, scaling: dict,
                   max_seq_len: int) -> tuple[torch.Tensor, float]:
    # YaRN (https://arxiv.org/abs/2309.00071): interpolate low frequencies, extrapolate high ones, with a linear
    # ramp between dimensions `low` and `high`, and scale attention logits by `attention_factor` (through cos/sin).
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or max_seq_len / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = 1.0 / (factor * base) * (1 - extrapolation) + 1.0 / base * extrapolation
    return inv_freq, attention_factor


def rope_tables(inv_freq: torch.Tensor, attention_factor: float, *, seq_len: int,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (cos, sin) of shape (seq_len, head_dim // 2) for positions 0..seq_len-1."""
    positions = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = positions[:, None] * inv_freq.to(device)[None, :]
    return freqs.cos() * attention_factor, freqs.sin() * attention_factor


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k (B, T, heads, head_dim) by cos/sin already gathered at the positions: (B, T, head_dim // 2).

    Uses HF's "rotate half" layout (the two halves of each head are the pair), so HF weights need no permutation.
    """
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        c, s = cos.to(x.dtype), sin.to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)

    return rotate(q), rotate(k)


# ----------------------------------------------------------------------------------------------------- attention

def attention_mask(document_ids: torch.Tensor | None, *, seq_len: int, sliding_window: int | None = None,
                   device: torch.device | str | None = None) -> torch.Tensor | None:
    """Boolean mask (B or 1, 1, T, T), True = may attend; None when a plain causal mask is exact.

    Packed rows: a token sees earlier tokens of its own document only. Padding (document id -1) sees earlier
    padding, which keeps every row of the mask non-empty (no NaN) while no real token ever sees padding.
    `sliding_window` (Mistral): a query sees at most the last `sliding_window` keys, itself included.
    """
    if document_ids is None and (sliding_window is None or seq_len <= sliding_window):
        return None
    idx = torch.arange(seq_len, device=device if document_ids is None else document_ids.device)
    mask = idx[:, None] >= idx[None, :]
    if sliding_window is not None:
        mask = mask & (idx[:, None] - idx[None, :] < sliding_window)
    mask = mask[None, None]
    if document_ids is not None:
        mask = mask & (document_ids[:, None, :, None] == document_ids[:, None, None, :])
    return mask


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention with grouped KV heads; q (B, H, T, D), k and v (B, H_kv, T, D)."""
    if mask is None:
        # enable_gqa lets the flash kernel read the shared KV heads without copying them
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    # With a mask the memory-efficient kernel runs, and it does not take enable_gqa (only flash and math do,
    # per the torch docs), so repeat the KV heads explicitly.
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@dataclass(frozen=True, slots=True)
class AttentionBackend:
    """One attention implementation as two functions that must agree on what a "mask" is.

    `build_mask(document_ids, *, seq_len, sliding_window, device)` runs once per forward pass (document_ids (B, T)
    or None, as in `attention_mask`) and returns whatever `attend` needs: a dense mask, a FlexAttention BlockMask,
    cumulative sequence lengths... `attend(q, k, v, *, mask)` runs in every layer on q (B, H, T, D) and k, v
    (B, H_kv, T, D) and returns (B, H, T, D). optrush.kernels.attention holds the `flex` and `varlen` backends.
    """
    name: str
    build_mask: Callable[..., Any]
    attend: Callable[..., torch.Tensor]


SDPA = AttentionBackend(name="sdpa", build_mask=attention_mask, attend=sdpa_attention)


# ---------------------------------------------------------------------------------------------------------- loss

def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` against aligned `labels` (no shift), ignoring IGNORE_INDEX.

    The logits matmul runs in the working dtype (as HF and fused kernels do); softmax and the loss run in fp32.
    "sum" adds the per-token losses; "mean" divides by the count of trained tokens (NaN when there are none,
    like torch's cross_entropy).
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction)
