"""Optimizer state in CPU memory (`optim.offload=true`): torchao's CPUOffloadOptimizer behind torch's Optimizer type.

    opt = CPUOffload(groups, torch.optim.AdamW, lr=3e-4, fused=True)

Each weight of at least `minimal_size` elements gets a pinned CPU copy; its gradient is copied to the CPU as soon as
backward produces it (overlapping the rest of backward), the optimizer steps on the CPU, and the new weight is
copied back. GPU memory then holds no optimizer state (8 bytes per parameter for AdamW), at the cost of a CPU step
and the PCIe traffic. Small tensors (norm gains, biases) stay on the GPU with an on-device optimizer.

torchao's class is not a `torch.optim.Optimizer`, which LR schedulers insist on; this subclass hands the scheduler
the inner optimizers' own parameter-group dicts, so learning-rate changes reach them, and forwards the rest.
CUDA only (torchao's own restriction).
"""
from __future__ import annotations

import torch


class CPUOffload(torch.optim.Optimizer):
    def __init__(self, groups: list[dict], optimizer_class: type[torch.optim.Optimizer], **kwargs):
        from torchao.optim import CPUOffloadOptimizer

        self.inner = CPUOffloadOptimizer(groups, optimizer_class, **kwargs)
        super().__init__(self.inner.param_groups, {})

    @torch.no_grad()
    def step(self, closure=None):
        return self.inner.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.inner.load_state_dict(state_dict)
