"""Learning-rate schedules as a multiplier of `train.lr`, and the LambdaLR that applies them.

    scheduler = build_scheduler(optimizer, cfg.train)   # call scheduler.step() after every optimizer.step()

`lr_at(step, cfg)` is the multiplier used for the update made at `step` (0-based, i.e. the number of optimizer
steps already taken). Every schedule starts with a linear warmup over `warmup_steps`, from 1/warmup_steps at step 0
(never 0: an update with lr 0 would be a wasted step) to 1 at step warmup_steps-1. After the warmup:

- constant: 1.
- linear:   1 -> min_lr_ratio, linearly, reached at step max_steps.
- cosine:   1 -> min_lr_ratio along half a cosine, reached at step max_steps.
- wsd:      warmup-stable-decay (https://arxiv.org/abs/2404.06395): 1 until the last `decay_fraction` of
            max_steps, then linearly down to min_lr_ratio at step max_steps.

Steps at or past max_steps get min_lr_ratio (1 for constant). The scheduler's state (its step counter and base
lrs) round-trips through `state_dict()`; the schedule itself is rebuilt from the config, so a resumed run must use
the same `train.*` schedule settings.
"""
from __future__ import annotations

import math
from functools import partial

import torch

from optrush.config.schema import TrainConfig

SCHEDULES = ("constant", "linear", "cosine", "wsd")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning-rate multiplier for the update made at 0-based `step`."""
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"train.schedule={cfg.schedule!r} is not a known schedule; use one of {', '.join(SCHEDULES)}")
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if step >= cfg.max_steps:
        return cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        decay_start = max(cfg.warmup_steps, cfg.max_steps - round(cfg.decay_fraction * cfg.max_steps))
        if step < decay_start:
            return 1.0
        progress = (step - decay_start) / (cfg.max_steps - decay_start)
        return 1.0 - progress * (1.0 - cfg.min_lr_ratio)
    progress = (step - cfg.warmup_steps) / (cfg.max_steps - cfg.warmup_steps)
    if cfg.schedule == "linear":
        return 1.0 - progress * (1.0 - cfg.min_lr_ratio)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Schedule(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR whose `get_last_lr()` is plain floats: torchao's low-bit optimizers keep each group's lr as a
    tensor (so the scheduler fills it in place), and metrics take Python numbers."""

    def get_last_lr(self) -> list[float]:
        return [float(lr) for lr in super().get_last_lr()]


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> Schedule:
    """A LambdaLR applying `lr_at` to every parameter group's lr (the group's lr at build time is the peak)."""
    lr_at(0, cfg)  # rejects an unknown schedule name now, not at the first step
    return Schedule(optimizer, partial(lr_at, cfg=cfg))
