"""The config as this machine will run it.

`train.device=auto` (the default) means "the GPU if there is one". Validation alone cannot know which, so a
config that needs a GPU (flex or varlen attention, optimizer offload) would pass it and fail only once the model
is built, after the data was read. Commands that train on this machine load the config here instead: where no GPU
is visible, `auto` is validated as `cpu`, and such a config is refused at start-up, naming the key.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from optrush.config.checks import validate
from optrush.config.load import load_config
from optrush.config.schema import Config


def visible_gpus() -> int:
    import torch  # imported late: `optrush config show` never needs torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def load_config_for_machine(path: str | Path | None = None, overrides: Sequence[str] = (), *,
                            gpus: int | None = None, synthetic_data: bool = False) -> Config:
    """`load_config`, with `train.device=auto` resolved to `cpu` where `gpus` (default: those visible) is 0."""
    cfg = load_config(path, list(overrides), synthetic_data=synthetic_data)
    if cfg.train.device == "auto" and (visible_gpus() if gpus is None else gpus) == 0:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device="cpu"))
        validate(cfg, synthetic_data=synthetic_data)
    return cfg
