"""Fused RMSNorm, RoPE and SwiGLU: the reference formulas of optrush.models.layers, each compiled into one kernel.

    model = apply_fused_ops(model)     # what optrush.kernels.apply_kernels does for kernels.fused_ops=true

Each op is the reference function (same signature, same maths) wrapped in `torch.compile(fullgraph=True)`, so
Inductor emits one fused Triton kernel for its forward and one for its backward, and saves only the inputs for
backward instead of every fp32 intermediate. The modules are swapped in place (`FusedRMSNorm` for `RMSNorm`,
`FusedFeedForward` for `FeedForward`, `fused_rotary` as each attention's `rotary`), keeping the very same
parameter objects and state-dict keys, so checkpoints, optimizers and HF export see no difference.

Why compiled regions rather than hand-written Triton kernels: they are compile-friendly by construction. When the
model is compiled too (compile.mode=blocks/model), dynamo inlines these regions into the block's graph, where
Inductor can fuse them with their neighbours (the residual add before a norm, the casts around RoPE) - an opaque
custom kernel would block that fusion, and a kernel that dynamo cannot trace breaks the graph (Liger's RMSNorm,
issue #5). Without model compile they still give fused kernels. On a CPU model they run the same code eagerly
(Inductor's CPU compile costs seconds per shape and buys nothing for tests and debug runs).

Measured on an H100, torch 2.11, bf16, 8,192 tokens of the Llama-3.2-1B shape, forward + backward, GPU kernel
time (benchmarks/results/kernels_h100.md):

    op        eager reference         compiled region         effective bandwidth of the compiled region
    RMSNorm   0.910 ms, 0.44 GiB      0.085 ms, 0.10 GiB      2.0 TB/s
    SwiGLU    0.661 ms, 0.63 GiB      0.398 ms, 0.50 GiB      2.7 TB/s
    RoPE      0.454 ms, 0.15 GiB      0.082 ms, 0.12 GiB      2.0 TB/s

At 60-80% of the H100's 3.35 TB/s a hand-written kernel could gain at most 1.3-1.7x on ops that are already a
few percent of a step, so we keep the compiled reference. Called from eager code, a compiled region costs about
0.5-0.9 ms of CPU time per forward + backward (guards, autograd wrappers), hidden while the GPU works through the
matmuls queued around it; under compile.mode=blocks the regions are inlined and that overhead disappears.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from optrush.kernels.lazy_compile import compile_on_first_call
from optrush.models import layers
from optrush.models.llama import Transformer


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`layers.RMSNorm` as a function: x / rms(x) in fp32, cast back to x's dtype, times the weight."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The SwiGLU gate of `layers.FeedForward`: silu(gate) * up."""
    return F.silu(gate) * up


_rms_norm_compiled = compile_on_first_call(rms_norm, fullgraph=True)
_swiglu_compiled = compile_on_first_call(swiglu, fullgraph=True)
_rotary_compiled = compile_on_first_call(layers.apply_rotary, fullgraph=True)


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _rms_norm_compiled(x, weight, eps) if x.is_cuda else rms_norm(x, weight, eps)


def fused_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _swiglu_compiled(gate, up) if gate.is_cuda else swiglu(gate, up)


def fused_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`layers.apply_rotary` (same signature) as one kernel for q and k."""
    return _rotary_compiled(q, k, cos, sin) if q.is_cuda else layers.apply_rotary(q, k, cos, sin)


class FusedRMSNorm(nn.Module):
    """Drop-in for `layers.RMSNorm`: the same `weight` and `eps`, computed by `fused_rms_norm`."""

    def __init__(self, norm: layers.RMSNorm):
        super().__init__()
        self.eps = norm.eps
        self.weight = norm.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_rms_norm(x, self.weight, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class FusedFeedForward(nn.Module):
    """Drop-in for `layers.FeedForward`: the same w1/w2/w3 projections, with the gate by `fused_swiglu`."""

    def __init__(self, ffn: layers.FeedForward):
        super().__init__()
        self.w1, self.w2, self.w3 = ffn.w1, ffn.w2, ffn.w3
        self.project = ffn.project

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(fused_swiglu(*self.project(x, self.w1, self.w3)))


def apply_fused_ops(model: Transformer) -> Transformer:
    """Swap every RMSNorm and FeedForward of `model` for its fused twin and fuse each attention's RoPE; in place."""
    for block in model.layers:
        attention = block.attention
        attention.rotary = fused_rotary
        if attention.q_norm is not None:
            attention.q_norm, attention.k_norm = FusedRMSNorm(attention.q_norm), FusedRMSNorm(attention.k_norm)
        block.attention_norm, block.ffn_norm = FusedRMSNorm(block.attention_norm), FusedRMSNorm(block.ffn_norm)
        block.feed_forward = FusedFeedForward(block.feed_forward)
    model.norm = FusedRMSNorm(model.norm)
    return model
