"""The training loop (`loop.train`), checkpoints and metrics."""
from optrush.train.loop import train

__all__ = ["train"]
