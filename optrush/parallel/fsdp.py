"""Data parallelism: FSDP2 sharding (`fsdp`, `hsdp`) and replication (`ddp`) of a model over a device mesh.

    dist = init_distributed(cfg.parallel, device=device)       # optrush.parallel.distributed
    model = apply_data_parallel(model, cfg)                      # the `shard` step, last of apply_optimizations
    plain = gather_full_model(model, like=meta_copy_taken_before_sharding)   # rank 0: a plain model to save

`fsdp` (ZeRO-3, or ZeRO-2 with `parallel.reshard_after_forward=false`): `fully_shard` (FSDP2) on every transformer
block and then on the root, which holds the embedding, final norm and LM head (tied weights stay in one unit).
Each parameter becomes a DTensor sharded on dim 0 over the mesh; a block's parameters are all-gathered just before
its forward (and again before its backward when resharded after forward) and its gradients reduce-scattered after
its backward, so each rank holds 1/N of the weights, gradients and optimizer state. `hsdp` shards over the mesh's
`dp_shard` dimension and all-reduces gradients over `dp_replicate`. Mixed precision is FSDP2's
MixedPrecisionPolicy: with precision.mode=bf16_mixed (or fp8) the gathered parameters are bf16 while the sharded
master weights and the optimizer stay fp32; gradients are reduced in `parallel.reduce_dtype`.
`parallel.cpu_offload` keeps the sharded parameters, gradients and optimizer step on the CPU (CPUOffloadPolicy).

`ddp`: the module is replicated (torch's composable `replicate`, i.e. DistributedDataParallel without a wrapper
class, so `model.layers` and every attribute stay where they were); gradients are all-reduced in buckets
overlapping the backward pass.

The transforms before this one (LoRA, kernels, activation checkpointing, per-block compile) act inside the blocks,
so sharding composes with them as in torchtitan's `parallelize_llama`; with LoRA a block's frozen base weights and
its trainable adapters share one FSDP unit (FSDP2 allows mixed requires_grad within a unit). A quantized base
(QLoRA) is sharded the same way: its integer codes are frozen parameters (optrush.peft.quant), all-gathered with the
block's adapters in one collective (FSDP2 gathers mixed dtypes as bytes and casts only floating-point parameters to
the MixedPrecisionPolicy's dtype), so each rank holds 1/N of the NF4 base.

CPU: FSDP2 `fully_shard`, HSDP and `replicate` all run on CPU processes over gloo (verified with torch 2.13),
which is how tests/test_distributed.py checks them; `cpu_offload` needs CUDA (it moves shards between GPU and host).
Gradients are reduced after every micro-batch (no `set_requires_gradient_sync(False)` during accumulation: under
FSDP that would keep whole unsharded gradients until the last micro-batch).
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from optrush.config import Config, ConfigError
from optrush.models.llama import Transformer
from optrush.parallel.distributed import build_mesh

REDUCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def apply_data_parallel(model: nn.Module, cfg: Config) -> nn.Module:
    """The `shard` step: ddp, fsdp or hsdp as `cfg.parallel.strategy` says, over the mesh of the process group
    `init_distributed` joined; returns the model."""
    device_type = next(model.parameters()).device.type
    mesh = build_mesh(cfg.parallel, device_type=device_type, world_size=dist.get_world_size())
    if cfg.parallel.strategy == "ddp":
        return apply_ddp(model, cfg, mesh)
    return apply_fsdp(model, cfg, mesh)


def apply_fsdp(model: nn.Module, cfg: Config, mesh: DeviceMesh) -> nn.Module:
    """FSDP2 `fully_shard` on each block of `model.layers`, then on the root; sharded in place, returns it."""
    if not isinstance(model, Transformer):
        raise ConfigError(f"parallel.strategy={cfg.parallel.strategy} shards optrush's native Transformer per block; "
                          f"this model is a {type(model).__name__} (an architecture loaded through transformers): "
                          "use parallel.strategy=ddp")
    p = cfg.parallel
    bf16_compute = cfg.precision.autocast
    settings = {
        "mesh": mesh,
        "mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16_compute else None,
                                          reduce_dtype=REDUCE_DTYPES[p.reduce_dtype]),
        "offload_policy": CPUOffloadPolicy() if p.cpu_offload else OffloadPolicy(),
    }
    for block in model.layers:
        fully_shard(block, reshard_after_forward=p.reshard_after_forward, **settings)
    # the root's parameters (embedding, norm, head) are needed first in backward: keeping them gathered after the
    # forward saves one all-gather per step at the memory of those few tensors (FSDP2's own default for the root)
    fully_shard(model, reshard_after_forward=False, **settings)
    return model


def apply_ddp(model: nn.Module, cfg: Config, mesh: DeviceMesh) -> nn.Module:
    """Replicate `model` over `mesh` (gradients all-reduced in backward); in place, returns it."""
    from torch.distributed._composable.replicate import replicate  # torch's own composable DDP

    # broadcast_buffers=False: the only buffers are RoPE tables, equal on every rank; broadcasting them would add a
    # collective to every forward, which would hang when ranks run different numbers of forwards (generation).
    # torch 2.13 deprecates it for forward_sync_buffers, which older torch (2.9+ is supported) lacks: its warning
    # would only repeat, once per rank, a choice made here on purpose. A filter, not a catch_warnings block: the
    # DistributedDataParallel that warns is built at the first forward
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
    replicate(model, device_mesh=mesh, broadcast_buffers=False)
    if cfg.parallel.reduce_dtype == "bf16":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook

        model.register_comm_hook(None, bf16_compress_hook)
    return model


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model`'s module tree whose parameters and buffers are on the meta device (no memory): the plain
    structure `gather_full_model` later fills. Take it before sharding."""
    memo: dict[int, object] = {}
    for param in model.parameters():
        memo[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
    for buffer in model.buffers():
        memo[id(buffer)] = torch.empty_like(buffer, device="meta")
    return copy.deepcopy(model, memo)


def gather_full_model(model: nn.Module, *, like: Transformer) -> Transformer | None:
    """Collective (every rank calls it): gather the sharded `model`'s full state dict onto rank 0's CPU, tensor by
    tensor, and assign it into `like` (a plain module of the same structure, e.g. `meta_copy` of the model before
    sharding, with the same adapters). Returns the filled `like` on rank 0 and None elsewhere."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not full:  # cpu_offload=True leaves the other ranks empty-handed
        return None
    like.load_state_dict(full, assign=True)
    like.tie_weights()  # assign=True replaced the tied parameter objects
    # the non-persistent buffers (RoPE tables, a quantized base's fp32 scales) are not in the state dict; FSDP2
    # leaves buffers unsharded, so this rank holds them whole
    buffers = dict(model.named_buffers())
    for name, buffer in list(like.named_buffers()):
        if buffer.is_meta:
            module, _, leaf = name.rpartition(".")
            setattr(like.get_submodule(module), leaf, buffers[name].cpu())
    return like
