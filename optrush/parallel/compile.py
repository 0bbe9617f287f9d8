"""torch.compile for the model: each transformer block (fast to compile) or the whole model.

    model = apply_compile(model, cfg)   # cfg.compile: mode none | blocks | model, dynamic, memory_budget

`blocks` compiles every block's `forward` with `fullgraph=True` (a graph break inside a block is a bug, e.g. a
kernel that dynamo cannot trace, and should fail loudly rather than silently run half eager). The blocks are
identical modules, so dynamo traces one graph and reuses it for all of them (parameters are graph inputs), and
compile time does not grow with depth. Compiling `forward` rather than the module call keeps the block's hooks
(activation offload) outside the graph. `model` compiles the whole forward, loss included (longer to compile,
lets inductor fuse across blocks and into the loss).

Shapes: packed batches are rows of exactly `data.max_length` tokens, so every step has the same shapes and nothing
recompiles after the first step. Padded (unpacked) batches vary in length; with `compile.dynamic=null` torch
compiles the first shape statically and, at the first different length, once more with a symbolic sequence length
that serves every later step (`true` starts symbolic, `false` recompiles per length until dynamo's cache limit and
then runs eager: avoid it with varying lengths).

Memory: `compile.memory_budget` < 1 hands AOTAutograd's min-cut partitioner a budget for what the forward graph
saves for backward, as a fraction between saving only the graph's inputs (0) and its fastest choice (1). It
recomputes what is cheapest per byte first: the norms', RoPE's and SwiGLU's pointwise outputs before any matmul.
That is activation checkpointing chosen op by op over the whole compiled graph, loss included. torch reads the
budget from a process-wide flag when it partitions a graph, so optrush's backend sets it around each of this
model's compiles only (recompiles included) and leaves other compiles in the process alone.
"""
from __future__ import annotations

import torch
from torch import nn

from optrush.config import Config


def apply_compile(model: nn.Module, cfg: Config) -> nn.Module:
    """Compile `model` in place as `cfg.compile` says (names and state_dict keys are unchanged); returns it."""
    mode, dynamic = cfg.compile.mode, cfg.compile.dynamic
    backend = "inductor" if cfg.compile.memory_budget == 1 else inductor_within_budget(cfg.compile.memory_budget)
    if mode == "blocks":
        for block in model.layers:
            block.forward = torch.compile(block.forward, backend=backend, dynamic=dynamic, fullgraph=True)
    elif mode == "model":
        model.compile(backend=backend, dynamic=dynamic)
    return model


def inductor_within_budget(memory_budget: float):
    """The inductor backend, partitioning forward and backward with `memory_budget` (see the module docstring)."""
    from torch._functorch import config as functorch_config
    from torch._inductor.compile_fx import compile_fx

    def backend(graph: torch.fx.GraphModule, example_inputs: list):
        with functorch_config.patch(activation_memory_budget=memory_budget):
            return compile_fx(graph, example_inputs)
    return backend
