"""Optimizer (AdamW with decayed/undecayed groups) and learning-rate schedules."""
from optrush.optim.optimizer import build_optimizer
from optrush.optim.schedule import build_scheduler, lr_at

__all__ = ["build_optimizer", "build_scheduler", "lr_at"]
