"""Fused input projections: attention's q, k, v and the MLP's gate and up as one matmul each.

    model = apply_fused_projections(model)   # what optrush.kernels.apply_kernels does for kernels.fused_projections

Each group of linear layers that reads the same input runs as one matmul against its weights concatenated along
the output dimension, and the output is split back. One wide matmul instead of three (q: 2048 outputs, k and v:
512 each on the Llama-3.2-1B shape) keeps the GPU's matmul units busier, reads the input once, and in backward
gives the input gradient as one matmul instead of a matmul per layer plus their sum. The parameters stay the very
same objects under the same state-dict keys, so checkpoints, optimizers, FSDP2 and HF export see no difference.

The cost: the concatenated weights are a copy made in each forward, and the matmul keeps that copy for backward,
eager or compiled: one block's q/k/v and gate/up weights more per block, 80 MB a block in bf16 on the 1B shape
(1.3 GB for its 16 blocks), counted on CPU by the saved-tensor test in tests/test_kernels.py. Compiled, the
min-cut partitioner keeps it because backward's input-gradient matmul needs the concatenation materialized (it
never recomputes such a node); an autograd.Function that concatenates again in backward was tried, and under
compile the copy was still kept. Under full activation checkpointing the copy lives only within its block's
recompute. Its speed on a GPU is still to be measured (benchmarks/train_speed.py's `*fused_projections*` configs).

Only plain `nn.Linear` groups are fused: LoRA layers share their input through their own `project`
(optrush.peft.lora), and FP8 or quantized linears multiply with their own kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from optrush.models import layers


def fused_project(x: torch.Tensor, *linears: nn.Module) -> tuple[torch.Tensor, ...]:
    """`optrush.models.layers.project` (same signature, same maths) as one matmul over the concatenated weights."""
    if not all(type(linear) is nn.Linear for linear in linears):
        return layers.project(x, *linears)
    weight = torch.cat([linear.weight for linear in linears])
    biases = [linear.bias for linear in linears]
    bias = None if biases[0] is None else torch.cat(biases)
    return F.linear(x, weight, bias).split([linear.out_features for linear in linears], dim=-1)


def apply_fused_projections(model: nn.Module) -> nn.Module:
    """Give every module that projects one input through several linears (`project`) the fused version; in place."""
    for module in model.modules():
        if getattr(module, "project", None) is layers.project:
            module.project = fused_project
    return model
