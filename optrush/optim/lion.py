"""Lion: the sign of an interpolated momentum, one state buffer per weight (half of AdamW's).

    opt = Lion(groups, lr=3e-5, betas=(0.9, 0.99), weight_decay=0.1)

Chen et al., "Symbolic Discovery of Optimization Algorithms", arXiv:2302.06675, Algorithm 2:

    c = beta1 * m + (1 - beta1) * g
    w = w * (1 - lr * wd) - lr * sign(c)
    m = beta2 * m + (1 - beta2) * g

Every update entry is +-lr, so its norm is larger than AdamW's: the paper uses a 3-10x smaller learning rate and a
3-10x larger weight decay than AdamW. The arithmetic runs as multi-tensor (`torch._foreach_*`) ops over each
parameter group in fp32 (fp32 buffers are updated in place; bf16 ones through fp32 copies).
"""
from __future__ import annotations

import torch

from optrush.optim.bf16 import MixedDtypeOptimizer, state_buffer, write_param_


class Lion(MixedDtypeOptimizer):
    def __init__(self, params, *, lr: float, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0,
                 state_dtype: torch.dtype | None = None, bf16_update: str = "plain"):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay},
                         state_dtype=state_dtype, bf16_update=bf16_update)

    @torch.no_grad()
    def step(self, closure=None):
        """Multi-tensor over each group (rather than the base class's one parameter at a time)."""
        loss = None if closure is None else torch.enable_grad()(closure)()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            beta1, beta2 = group["betas"]
            lr, wd = group["lr"], group["weight_decay"]
            for p in params:
                if not self.state[p]:
                    self.state[p]["exp_avg"] = state_buffer(p, self.state_dtype)
            grads = [p.grad.float() for p in params]
            moms = [self.state[p]["exp_avg"].float() for p in params]
            signs = torch._foreach_lerp(moms, grads, 1 - beta1)
            torch._foreach_sign_(signs)
            news = torch._foreach_mul([p.float() for p in params], 1 - lr * wd)
            torch._foreach_add_(news, signs, alpha=-lr)
            torch._foreach_lerp_(moms, grads, 1 - beta2)
            for p, m, new in zip(params, moms, news):
                self.state[p]["exp_avg"].copy_(m)  # a no-op copy onto itself for fp32 buffers
                write_param_(p, new, self.state[p], rule=self.bf16_update)
        return loss
