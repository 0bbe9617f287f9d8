"""Exponential moving average of the trained weights (`train.ema_decay`), to evaluate and save instead of the raw ones.

    ema = EMA(model, decay=cfg.train.ema_decay)    # after the optimizations, before resume
    ...optimizer.step(); ema.update(model)
    with ema.swapped_in(model):                     # around evaluation and the final save
        evaluate(model); save(model)
    with eval_weights(model, optimizer, ema):       # the same, also covering schedule-free's average
    checkpoint["ema"] = ema.state_dict()            # ema.load_state_dict(...) on resume

After every step, avg = decay * avg + (1 - decay) * w over the trainable parameters (with LoRA: the adapters only;
frozen weights never change, so their average is themselves). The averages are kept in fp32 whatever the weights'
dtype: with decay 0.999 each step adds 0.1% of the difference, below bf16's resolution (0.4%), so a bf16 average
would stop moving. That costs 4 bytes per trainable parameter on the weights' device. The average starts at the
weights EMA is built with, whose share decays as decay^steps (0.999: still 37% after 1,000 steps).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from optrush.optim.schedule_free import optimizer_eval_mode


class EMA:
    def __init__(self, model: nn.Module, *, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"train.ema_decay={decay}: must be in (0, 1) to keep an average (0 turns it off)")
        self.decay = decay
        self.averages = {name: p.detach().float().clone() for name, p in trainable(model)}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move every average a `1 - decay` fraction towards the current weight."""
        for name, p in trainable(model):
            self.averages[name].lerp_(p.float(), 1 - self.decay)

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[None]:
        """The averaged weights in the model inside the block; the trained weights come back bit for bit after."""
        params = dict(trainable(model))
        with torch.no_grad():
            kept = {name: p.detach().clone() for name, p in params.items()}
            for name, p in params.items():
                p.copy_(self.averages[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(kept[name])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "averages": dict(self.averages)}

    def load_state_dict(self, state: dict) -> None:
        missing = self.averages.keys() - state["averages"].keys()
        if missing:
            raise ValueError(f"the checkpoint's EMA has no average for {sorted(missing)[:3]}: it was saved from a "
                             "different model or peft setting")
        for name, average in self.averages.items():
            average.copy_(state["averages"][name])


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


@contextmanager
def eval_weights(model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA | None) -> Iterator[None]:
    """The weights to evaluate and save inside the block: the EMA average when there is one, schedule-free
    AdamW's average x with that optimizer, else the trained weights as they are. Everything is restored after."""
    with optimizer_eval_mode(optimizer), (ema.swapped_in(model) if ema is not None else nullcontext()):
        yield
