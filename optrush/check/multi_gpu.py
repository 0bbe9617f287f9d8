"""Multi-GPU == one device: the config trained for a few steps on 2 ranks (its parallel.strategy, launched through
torchrun exactly as `optrush train --nproc 2` does) against one process with `parallel.strategy=none` and twice the
gradient accumulation, i.e. the same global batch. The loss is normalised by the global trained-token count, so
the two runs must log the same losses and the same gradient norms (the norms catch a gradient off by a constant
factor, e.g. a wrong normalisation over the ranks, which Adam or Lion would hide from the losses when clipping does
not bind). On CPU the ranks talk over gloo; on CUDA it needs two visible GPUs.
With `context.degree=N` the run takes 2 x N ranks (2 replicas, N shares of each row) and the reference N x fewer.
`parallel.reduce_dtype=bf16` rounds every reduced gradient to bf16, so its run is held to the bf16 tolerances.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from optrush.check.harness import TOLERANCES, CheckContext, relative
from optrush.check.report import CheckResult, Tolerance, compare, not_applicable
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
        sharded = train_logged(config, common + [f"output_dir={work / 'ranks'}"], nproc=ranks)
        single = train_logged(config, common + [f"output_dir={work / 'single'}", "parallel.strategy=none",
                                                "parallel.replicate=1", "parallel.cpu_offload=false",
                                                "context.degree=1",
                                                f"train.grad_accum={cfg.train.grad_accum * REPLICAS}"], nproc=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tolerance, switch = reduction_tolerance(ctx)
    losses = largest_difference(sharded["loss"], single["loss"])
    norms = largest_difference(sharded["grad_norm"], single["grad_norm"])
    # one row, two quantities with their own bounds: it measures the worse, as a fraction of its bound
    return [compare(NAME, max(losses / tolerance.loss, norms / tolerance.grad), 1.0, switch=switch,
                    detail=f"{steps} steps on {ranks} ranks ({cfg.parallel.strategy}) vs one process with "
                           f"train.grad_accum x{REPLICAS}: largest relative difference of the losses {losses:.3g} "
                           f"(tolerance {tolerance.loss:g}) and of the gradient norms {norms:.3g} (tolerance "
                           f"{tolerance.grad:g}); measured: the larger as a fraction of its tolerance")]


def reduction_tolerance(ctx: CheckContext) -> tuple[Tolerance, str]:
    """The bounds of this run and the switch that removes what the comparison tests: bf16 gradient reduction
    rounds like bf16 compute, so it gets at least the bf16 bounds, and turning it off is the first thing to try."""
    if ctx.cfg.parallel.reduce_dtype != "bf16":
        return ctx.tolerance, "parallel.strategy=none"
    bf16 = TOLERANCES["bf16_mixed"]
    looser = Tolerance(loss=max(ctx.tolerance.loss, bf16.loss), grad=max(ctx.tolerance.grad, bf16.grad),
                       drift=max(ctx.tolerance.drift, bf16.drift))
    return looser, "parallel.reduce_dtype=fp32"


def largest_difference(values: list[float], reference: list[float]) -> float:
    """Largest relative difference, step by step; runs that logged different numbers of steps, or a NaN, differ
    entirely (max() would skip a NaN that is not first)."""
    differences = [relative(a, b) for a, b in zip(values, reference)]
    if len(values) != len(reference) or not differences or any(math.isnan(d) for d in differences):
        return float("inf")
    return max(differences)


def train_logged(config: Path, overrides: list[str], *, nproc: int) -> dict[str, list[float]]:
    """Train in a child process (through torchrun when nproc > 1); the losses and gradient norms it logged."""
    command = [sys.executable, "-m", "optrush", "train", str(config), *overrides]
    command += ["--nproc", str(nproc)] if nproc > 1 else []
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed:\n{done.stderr[-2000:]}")
    out = next(o.split("=", 1)[1] for o in overrides if o.startswith("output_dir="))
    rows = [row for row in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()) if "loss" in row]
    return {key: [row[key] for row in rows] for key in ("loss", "grad_norm")}
