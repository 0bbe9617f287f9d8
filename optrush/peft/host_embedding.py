"""A frozen token embedding kept in pinned host memory; the GPU reads the rows it needs over PCIe.

    model = apply_embedding_on_host(model, cfg)          # cfg.peft.embedding_on_host = true, after apply_lora

Under LoRA and QLoRA the embedding table is frozen and only read: a step gathers batch x seq rows of it (64 MiB
at B=4 x 2048 with dim 4096) out of vocab x dim (1 GiB for Llama 3's 128,256 x 4,096 in bf16, a fifth of an NF4
8B model's GPU memory). With unified virtual addressing, pinned host memory is mapped into the GPU's address
space, so the table can stay a CUDA tensor whose storage is host memory: the embedding kernel, eager or compiled,
reads the gathered rows straight from it, with no synchronisation and no copy of the table. The parameter keeps
its name, dtype, device and values, so checkpoints, exports and generation see the same model.

Only for one GPU and an untied, frozen table: a tied output head reads the whole table every step, and sharding or
DDP would broadcast or all-gather memory that NCCL cannot register.
"""
from __future__ import annotations

import torch
from torch import nn


class _PinnedBytes:
    """Exposes a pinned host tensor's bytes through `__cuda_array_interface__`, which `torch.as_tensor` wraps as a
    CUDA tensor without a copy; the wrapper holds this object, and so the host memory, alive."""

    def __init__(self, pinned: torch.Tensor):
        self.pinned = pinned
        self.__cuda_array_interface__ = {"shape": (pinned.numel() * pinned.element_size(),), "typestr": "|u1",
                                         "data": (pinned.data_ptr(), False), "version": 3, "strides": None}


def host_mapped(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor on `tensor`'s CUDA device, equal to it, whose storage is pinned host memory (read over PCIe)."""
    pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    pinned.copy_(tensor.detach())
    flat = torch.as_tensor(_PinnedBytes(pinned), device=tensor.device)
    return flat.view(tensor.dtype).view(tensor.shape)


def apply_embedding_on_host(model: nn.Module, cfg) -> nn.Module:
    """Move the frozen token embedding table of `model` to pinned host memory (`cfg.peft.embedding_on_host`).
    On CPU the table is in host memory already, and the model is returned unchanged."""
    embedding = getattr(model, "tok_embeddings", None)
    if not isinstance(embedding, nn.Embedding):
        raise ValueError(f"peft.embedding_on_host=true needs the native Llama-family model (its tok_embeddings "
                         f"table); {type(model).__name__} has none: set peft.embedding_on_host=false")
    weight = embedding.weight
    if weight.requires_grad:
        raise ValueError("peft.embedding_on_host=true: the token embedding is trainable here; it must be frozen "
                         "(peft.method=lora or dora freeze it): set peft.embedding_on_host=false")
    if getattr(model, "output", None) is not None and model.output.weight is weight:
        raise ValueError("peft.embedding_on_host=true: this model ties its output head to the embedding, and the "
                         "head's matmul reads the whole table every step: set peft.embedding_on_host=false")
    if weight.device.type != "cuda":
        return model
    embedding.weight = nn.Parameter(host_mapped(weight), requires_grad=False)
    return model
