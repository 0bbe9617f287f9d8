"""LoRA, rsLoRA, DoRA and LoRA+ as a model transform: low-rank adapters on chosen linear layers.

    model = apply_lora(model, cfg)            # cfg.peft: method lora|dora, r, alpha, dropout, target_modules, ...
    optimizer groups = lora_param_groups(model, lr=..., weight_decay=..., lora_plus_ratio=16.0)
    merge_lora(model); unmerge_lora(model)    # fold the adapters into the base weights and back
    with adapters_disabled(model): ...        # the base model alone (a DPO/GRPO reference at no extra memory)

Each targeted `nn.Linear` becomes a `LoRALinear` holding the same `weight`/`bias` (frozen) plus `lora_A` (r x in,
Kaiming-uniform as in PEFT) and `lora_B` (out x r, zeros), so the model computes exactly what it did before
training starts. Output: `x W^T + b + s * dropout(x) A^T B^T` with `s = alpha / r` (LoRA, arXiv:2106.09685) or
`alpha / sqrt(r)` (rsLoRA, arXiv:2312.03732). DoRA (arXiv:2402.09353) adds a magnitude vector `m` (one per output
feature, initialised to the row norms of W) and rescales: `y = m / ||W + s B A||_row * (x W^T + s dropout(x) A^T
B^T) + b`, the norm detached from the graph as the paper's section 4.3 and PEFT do. Every other parameter is frozen,
except a reward model's scalar head (optrush.objectives.reward): it starts random, so it trains in full beside the
adapters and is saved with them, as PEFT's `modules_to_save=["score"]` does for a SEQ_CLS model.
Names follow PEFT's semantics so `optrush.peft.export` can write adapters `peft.PeftModel` loads.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from optrush.config.schema import PeftConfig
from optrush.models import layers
from optrush.models.io import has_reward_head
from optrush.models.llama import Transformer
from optrush.peft.quant import QuantizedLinear, QuantizedWeight, linear

# HF module names (what PEFT's target_modules use) -> the attribute names of our blocks
HF_TO_OURS = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo",
              "gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
OURS_TO_HF = {ours: hf for hf, ours in HF_TO_OURS.items()}
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""`all-linear` as PEFT defines it: every linear layer of the blocks, not the output head. `lm_head` is refused
(optrush.config.checks): the training loss reads `output.weight` directly, fused or not, so an adapter there would
be bypassed (and the head may be tied to the embedding)."""


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (and, for DoRA, a magnitude vector). The frozen
    `weight` is a parameter, or a `QuantizedWeight` (QLoRA, optrush.peft.quant) dequantized per matmul."""

    def __init__(self, base: nn.Linear | QuantizedLinear, *, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, dora: bool = False):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r, self.alpha, self.rslora, self.dropout_p = r, alpha, rslora, dropout
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        kw = dict(device=self.weight.device, dtype=self.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default init of A
        # p=0 must not cost a copy of the input: Identity returns x itself
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_magnitude = nn.Parameter(self.row_norm(self.base_weight().detach())) if dora else None
        self.merged = False
        self.enabled = True
        """False: the layer computes its base linear alone (`adapters_disabled`)."""

    @staticmethod
    def row_norm(weight: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(weight.float(), dim=1).to(weight.dtype)

    def base_weight(self) -> torch.Tensor:
        """The frozen base weight in full precision (dequantized, as a temporary, when it is quantized)."""
        return self.weight.dequantize() if isinstance(self.weight, QuantizedWeight) else self.weight

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.enabled:
            return linear(x, self.weight, self.bias)
        low_rank = F.linear(self.dropout(x), self.lora_A)
        if self.lora_magnitude is None:
            return self.add_update(x, low_rank)
        update = F.linear(self.scaled(low_rank), self.lora_B)
        with torch.no_grad():  # detached (DoRA section 4.3), so the dequantized weight is not kept for backward
            norm = self.row_norm(self.base_weight() + self.delta_weight())
        out = (self.lora_magnitude / norm) * (linear(x, self.weight) + update)
        return out if self.bias is None else out + self.bias

    def add_update(self, x: torch.Tensor, low_rank: torch.Tensor) -> torch.Tensor:
        """The LoRA output (not DoRA) given `low_rank` = dropout(x) A^T."""
        return linear(x, self.weight, self.bias) + F.linear(self.scaled(low_rank), self.lora_B)

    def scaled(self, low_rank: torch.Tensor) -> torch.Tensor:
        """`low_rank` times the LoRA scaling. Scaling the r-wide product rather than the layer-wide update keeps the
        output's gradient the one the base matmul gets: scaled after B, the backward writes a second, scaled copy
        of every adapted layer's output gradient (two ffn-wide buffers more at a QLoRA MLP's backward peak,
        benchmarks/results/memory_peak.md)."""
        return low_rank if self.scaling == 1 else low_rank * self.scaling

    @property
    def shares_input(self) -> bool:
        """Whether `project_shared_input` may compute this layer's x A^T together with its siblings': an active
        LoRA (not DoRA) layer without dropout (a shared matmul would share the dropout mask too)."""
        return (self.enabled and not self.merged and self.lora_magnitude is None
                and isinstance(self.dropout, nn.Identity))

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The single weight that computes what this layer computes (without dropout)."""
        if self.merged:
            return self.weight.clone()
        weight = self.base_weight() + self.delta_weight()
        if self.lora_magnitude is not None:
            weight = weight * (self.lora_magnitude / self.row_norm(weight)).unsqueeze(1)
        return weight

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        if isinstance(self.weight, QuantizedWeight):
            raise ValueError("merge_lora: the base weights are quantized (peft.quantize); folding the adapters in "
                             "would re-quantize them and lose the update. Export with save_merged (optrush export "
                             "--merge), which dequantizes first")
        self._unmerged = self.weight.detach().clone()  # exact unmerge, also for DoRA's nonlinear rescaling
        self.weight.copy_(self.merged_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.weight.copy_(self._unmerged)
        del self._unmerged
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"scaling={self.scaling:g}, dora={self.lora_magnitude is not None}")


def project_shared_input(x: torch.Tensor, *linears: nn.Module) -> tuple[torch.Tensor, ...]:
    """`optrush.models.layers.project` for LoRA layers that read the same input (q/k/v, gate/up): their A matrices
    run as one matmul, so x is read once instead of once per layer in the forward pass, and backward computes one
    input gradient and one A gradient for the group instead of one each and a sum. The same maths as calling each
    layer; any layer that cannot share (`LoRALinear.shares_input`) makes the group fall back to that."""
    if not all(isinstance(layer, LoRALinear) and layer.shares_input for layer in linears):
        return layers.project(x, *linears)
    low_rank = F.linear(x, torch.cat([layer.lora_A for layer in linears]))
    parts = low_rank.split([layer.r for layer in linears], dim=-1)
    return tuple(layer.add_update(x, part) for layer, part in zip(linears, parts))


def target_names(targets: str | list[str]) -> set[str]:
    """Our attribute names for `peft.target_modules` (HF names, or `all-linear`)."""
    names = ALL_LINEAR if targets == "all-linear" else targets
    unknown = [n for n in names if n not in HF_TO_OURS]
    if unknown:
        raise ValueError(f"peft.target_modules: unknown module name(s) {unknown}; use all-linear or names from "
                         f"{', '.join(HF_TO_OURS)}")
    return {HF_TO_OURS[n] for n in names}


def apply_lora(model: nn.Module, cfg) -> nn.Module:
    """Freeze `model` (all but a reward head) and wrap its targeted linear layers in `LoRALinear`, in place. `cfg`
    is a `Config` (the transform signature) or a `PeftConfig`."""
    p: PeftConfig = cfg if isinstance(cfg, PeftConfig) else cfg.peft
    wanted = target_names(p.target_modules)
    for param in model.parameters():
        param.requires_grad_(False)
    if trains_reward_head(model):
        model.output.weight.requires_grad_(True)
    replaced = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in wanted and type(child) in (nn.Linear, QuantizedLinear):
                setattr(module, child_name, LoRALinear(child, r=p.r, alpha=p.alpha, dropout=p.dropout,
                                                       rslora=p.rslora, dora=p.method == "dora"))
                replaced += 1
    if replaced == 0:
        raise ValueError(f"peft.target_modules={p.target_modules!r} matched no linear layer of the model")
    for module in model.modules():
        if getattr(module, "project", None) is layers.project:
            module.project = project_shared_input
    return model


def trains_reward_head(model: nn.Module) -> bool:
    """The model scores sequences with a scalar head (apply_reward_head), which adapters alone cannot train."""
    return isinstance(model, Transformer) and has_reward_head(model)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The adapted layers by their module name (ours, e.g. `layers.0.attention.wq`)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def merge_lora(model: nn.Module) -> nn.Module:
    for layer in lora_layers(model).values():
        layer.merge()
    return model


def merge_lora_unless_quantized(model: nn.Module) -> nn.Module:
    """`merge_lora`, except over quantized base weights (QLoRA), which cannot take the adapters in (`merge`
    refuses): the model then runs through the unmerged adapters, as it trained."""
    if any(isinstance(layer.weight, QuantizedWeight) for layer in lora_layers(model).values()):
        return model
    return merge_lora(model)


def unmerge_lora(model: nn.Module) -> nn.Module:
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block `model` computes its base model alone: every adapter is bypassed, no weight is copied."""
    adapted = list(lora_layers(model).values())
    if not adapted:
        raise ValueError("adapters_disabled: the model has no LoRA adapters (peft.method must be lora or dora)")
    if any(layer.merged for layer in adapted):
        raise ValueError("adapters_disabled: the adapters are merged into the base weights; unmerge_lora first")
    for layer in adapted:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer in adapted:
            layer.enabled = True


def lora_param_groups(model: nn.Module, *, weight_decay: float, lora_plus_ratio: float) -> list[dict]:
    """Optimizer groups for an adapted model: A matrices (with a reward head, which trains in full and is decayed
    as full fine-tuning decays it), B matrices (learning rate x `lora_plus_ratio`, LoRA+, arXiv:2402.12354) and
    the rest (DoRA magnitudes, undecayed). Each group carries `lr_scale`, which `optrush.optim.optimizer`
    multiplies into the base learning rate."""
    a, b, other = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        leaf = name.rpartition(".")[2]
        (b if leaf == "lora_B" else a if leaf == "lora_A" or param.ndim >= 2 else other).append(param)
    groups = [{"params": a, "weight_decay": weight_decay, "lr_scale": 1.0},
              {"params": b, "weight_decay": weight_decay, "lr_scale": lora_plus_ratio},
              {"params": other, "weight_decay": 0.0, "lr_scale": 1.0}]
    return [g for g in groups if g["params"]]
