"""The optimizer: AdamW over two parameter groups (decayed matrices, undecayed vectors).

    optimizer = build_optimizer(model, cfg.optim, lr=cfg.train.lr, device_type=device.type)

Weight decay goes to every trainable parameter with two or more dimensions (attention/MLP matrices, the embedding
and the output head) and never to 1-D ones (RMSNorm gains, biases). Embeddings are decayed on purpose: it is what
nanoGPT (`configure_optimizers`) and the HF Trainer do, the rule is a single `ndim >= 2` test that needs no
module-name matching (so it works unchanged on LoRA adapters and FSDP2 DTensors), and with the default
`optim.weight_decay=0` the split costs nothing. Decaying norm gains would pull them towards 0, i.e. shrink the
activations they scale, so they are always excluded.
"""
from __future__ import annotations

import torch
from torch import nn

from optrush.config.schema import OptimConfig


def param_groups(model: nn.Module, *, weight_decay: float) -> list[dict]:
    """Trainable parameters split into `[decayed (ndim >= 2), undecayed (ndim < 2)]`; empty groups are dropped."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (every requires_grad is False); "
                         "check which weights peft or freezing left trainable")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig, *, lr: float, device_type: str,
                    lora_plus_ratio: float = 1.0) -> torch.optim.Optimizer:
    """AdamW for `model`'s trainable parameters; `device_type` ("cuda"/"cpu") picks the kernel when
    `cfg.fused` is None: the single fused kernel on CUDA, the multi-tensor (foreach) one on CPU. A model with
    LoRA adapters gets `optrush.peft.lora_param_groups` instead: the B matrices at `lr * lora_plus_ratio` (LoRA+)."""
    from optrush.peft.lora import has_lora, lora_param_groups

    if cfg.name != "adamw":
        raise ValueError(f"optim.name={cfg.name!r} is not a known optimizer; use optim.name=adamw")
    fused = device_type == "cuda" if cfg.fused is None else cfg.fused
    if has_lora(model):
        groups = lora_param_groups(model, weight_decay=cfg.weight_decay, lora_plus_ratio=lora_plus_ratio)
        groups = [{**g, "lr": lr * g.pop("lr_scale")} for g in groups]
    else:
        groups = param_groups(model, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused, foreach=not fused)
