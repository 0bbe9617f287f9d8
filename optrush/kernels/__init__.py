"""Attention backends and fused kernels, switched on by config as one model transform.

    model = apply_kernels(model, cfg)   # after peft/quantize, before activation checkpointing, compile and sharding

- `model.attention`: `sdpa` (the reference, optrush.models.layers), `flex` or `varlen` (optrush.kernels.attention),
  set with `Transformer.set_attention_backend`.
- `kernels.fused_loss`, `kernels.loss_chunk_tokens`, `kernels.z_loss`: `model.loss_fn` becomes the chunked
  fused linear + cross-entropy (optrush.kernels.fused_loss); a z-loss without fusion uses the reference loss.
  The DPO and GRPO objectives read the same switch for their per-token log-probs (`chunked_label_logps`).
- `kernels.fused_ops`: compiled RMSNorm, RoPE and SwiGLU (optrush.kernels.ops).

Every fused path has a plain reference with the same signature, and the tests compare the two in values and
gradients. Nothing here patches a foreign library: only our own model's attributes and submodules change.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from optrush.config.schema import Config
from optrush.kernels.attention import BACKENDS, FLEX, VARLEN
from optrush.kernels.fused_loss import (chunked_label_logps, fused_linear_cross_entropy, reference_label_logps,
                                       reference_linear_cross_entropy)
from optrush.kernels.ops import apply_fused_ops
from optrush.models.llama import Transformer

__all__ = ["FLEX", "VARLEN", "apply_fused_ops", "apply_kernels", "chunked_label_logps", "fused_linear_cross_entropy",
           "reference_label_logps", "reference_linear_cross_entropy"]


def apply_kernels(model: nn.Module, cfg: Config) -> nn.Module:
    """Install the attention backend, loss and ops that `cfg` asks for, in place; returns `model`.
    (optrush.train.optimizations logs the choices, `kernel_choices(cfg)`.)"""
    chosen = kernel_choices(cfg)
    if not chosen:
        return model
    if not isinstance(model, Transformer):
        raise ValueError(f"{', '.join(chosen)} need the native Llama-family model, but {type(model).__name__} "
                         "was loaded (through transformers); leave model.attention=sdpa and kernels.* at their "
                         "defaults for this checkpoint")
    if cfg.model.attention != "sdpa":
        check_attention_device(cfg.model.attention, next(model.parameters()).device)
        model.set_attention_backend(BACKENDS[cfg.model.attention])
    k = cfg.kernels
    if k.fused_loss:
        model.loss_fn = functools.partial(fused_linear_cross_entropy, chunk_tokens=k.loss_chunk_tokens,
                                          z_loss=k.z_loss)
    elif k.z_loss:
        model.loss_fn = functools.partial(reference_linear_cross_entropy, z_loss=k.z_loss)
    if k.fused_ops:
        apply_fused_ops(model)
    if k.fused_dequantize:
        from optrush.peft.quant import QuantizedWeight

        for module in model.modules():
            if isinstance(module, QuantizedWeight):
                module.fused_dequantize = True
    return model


def kernel_choices(cfg: Config) -> list[str]:
    """The non-default choices, as `key=value` strings for the log (empty: the plain reference model)."""
    k = cfg.kernels
    chosen = [f"model.attention={cfg.model.attention}"] if cfg.model.attention != "sdpa" else []
    if k.fused_loss:
        chosen.append(f"kernels.fused_loss (chunks of {k.loss_chunk_tokens} tokens)")
    if k.z_loss:
        chosen.append(f"kernels.z_loss={k.z_loss}")
    if k.fused_ops:
        chosen.append("kernels.fused_ops")
    if k.fused_dequantize:
        chosen.append("kernels.fused_dequantize")
    return chosen


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def check_attention_device(backend: str, device: torch.device) -> None:
    """Fail at start-up, not at the first backward, where a backend cannot train."""
    if device.type == "cpu":
        why = "FlexAttention has no CPU backward" if backend == "flex" else "varlen_attn has no CPU kernel"
        raise ValueError(f"model.attention={backend} needs a CUDA GPU ({why}); use model.attention=sdpa on CPU")
    if backend == "varlen" and torch_version() < (2, 11):
        raise ValueError(f"model.attention=varlen needs torch >= 2.11 (torch.nn.attention.varlen.varlen_attn with "
                         f"window_size), found {torch.__version__}; upgrade torch or use model.attention=flex")
