"""Optimizers (AdamW, 8/4-bit AdamW, Adafactor, Lion, Muon, schedule-free AdamW), bf16 update rules, weight EMA and
learning-rate schedules."""
from optrush.optim.ema import EMA, eval_weights
from optrush.optim.optimizer import OPTIMIZERS, build_optimizer
from optrush.optim.schedule import build_scheduler, lr_at
from optrush.optim.schedule_free import optimizer_eval_mode

__all__ = ["EMA", "OPTIMIZERS", "build_optimizer", "build_scheduler", "eval_weights", "lr_at", "optimizer_eval_mode"]
