"""Activation checkpointing and CPU offload of saved activations, per transformer block.

    model = apply_activation_checkpointing(model, cfg)   # cfg.activations: checkpointing, every, offload

Policies (`activations.checkpointing`):
- `full`: a block keeps only its inputs; backward reruns the whole block (about one extra forward: ~+33% compute).
- `selective`: a block keeps the outputs of its matmuls and attention and recomputes only the cheap pointwise ops
  (norms, RoPE, SiLU, residual adds), which cost little time but hold most of the activation bytes in eager mode.
- `every: k` checkpoints blocks 0, k, 2k, ... only, trading memory back for speed.
`activations.offload` moves the tensors each block saves for backward to (pinned) CPU memory during the forward
pass and back during backward (`torch.autograd.graph.save_on_cpu`); with checkpointing that is the block inputs,
so memory no longer grows with depth on the GPU. It costs PCIe traffic on the critical path.

Both are applied to the blocks in place (the block's `forward` becomes a checkpointed call; offload is a pair of
forward hooks), so parameter names, `state_dict` keys and optimizer state are exactly those of the plain model.
Checkpointing runs inside a compiled block (torch.compile sees the recompute tags and plans the recomputation),
while the offload hooks stay outside it: `optrush.parallel.compile` compiles each block's `forward`, never its
hooks, and whole-model compile is refused together with offload.

Measured on the Llama-3.2-1B shape, B=4 x S=2048, compiled blocks + fused loss, H100
(benchmarks/results/train_speed_h100.md): `selective` -3.0 GiB for 1% of speed, `full` -8.7 GiB for 14%, offload
on top of `full` a further -0.5 GiB for 37% (the copies are synchronous): offload pays only at long context.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from optrush.config import Config

# Ops whose outputs the selective policy keeps: everything that costs FLOPs. Matched by name, so ops that a given
# torch build lacks (varlen attention before 2.10) simply never occur. Everything else is recomputed.
SAVED_OPS = frozenset({
    "aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_mm",
    "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
    "torch_attn::_varlen_attn", "flex_attention",
})


def apply_activation_checkpointing(model: nn.Module, cfg: Config) -> nn.Module:
    """Checkpoint and/or offload the blocks in `model.layers` as `cfg.activations` says; returns the model."""
    ac = cfg.activations
    if ac.checkpointing != "none":
        for index, block in enumerate(model.layers):
            if index % ac.every == 0:
                checkpoint_block(block, selective=ac.checkpointing == "selective")
    if ac.offload:
        pin_memory = next(model.parameters()).device.type == "cuda"
        for block in model.layers:
            offload_block(block, pin_memory=pin_memory)
    return model


def checkpoint_block(block: nn.Module, *, selective: bool) -> None:
    """Make `block.forward` a non-reentrant checkpoint of itself (full, or selective with `SAVED_OPS` kept)."""
    forward = block.forward
    context_fn = selective_contexts if selective else None

    @functools.wraps(forward)
    def checkpointed_forward(*args, **kwargs):
        # preserve_rng_state=False: the blocks draw no random numbers (no dropout), so there is nothing to replay.
        # No context_fn at all for full checkpointing: torch 2.11's dynamo fails on an explicit noop_context_fn.
        if context_fn is None:
            return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=False, context_fn=context_fn,
                          **kwargs)

    block.forward = checkpointed_forward


def save_costly_ops(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if func.name() in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_contexts():
    return create_selective_checkpoint_contexts(save_costly_ops)


def offload_block(block: nn.Module, *, pin_memory: bool) -> None:
    """Send what `block` saves for backward to CPU: a `save_on_cpu` context entered in a forward pre-hook and
    left in a forward hook that also runs when the forward raises."""
    contexts: list[torch.autograd.graph.save_on_cpu] = []

    def enter(module, args):
        contexts.append(torch.autograd.graph.save_on_cpu(pin_memory=pin_memory))
        contexts[-1].__enter__()

    def leave(module, args, output):
        contexts.pop().__exit__(None, None, None)

    block.register_forward_pre_hook(enter)
    block.register_forward_hook(leave, always_call=True)
