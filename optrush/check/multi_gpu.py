"""Multi-GPU == one device: the config trained for a few steps on 2 ranks (its parallel.strategy, launched through
torchrun exactly as `optrush train --nproc 2` does) against one process with `parallel.strategy=none` and twice the
gradient accumulation, i.e. the same global batch. The loss is normalised by the global trained-token count, so
the two runs must log the same losses. On CPU the ranks talk over gloo; on CUDA it needs two visible GPUs.
With `context.degree=N` the run takes 2 x N ranks (2 replicas, N shares of each row) and the reference N x fewer.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from optrush.check.harness import CheckContext, relative
from optrush.check.report import CheckResult, compare, not_applicable
from optrush.config import to_yaml

REPLICAS = 2
NAME = "multi-GPU: == single device"


def check_multi_gpu(ctx: CheckContext, *, steps: int) -> list[CheckResult]:
    cfg = ctx.cfg
    ranks = REPLICAS * cfg.context.degree
    if cfg.parallel.strategy == "none":
        return [not_applicable(NAME, "parallel.strategy=none: one device")]
    if ctx.device.type == "cuda" and torch.cuda.device_count() < ranks:
        return [not_applicable(NAME, f"needs {ranks} GPUs, {torch.cuda.device_count()} visible")]
    work = ctx.workdir / "multi_gpu"
    work.mkdir(parents=True, exist_ok=True)
    config = work / "config.yaml"
    config.write_text(to_yaml(cfg))
    common = [f"train.max_steps={steps}", "checkpoint.every=0", "checkpoint.save_final=false",
              "checkpoint.resume=never", "logging.progress=false", "logging.every=1", "train.verify=false",
              "data.eval_fraction=0", "data.eval_path=null"]
    try:
        sharded = train_losses(config, common + [f"output_dir={work / 'ranks'}"], nproc=ranks)
        single = train_losses(config, common + [f"output_dir={work / 'single'}", "parallel.strategy=none",
                                                "parallel.replicate=1", "parallel.cpu_offload=false",
                                                "context.degree=1",
                                                f"train.grad_accum={cfg.train.grad_accum * REPLICAS}"], nproc=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    worst = max(relative(a, b) for a, b in zip(sharded, single)) if len(sharded) == len(single) else float("inf")
    return [compare(NAME, worst, ctx.tolerance.loss, switch="parallel.strategy=none",
                    detail=f"{steps} steps on {ranks} ranks ({cfg.parallel.strategy}) vs one process with "
                           f"train.grad_accum x{REPLICAS}: largest relative loss difference")]


def train_losses(config: Path, overrides: list[str], *, nproc: int) -> list[float]:
    """Train in a child process (through torchrun when nproc > 1); the losses it logged."""
    command = [sys.executable, "-m", "optrush", "train", str(config), *overrides]
    command += ["--nproc", str(nproc)] if nproc > 1 else []
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed:\n{done.stderr[-2000:]}")
    out = next(o.split("=", 1)[1] for o in overrides if o.startswith("output_dir="))
    rows = map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines())
    return [row["loss"] for row in rows if "loss" in row]
