"""Schedule-free AdamW: no decay schedule to tune; evaluate and save an average of the iterates.

    opt = ScheduleFreeAdamW(groups, lr=1e-3, betas=(0.9, 0.95))
    ...train steps...
    with optimizer_eval_mode(opt):     # around evaluation and the final save (a no-op for other optimizers)
        evaluate(model); save(model)

Defazio et al., "The Road Less Scheduled", arXiv:2405.15682. Three sequences: z takes plain AdamW-normalised steps,
x is a weighted running average of z (weights lr_t^2, so a warmup's small steps count little), and gradients are
taken at y = (1 - beta1) z + beta1 x. Training keeps y in the model's parameters and z in the optimizer state;
evaluation wants x, which `eval()` computes into the parameters (stashing y) and `train()` puts y back exactly, so
evaluating mid-run leaves the training trajectory bit-for-bit unchanged. Checkpoints hold y and z: resume is exact.

Use it with train.schedule=constant (train.warmup_steps still applies). The averaging weights live in each param
group (`k`, `lr_max`, `weight_sum`), so they are saved with the optimizer state.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from optrush.optim.bf16 import MixedDtypeOptimizer, state_buffer, write_param_


class ScheduleFreeAdamW(MixedDtypeOptimizer):
    def __init__(self, params, *, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, state_dtype: torch.dtype | None = None, bf16_update: str = "plain"):
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "k": 0, "lr_max": 0.0,
                    "weight_sum": 0.0}
        super().__init__(params, defaults, state_dtype=state_dtype, bf16_update=bf16_update)
        self.training = True
        self.train_weights: dict[torch.Tensor, torch.Tensor] = {}
        """y of every parameter while in eval mode (never saved: checkpoints are taken in train mode)."""

    @torch.no_grad()
    def step(self, closure=None):
        if not self.training:
            raise RuntimeError("ScheduleFreeAdamW.step() in eval mode: leave `optimizer_eval_mode` before training")
        loss = None if closure is None else torch.enable_grad()(closure)()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, k = group["lr"], group["k"]
            group["lr_max"] = max(lr, group["lr_max"])
            weight = group["lr_max"] ** 2
            group["weight_sum"] += weight
            ckp1 = weight / group["weight_sum"]  # this step's share of the average x
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "z" not in state:
                    state["z"] = p.detach().to(self.state_dtype or p.dtype, copy=True)
                    state["exp_avg_sq"] = state_buffer(p, self.state_dtype)
                g = p.grad.float()
                exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
                state["exp_avg_sq"].copy_(exp_avg_sq)
                y, z = p.float(), state["z"].float()
                step = g / (exp_avg_sq / (1 - beta2 ** (k + 1))).sqrt_().add_(group["eps"])
                step.add_(y, alpha=group["weight_decay"])
                # new y = (1 - beta1) z' + beta1 x' written in terms of the old y and z (the paper's eq. 2 folded)
                new_y = y.lerp(z, ckp1).add_(step, alpha=lr * (beta1 * (1 - ckp1) - 1))
                state["z"].copy_(z.sub_(step, alpha=lr))
                write_param_(p, new_y, state, rule=self.bf16_update)
            group["k"] = k + 1
        return loss

    @torch.no_grad()
    def eval(self) -> None:
        """Put x (the average) into the parameters, keeping y aside."""
        if not self.training:
            return
        for group in self.param_groups:
            beta1 = group["betas"][0]
            for p in group["params"]:
                if "z" in self.state[p]:
                    self.train_weights[p] = p.detach().clone()
                    p.copy_(p.float().lerp(self.state[p]["z"].float(), 1 - 1 / beta1))
        self.training = False

    @torch.no_grad()
    def train(self) -> None:
        """Put y back, bit for bit."""
        for p, y in self.train_weights.items():
            p.copy_(y)
        self.train_weights.clear()
        self.training = True


@contextmanager
def optimizer_eval_mode(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """The weights to evaluate or save inside the block: schedule-free's average x; other optimizers' weights
    are already the ones to use, and nothing changes."""
    if not isinstance(optimizer, ScheduleFreeAdamW):
        yield
        return
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()
