"""torchao's 8-bit and 4-bit AdamW, with the small tensors stepped together in full precision.

    opt = AdamW8bit(groups, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, min_numel=2**20)    # or AdamW4bit

Why: torchao's `_AdamBase.step` calls `torch.compile(single_param_adam)` once per parameter on every step, and
each call costs about 0.45 ms of dispatch and guard checks whatever the tensor's size. A 1B model with LoRA r=16 on
every linear has 224 small adapter factors: about 0.1 s per step, which took the 1B ladder's QLoRA rung on an H100
(B=4x2048, an earlier run) from 62.0k to 35.6k tokens/s against fused AdamW, for 0.06 GiB of optimizer memory saved.

What: a tensor of fewer than `min_numel` elements (`optim.low_bit_min_numel`, default 2**20, where 8-bit moments
would save at most 6 MiB) gets plain moment buffers like the ones torchao itself keeps for tensors under 4096
elements (`torch.zeros_like(p)`: the parameter's dtype). Every parameter of a group whose state is plain (torchao's
own small ones included) is then stepped with the others in a handful of multi-tensor `torch._foreach_*` kernels,
with the math of torchao's `single_param_adam`: computed in fp32 whatever the storage dtype, decoupled weight decay,
bias-corrected moments, and stochastic rounding into bf16 weights when `bf16_stochastic_round` is set (optrush's
`stochastic_round`: the same rule as torchao's, applied once to all the small tensors concatenated). Larger tensors
keep torchao's quantized state and its compiled per-parameter step function, wrapped by `torch.compile` once per
optimizer instead of once per tensor per step.

The path is chosen by each parameter's state, not by its size, and the parameter groups are the caller's: the state
layout ("step", "exp_avg", "exp_avg_sq" per parameter) is torchao's, so optrush checkpoints and DCP's
`get_optimizer_state_dict` under FSDP2 save and load as before, including checkpoints written by torchao's own
classes or with another `min_numel`.

FSDP2: parameters, gradients and states may be DTensors with equal placements. The update is elementwise, so the
multi-tensor step works on each rank's local shards. The size test uses the global element count, so every rank
makes the same choice and DCP sees one state layout.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
import torchao.optim
from torch.distributed.tensor import DTensor
from torchao.optim.adam import single_param_adam

from optrush.optim.bf16 import stochastic_round


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def as_fp32(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """`tensors` (one dtype) in fp32: the list itself when already fp32, else fp32 copies made by one multi-tensor
    copy."""
    if tensors[0].dtype == torch.float32:
        return tensors
    copies = [torch.empty_like(t, dtype=torch.float32) for t in tensors]
    torch._foreach_copy_(copies, tensors)
    return copies


class SmallTensorsTogether:
    """Mixin over a torchao `_AdamBase` AdamW: plain state for tensors under `min_numel` elements and one
    multi-tensor step for every parameter with plain state (see the module docstring)."""

    def __init__(self, params, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float = 0.0,
                 bf16_stochastic_round: bool = False, min_numel: int):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         bf16_stochastic_round=bf16_stochastic_round)
        self.min_numel = min_numel
        # made once: torchao wraps single_param_adam anew for every tensor on every step, which costs 3x the
        # dispatch of calling one wrapper (measured on CPU: 0.34 vs 0.10 ms per tensor); the compiled graphs are
        # dynamo's, cached per shape either way
        self.compiled_step = torch.compile(single_param_adam, fullgraph=True, dynamic=False)

    def new_moment(self, p: torch.Tensor, *, signed: bool) -> torch.Tensor:
        """A zero moment buffer for `p`: plain under `min_numel` elements, else as torchao makes it."""
        if p.numel() < self.min_numel:
            return torch.zeros_like(p.detach())
        return self._new_buffer(p, signed)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else torch.enable_grad()(closure)()
        # as in torchao: the compiled step's argument combinations are few and fixed, so no cache-limit thrashing
        with torch._dynamo.utils.disable_cache_limit():
            for group in self.param_groups:
                together = defaultdict(list)
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self.state[p]
                    if not state:
                        state["step"] = torch.tensor(0.0)
                        state["exp_avg"] = self.new_moment(p, signed=True)
                        state["exp_avg_sq"] = self.new_moment(p, signed=False)
                    if type(local(state["exp_avg"])) is torch.Tensor:
                        together[(p.device, p.dtype, p.grad.dtype)].append(p)
                    else:
                        self.step_quantized(p, state, group)
                for params in together.values():
                    self.step_together(params, group)
        return loss

    def step_quantized(self, p: torch.Tensor, state: dict, group: dict) -> None:
        """torchao's own step function, compiled, on one parameter with quantized state."""
        state["step"] += 1
        # p.detach(), as torchao does: compiling with an FSDP2 DTensor parameter that has .grad can fail
        # (https://github.com/pytorch/ao/issues/652#issuecomment-2285040894); the gradient is passed separately
        self.compiled_step(
            p.detach(), p.grad, state["step"], state["exp_avg"], state["exp_avg_sq"], None, group["lr"],
            group["betas"][0], group["betas"][1], group["weight_decay"], group["eps"], self.is_adamw,
            self.bf16_stochastic_round and p.dtype is torch.bfloat16)

    def step_together(self, params: list[torch.Tensor], group: dict) -> None:
        """One AdamW step of `params` (plain state; one device, dtype and gradient dtype) in multi-tensor kernels:
        the math of torchao's `single_param_adam`, in fp32."""
        beta1, beta2 = group["betas"]
        lr, weight_decay = float(group["lr"]), group["weight_decay"]
        states = [self.state[p] for p in params]
        steps = [s["step"] for s in states]  # fp32 scalars on the CPU, as torchao makes them
        torch._foreach_add_(steps, 1.0)
        counts = [s.item() for s in steps]
        weights = [local(p.detach()) for p in params]
        exp_avgs = [local(s["exp_avg"]) for s in states]
        exp_avg_sqs = [local(s["exp_avg_sq"]) for s in states]
        p32, m32, v32 = as_fp32(weights), as_fp32(exp_avgs), as_fp32(exp_avg_sqs)
        g32 = as_fp32([local(p.grad) for p in params])

        if weight_decay:
            torch._foreach_mul_(p32, 1 - lr * weight_decay)
        torch._foreach_lerp_(m32, g32, 1 - beta1)
        torch._foreach_lerp_(v32, torch._foreach_mul(g32, g32), 1 - beta2)
        denom = torch._foreach_sqrt(v32)
        torch._foreach_div_(denom, [math.sqrt(1 - beta2 ** n) for n in counts])
        torch._foreach_add_(denom, group["eps"])
        torch._foreach_addcdiv_(p32, m32, denom, [-lr / (1 - beta1 ** n) for n in counts])

        # fp32 storage was updated in place; other storage gets the fp32 result rounded to nearest, as torchao's
        # copy_ does, or stochastically rounded weights (one random draw for all the tensors, concatenated)
        for stored, new in ((exp_avgs, m32), (exp_avg_sqs, v32)):
            if new is not stored:
                torch._foreach_copy_(stored, new)
        if p32 is not weights:
            if self.bf16_stochastic_round and weights[0].dtype is torch.bfloat16:
                rounded = stochastic_round(torch.cat([t.flatten() for t in p32]))
                p32 = [r.view_as(w) for r, w in zip(rounded.split([w.numel() for w in weights]), weights)]
            torch._foreach_copy_(weights, p32)


class AdamW8bit(SmallTensorsTogether, torchao.optim.AdamW8bit):
    pass


class AdamW4bit(SmallTensorsTogether, torchao.optim.AdamW4bit):
    pass


def state_split(params: list[torch.Tensor], *, name: str, min_numel: int) -> str:
    """One line saying which of `params` get low-bit moments and which plain ones, stepped together."""
    # torchao itself quantizes only tensors of 4096+ elements (bitsandbytes' rule)
    large = [p for p in params if p.numel() >= max(min_numel, 4096)]
    n_large, n_all = sum(p.numel() for p in large), sum(p.numel() for p in params)
    return (f"optimizer {name}: {len(large)} tensors ({n_large / 1e6:.2f}M parameters) with low-bit moments; "
            f"{len(params) - len(large)} smaller ones ({(n_all - n_large) / 1e6:.2f}M) with moments in their own "
            f"dtype, stepped together (optim.low_bit_min_numel={min_numel})")
