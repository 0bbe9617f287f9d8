"""The optimizer named by `optim.name`, over decayed/undecayed parameter groups (LoRA+ groups with adapters).

    optimizer = build_optimizer(model, cfg.optim, lr=cfg.train.lr, device_type=device.type)

| optim.name          | implementation                                   | state per parameter            |
|---------------------|--------------------------------------------------|--------------------------------|
| adamw               | torch.optim.AdamW (fused on CUDA, foreach on CPU) | 2 x param dtype                |
| adamw8bit/adamw4bit | optrush.optim.low_bit.AdamW8bit / AdamW4bit      | 2 x 1 byte / 2 x 0.5 byte (*)  |
| adafactor           | torch.optim.Adafactor                            | row + column second moments    |
| lion                | optrush.optim.lion.Lion                          | 1 x state dtype                |
| muon                | optrush.optim.muon.Muon (AdamW for non-hidden)   | 1 (hidden) or 2 x state dtype  |
| schedule_free_adamw | optrush.optim.schedule_free.ScheduleFreeAdamW    | 2 x state dtype (z, v)         |

(*) torchao's quantized moments for tensors of `optim.low_bit_min_numel` (default 2**20) elements or more; smaller
tensors (LoRA adapters, norms) keep 2 x param dtype and are stepped together (optrush.optim.low_bit says why).

`optim.state_dtype` sets the dtype of the moment buffers (default: the parameters' own) and `optim.bf16_update`
how an update is written into bf16 weights (optrush.optim.bf16); an adamw run that needs either gets
optrush.optim.adamw.AdamW instead of torch's. `optim.offload=true` wraps the optimizer in
optrush.optim.offload.CPUOffload (CUDA only).

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

from optrush.config.checks import optimizer_problems
from optrush.config.schema import OptimConfig
from optrush.optim.adamw import AdamW
from optrush.optim.bf16 import STATE_DTYPES
from optrush.optim.lion import Lion
from optrush.optim.muon import Muon, muon_groups
from optrush.optim.offload import CPUOffload
from optrush.optim.schedule_free import ScheduleFreeAdamW
from optrush.parallel.distributed import is_main

OPTIMIZERS = ("adamw", "adamw8bit", "adamw4bit", "adafactor", "lion", "muon", "schedule_free_adamw")


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
    """The `cfg.name` optimizer for `model`'s trainable parameters. `device_type` ("cuda"/"cpu") picks torch
    AdamW's kernel when `cfg.fused` is None: the single fused kernel on CUDA, the multi-tensor (foreach) one on CPU.
    A model with LoRA adapters gets `optrush.peft.lora_param_groups` instead: the B matrices at
    `lr * lora_plus_ratio` (LoRA+)."""
    from optrush.peft.lora import has_lora, lora_param_groups

    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"optim.name={cfg.name!r} is not a known optimizer; use one of {', '.join(OPTIMIZERS)}")
    problems = optimizer_problems(cfg)
    if problems:
        raise ValueError("; ".join(problems))
    if has_lora(model):
        groups = lora_param_groups(model, weight_decay=cfg.weight_decay, lora_plus_ratio=lora_plus_ratio)
        groups = [{**g, "lr": lr * g.pop("lr_scale")} for g in groups]
    else:
        groups = param_groups(model, weight_decay=cfg.weight_decay)
    if cfg.name == "muon":
        groups = muon_groups(model, groups)
    params = [p for g in groups for p in g["params"]]
    optimizer_class, kwargs = optimizer_choice(cfg, params, device_type=device_type)
    if cfg.name in ("adamw8bit", "adamw4bit") and is_main():
        from optrush.optim.low_bit import state_split

        print(state_split(params, name=cfg.name, min_numel=cfg.low_bit_min_numel), flush=True)
    if cfg.offload:
        if device_type != "cuda":
            raise ValueError("optim.offload=true moves optimizer state from the GPU to the CPU: it needs a CUDA "
                             "device; set optim.offload=false")
        return CPUOffload(groups, optimizer_class, lr=lr, **kwargs)
    return optimizer_class(groups, lr=lr, **kwargs)


def optimizer_choice(cfg: OptimConfig, params: list[torch.Tensor], *,
                     device_type: str) -> tuple[type[torch.optim.Optimizer], dict]:
    """The optimizer class for `cfg` and its keyword arguments other than the groups and lr."""
    state_dtype = STATE_DTYPES[cfg.state_dtype] if cfg.state_dtype else None
    own = {"state_dtype": state_dtype, "bf16_update": cfg.bf16_update}
    betas = tuple(cfg.betas)
    if cfg.name == "adamw":
        if cfg.bf16_update == "plain" and all(state_dtype in (None, p.dtype) for p in params):
            fused = device_type == "cuda" if cfg.fused is None else cfg.fused
            return torch.optim.AdamW, {"betas": betas, "eps": cfg.eps, "fused": fused, "foreach": not fused}
        if cfg.fused:
            raise ValueError(f"optim.fused=true: torch's fused AdamW keeps its moments in the weights' dtype and "
                             f"rounds to nearest, so it cannot honour optim.state_dtype={cfg.state_dtype} / "
                             f"optim.bf16_update={cfg.bf16_update}; set optim.fused=null")
        return AdamW, {"betas": betas, "eps": cfg.eps, **own}
    if cfg.name in ("adamw8bit", "adamw4bit"):
        from optrush.optim.low_bit import AdamW4bit, AdamW8bit

        low_bit = AdamW8bit if cfg.name == "adamw8bit" else AdamW4bit
        return low_bit, {"betas": betas, "eps": cfg.eps, "bf16_stochastic_round": cfg.bf16_update == "stochastic",
                         "min_numel": cfg.low_bit_min_numel}
    if cfg.name == "adafactor":
        return torch.optim.Adafactor, {"foreach": True}
    if cfg.name == "lion":
        return Lion, {"betas": betas, **own}
    if cfg.name == "muon":
        return Muon, {"momentum": cfg.momentum, "ns_steps": cfg.ns_steps, "betas": betas, "eps": cfg.eps, **own}
    return ScheduleFreeAdamW, {"betas": betas, "eps": cfg.eps, **own}
