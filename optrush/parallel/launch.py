"""`optrush train CONFIG --nproc N`: run the same command as N processes on this machine through torchrun.

    optrush train run.yaml parallel.strategy=fsdp --nproc 8
    # is python -m torch.distributed.run --standalone --nproc-per-node=8 -m optrush train run.yaml parallel.strategy=fsdp

Several nodes: run torchrun yourself on every node (README, "Multi-GPU"). This module imports no torch, so the
launching process starts in a moment and leaves the devices to the processes it starts.
"""
from __future__ import annotations

import os
import subprocess
import sys

from optrush.config import Config, ConfigError

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def torchrun_command(arguments: list[str], *, nproc: int) -> list[str]:
    """The command that runs `optrush <arguments>` as `nproc` processes on this machine (`--standalone`: a local
    rendezvous on a free port)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "optrush", *arguments]


def relaunch_with_torchrun(arguments: list[str], *, nproc: int, cfg: Config) -> int:
    """Run `optrush <arguments>` under torchrun with `nproc` processes; returns torchrun's exit status. A process
    count the config cannot split stops here, once, instead of in every process it would start."""
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: give the number of processes (one per device) to run, >= 1")
    if cfg.parallel.strategy == "none":
        raise ConfigError(f"--nproc {nproc} runs one process per device, which needs parallel.strategy=fsdp "
                          "(or ddp, hsdp)")
    if cfg.parallel.strategy == "hsdp" and nproc % cfg.parallel.replicate:
        raise ConfigError(f"--nproc {nproc}: parallel.replicate={cfg.parallel.replicate} must divide the number of "
                          "processes (hsdp shards each replica over nproc / replicate of them)")
    if nproc % cfg.context.degree:
        raise ConfigError(f"--nproc {nproc}: context.degree={cfg.context.degree} must divide the number of "
                          "processes (each context group splits every row over that many of them)")
    return subprocess.call(torchrun_command(arguments, nproc=nproc))
