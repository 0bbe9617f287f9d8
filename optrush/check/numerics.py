"""Numerics of one optimizer step of the configured model: the loss is finite and non-zero, every gradient is
finite, and every trainable parameter receives a non-zero gradient (a frozen or disconnected layer shows up here,
as does a quantized base that dequantizes to zeros). A LoRA `lora_A` whose `lora_B` is still all zeros (its
initialisation) gets an exactly zero first gradient by construction, so it is exempt while its B is zero.
"""
from __future__ import annotations

import math

import torch

from optrush.check.harness import CheckContext, loader_for, model_for
from optrush.check.report import CheckResult, compare
from optrush.objectives import build_objective
from optrush.train import loop


def check_numerics(ctx: CheckContext) -> list[CheckResult]:
    cfg = ctx.cfg
    loader = loader_for(ctx, cfg)
    micro_batches = [next(loader) for _ in range(cfg.train.grad_accum)]
    model = model_for(ctx, cfg)
    loss_sum, units = loop.accumulate_gradients(model, build_objective(cfg.objective), micro_batches,
                                                device=ctx.device, autocast=loop.precision_context(cfg, ctx.device))
    loss = float(loss_sum) / max(units, 1)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    non_finite = sum(int((~torch.isfinite(p.grad)).sum()) for _, p in trainable if p.grad is not None)
    params = dict(trainable)
    zero_b = {name for name, p in trainable if name.endswith("lora_A")
              and not bool(params.get(name[:-1] + "B", p).ne(0).any())}
    dead = [name for name, p in trainable
            if name not in zero_b and (p.grad is None or not bool(p.grad.ne(0).any()))]
    switch = "precision.mode=fp32"
    named = f": {', '.join(dead[:3])}{' ...' if len(dead) > 3 else ''}" if dead else ""
    return [
        CheckResult(name="numerics: loss finite and > 0", passed=math.isfinite(loss) and loss > 0, measured=loss,
                    switch_to_turn_off=switch, detail=f"loss {loss:.4g} over {units} trained tokens"),
        compare("numerics: gradients finite", non_finite, 0, switch=switch,
                detail=f"{non_finite} NaN/inf gradient values"),
        compare("numerics: gradient on every trainable parameter", len(dead), 0,
                switch="(a model or transform bug: turn off kernels.*, compile.mode, activations.*)",
                detail=f"{len(dead)} of {len(trainable) - len(zero_b)} trainable tensors got no or an all-zero "
                       f"gradient{named}" + (f" ({len(zero_b)} lora_A exempt: their lora_B is still zero)"
                                             if zero_b else "")),
    ]
