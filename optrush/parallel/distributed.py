"""The process group and device mesh of a data-parallel run, and rank helpers.

    dist = init_distributed(cfg.parallel, device=torch.device("cuda"))   # reads torchrun's env variables
    mesh = build_mesh(cfg.parallel, device_type="cuda", world_size=dist.world_size)
    if is_main():
        print("only rank 0 prints")
    units = all_reduce_sum([local_units], device=dist.device)[0]
    teardown()

One process per device, launched by torchrun (`optrush train CONFIG --nproc N` runs torchrun for you), which sets
RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. The backend is NCCL on CUDA (with gloo beside it for the
few CPU-tensor collectives of checkpointing) and gloo on CPU, so every strategy also runs, slowly, on CPU processes.

Mesh: `ddp` and `fsdp` use a 1-D mesh over all ranks; `hsdp` a 2-D mesh of `parallel.replicate` replica groups x
`world / replicate` ranks sharding each replica (on several nodes: replicate = nodes, shard = GPUs per node, so
the frequent all-gathers stay on NVLink and only the gradient all-reduce crosses the network).
Every strategy is pure data parallelism, so the data-parallel rank is the global rank.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from optrush.config import ConfigError
from optrush.config.schema import ParallelConfig
from optrush.parallel.launch import TORCHRUN_VARIABLES


@dataclass(frozen=True)
class Distributed:
    """Where this process sits: rank of world_size, and its device."""
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")


def init_distributed(cfg: ParallelConfig, *, device: torch.device, timeout_s: int = 1800) -> Distributed:
    """Join the process group torchrun set up; a no-op for strategy none.
    On CUDA each process takes GPU LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.strategy == "none":
        if world > 1:
            raise ConfigError(f"{world} processes were launched but parallel.strategy=none would train {world} "
                              "independent copies writing the same files: set parallel.strategy=fsdp (or ddp, hsdp)")
        return Distributed(device=device)
    if not all(name in os.environ for name in TORCHRUN_VARIABLES):
        raise ConfigError(f"parallel.strategy={cfg.strategy} runs one process per device: launch with "
                          "`optrush train CONFIG --nproc N` or `torchrun --nproc-per-node N -m optrush train CONFIG` "
                          "(missing environment: " + ", ".join(v for v in TORCHRUN_VARIABLES if v not in os.environ)
                          + ")")
    if cfg.strategy == "hsdp" and world % cfg.replicate:
        raise ConfigError(f"parallel.replicate={cfg.replicate} must divide the world size {world} "
                          f"(shard degree = world / replicate)")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        backend = "cuda:nccl,cpu:gloo"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return Distributed(rank=dist.get_rank(), world_size=world, device=device)


def build_mesh(cfg: ParallelConfig, *, device_type: str, world_size: int) -> DeviceMesh:
    """The strategy's mesh over all ranks (the `shard` step builds it; see the module docstring)."""
    if cfg.strategy == "hsdp":
        return init_device_mesh(device_type, (cfg.replicate, world_size // cfg.replicate),
                                mesh_dim_names=("dp_replicate", "dp_shard"))
    name = "dp_replicate" if cfg.strategy == "ddp" else "dp_shard"
    return init_device_mesh(device_type, (world_size,), mesh_dim_names=(name,))


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single-process run): the process that logs and writes shared files."""
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], *, device: torch.device) -> list[float]:
    """Element-wise sum of `values` over all ranks (float64, so token counts stay exact); unchanged alone."""
    if not dist.is_initialized():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def sum_over_ranks(totals: Mapping[str, float], *, device: torch.device) -> dict[str, float]:
    """`totals` summed key by key over all ranks in one all-reduce (e.g. an objective's metric sums, at log time).
    A collective: every rank calls it at the same point with the same keys (in any order: they are sent sorted);
    unchanged alone."""
    keys = sorted(totals)
    return dict(zip(keys, all_reduce_sum([totals[key] for key in keys], device=device)))


def broadcast_object(value, *, src: int = 0):
    """`value` of rank `src` on every rank (e.g. a directory name rank 0 chose)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]

