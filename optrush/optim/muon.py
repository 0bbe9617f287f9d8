"""Muon for the hidden matrices, AdamW for everything else, as one optimizer.

    groups = muon_groups(model, base_groups)        # splits each group into {"muon": True} and {"muon": False}
    opt = Muon(groups, lr=3e-4, momentum=0.95, betas=(0.9, 0.95), eps=1e-8)

Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/) replaces each 2-D hidden weight's momentum
update by the nearest semi-orthogonal matrix, computed with five steps of a quintic Newton-Schulz iteration in bf16:
every direction of the update then moves by about the same amount. Embeddings, the output head, norm gains and
biases are not hidden matrices and take the AdamW rule.

One learning rate serves both rules: the orthogonalised update is scaled by 0.2 * sqrt(max(rows, cols)), which
gives it the RMS of a typical AdamW update ("Muon is Scalable for LLM Training", arXiv:2502.16982, section 2.2),
so `train.lr` and `optim.weight_decay` carry over from AdamW. torch.optim.Muon (torch >= 2.9) handles 2-D
parameters only, so the loop would need two optimizers; this module keeps one.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from optrush.optim.adamw import adamw_new_value
from optrush.optim.bf16 import MixedDtypeOptimizer, state_buffer

# Coefficients of the quintic iteration tuned to push singular values into about [0.7, 1.2] in five steps
# (Jordan et al.): faster than converging exactly to 1, and the spread does not hurt training.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
HIDDEN = re.compile(r"(^|\.)layers\.")


def orthogonalize(g: torch.Tensor, *, steps: int) -> torch.Tensor:
    """Approximately U V^T for g = U S V^T (the orthogonal polar factor), by Newton-Schulz iteration in bf16."""
    a, b, c = NS_COEFFICIENTS
    x = g.bfloat16()
    tall = g.size(0) > g.size(1)
    if tall:  # iterate on the wide orientation: X X^T is then the smaller Gram matrix
        x = x.mT
    x = x / (x.norm() + 1e-7)  # spectral norm <= Frobenius norm <= 1: inside the iteration's basin
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


def muon_groups(model: nn.Module, groups: list[dict]) -> list[dict]:
    """Split each parameter group into its hidden matrices (2-D weights inside `model.layers`, LoRA factors
    included), flagged `muon=True`, and the rest, flagged `muon=False`; empty groups are dropped."""
    hidden = {id(p) for name, p in model.named_parameters() if p.ndim == 2 and HIDDEN.search(name)}
    split = []
    for group in groups:
        for flag in (True, False):
            params = [p for p in group["params"] if (id(p) in hidden) == flag]
            if params:
                split.append({**group, "params": params, "muon": flag})
    return split


class Muon(MixedDtypeOptimizer):
    def __init__(self, params, *, lr: float, momentum: float = 0.95, ns_steps: int = 5,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 state_dtype: torch.dtype | None = None, bf16_update: str = "plain"):
        defaults = {"lr": lr, "momentum": momentum, "ns_steps": ns_steps, "betas": tuple(betas), "eps": eps,
                    "weight_decay": weight_decay, "muon": False}
        super().__init__(params, defaults, state_dtype=state_dtype, bf16_update=bf16_update)

    def new_value(self, p: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        if group["muon"]:
            return self.muon_new_value(p, state, group)
        return adamw_new_value(p, p.grad, state, lr=group["lr"], betas=group["betas"], eps=group["eps"],
                               weight_decay=group["weight_decay"], state_dtype=self.state_dtype)

    def muon_new_value(self, p: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        """Nesterov momentum, orthogonalised, RMS-matched to AdamW; returns the new weight in fp32."""
        if not state:
            state["momentum_buffer"] = state_buffer(p, self.state_dtype)
        g = p.grad.float()
        buf = state["momentum_buffer"].float().lerp_(g, 1 - group["momentum"])
        state["momentum_buffer"].copy_(buf)
        update = orthogonalize(g.lerp(buf, group["momentum"]), steps=group["ns_steps"]).float()
        scale = 0.2 * max(p.shape) ** 0.5
        return (p.float() * (1 - group["lr"] * group["weight_decay"])).add_(update, alpha=-group["lr"] * scale)
