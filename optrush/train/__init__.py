"""The training loop (`loop.train`), checkpoints, resuming (`resume`) and metrics."""
from optrush.train.loop import train

__all__ = ["train"]
