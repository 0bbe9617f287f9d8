"""AdamW whose moment buffers have their own dtype and whose bf16 weight writes can be compensated or stochastic.

    opt = AdamW(groups, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, state_dtype=torch.bfloat16, bf16_update="kahan")

`build_optimizer` picks it over `torch.optim.AdamW` only when torch's cannot do the job: a moment dtype other
than the parameters' (`optim.state_dtype`) or a bf16 write rule other than plain (`optim.bf16_update`). The update
is computed in fp32 whatever the storage dtypes, one parameter at a time (no fused kernel: torch's fused AdamW stays
the fast default). Same math as torch.optim.AdamW (decoupled weight decay, bias-corrected moments).
"""
from __future__ import annotations

import torch

from optrush.optim.bf16 import MixedDtypeOptimizer, state_buffer


def adamw_new_value(p: torch.Tensor, grad: torch.Tensor, state: dict, *, lr: float, betas: tuple[float, float],
                    eps: float, weight_decay: float, state_dtype: torch.dtype | None) -> torch.Tensor:
    """Advance `state` (step, exp_avg, exp_avg_sq) by one AdamW step and return the new weight in fp32."""
    if not state:
        state["step"] = torch.tensor(0.0)
        state["exp_avg"] = state_buffer(p, state_dtype)
        state["exp_avg_sq"] = state_buffer(p, state_dtype)
    state["step"] += 1
    step = state["step"].item()
    beta1, beta2 = betas
    g = grad.float()
    # .float() is the buffer itself when it is fp32 (updated in place), a temporary copy when bf16 (copied back)
    exp_avg = state["exp_avg"].float().lerp_(g, 1 - beta1)
    exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
    state["exp_avg"].copy_(exp_avg)
    state["exp_avg_sq"].copy_(exp_avg_sq)
    denom = (exp_avg_sq / (1 - beta2 ** step)).sqrt_().add_(eps)
    new = p.float() * (1 - lr * weight_decay)
    return new.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** step))


class AdamW(MixedDtypeOptimizer):
    def __init__(self, params, *, lr: float, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, state_dtype: torch.dtype | None = None, bf16_update: str = "plain"):
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults, state_dtype=state_dtype, bf16_update=bf16_update)

    def new_value(self, p: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        return adamw_new_value(p, p.grad, state, lr=group["lr"], betas=group["betas"], eps=group["eps"],
                               weight_decay=group["weight_decay"], state_dtype=self.state_dtype)
