"""Run the groups of checks on one config and collect their rows into a `CheckReport`.

    report = run_checks(cfg)                           # every group
    report = run_checks(cfg, only=["packing", "resume"])
    report = run_fast_checks(cfg)                      # what `train.verify=true` runs before training

A group that raises becomes one failed row carrying the error (a crash is never a pass).
"""
from __future__ import annotations

import copy
import traceback
from collections.abc import Callable, Iterable

import torch
from torch import nn

from optrush.bench.provenance import provenance
from optrush.check.data import check_data, check_truncation
from optrush.check.equivalence import check_accumulation, check_kernels, check_packing, check_precision
from optrush.check.harness import CheckContext, loader_for, model_for, plain_config, prepare
from optrush.check.multi_gpu import check_multi_gpu
from optrush.check.numerics import check_numerics
from optrush.check.report import CheckReport, CheckResult, not_applicable
from optrush.check.resume import check_resume
from optrush.config import Config, ConfigError, PeftConfig, to_dict
from optrush.peft.lora import LoRALinear
from optrush.peft.quant import error_bound, quantize_weight
from optrush.train import loop

DEFAULT_STEPS = 6
"""Optimizer steps of the training checks (precision drift; resume trains half, saves, then the other half)."""


def check_peft(ctx: CheckContext) -> list[CheckResult]:
    """A freshly applied adapter (B = 0) must leave the model's output exactly as it was; a quantized base must
    dequantize within its format's bound and compute what the dequantized weights compute."""
    quantized = check_quantized(ctx)
    name = "peft: zero-init adapter leaves outputs unchanged"
    if ctx.cfg.peft.method not in ("lora", "dora"):
        return [not_applicable(name, f"peft.method={ctx.cfg.peft.method}: no LoRA adapter to check"), *quantized]
    base_cfg = plain_config(ctx.cfg)
    base_cfg.peft = PeftConfig(quantize=ctx.cfg.peft.quantize)  # the same (quantized) base, without adapters
    batch = next(iter(loader_for(ctx, base_cfg))).to(ctx.device)

    @torch.no_grad()
    def logits(cfg: Config) -> torch.Tensor:  # one model alive at a time
        model = model_for(ctx, cfg)
        return model(batch.input_ids, position_ids=batch.position_ids, document_ids=batch.document_ids).float()

    reference = logits(base_cfg)
    adapted = logits(plain_config(ctx.cfg))
    measured = float((adapted - reference).norm() / reference.norm())
    return [CheckResult(name=name, passed=measured <= ctx.tolerance.loss, measured=measured,
                        tolerance=ctx.tolerance.loss, switch_to_turn_off="peft.method=none",
                        detail="relative L2 difference of the logits on the first batch"), *quantized]


def check_quantized(ctx: CheckContext) -> list[CheckResult]:
    """QLoRA vs its reference, one model alive at a time: (1) the unquantized LoRA model, each block weight replaced
    by quantize -> dequantize of itself, whose error must stay within `quant.error_bound` everywhere; its logits
    (2) must match the user's quantized model (same seed, same adapters, B made non-zero so they count)."""
    bound_name = "peft: quantized base dequantizes within bound"
    forward_name = "peft: QLoRA forward == dequantized-base LoRA forward"
    method = ctx.cfg.peft.quantize
    if method == "none":
        return [not_applicable(n, "peft.quantize=none: the base is not quantized") for n in (bound_name, forward_name)]
    cfg = plain_config(ctx.cfg)
    batch = next(iter(loader_for(ctx, cfg))).to(ctx.device)
    autocast = loop.precision_context(cfg, ctx.device)

    @torch.no_grad()
    def logits(model) -> torch.Tensor:
        for name, param in model.named_parameters():  # non-zero B, the same in both models
            if name.endswith("lora_B"):
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.02)
        with autocast:
            return model(batch.input_ids, position_ids=batch.position_ids, document_ids=batch.document_ids).float()

    dense_cfg = copy.deepcopy(cfg)
    dense_cfg.peft.quantize = "none"
    dense = model_for(ctx, dense_cfg)
    worst = 0.0
    with torch.no_grad():
        for name, module in dense.named_modules():
            if name.startswith("layers.") and isinstance(module, (nn.Linear, LoRALinear)):
                weight = module.weight
                dequantized = quantize_weight(weight, method=method).dequantize()
                error = (dequantized - weight).abs() / error_bound(weight, method=method)
                worst = max(worst, float(error.max()))
                weight.copy_(dequantized)
                if isinstance(module, LoRALinear) and module.lora_magnitude is not None:
                    module.lora_magnitude.copy_(module.row_norm(dequantized))  # DoRA starts from the base
    reference = logits(dense)
    del dense
    measured = float((logits(model_for(ctx, cfg)) - reference).norm() / reference.norm())
    return [CheckResult(name=bound_name, passed=worst <= 1.0, measured=worst, tolerance=1.0,
                        switch_to_turn_off="peft.quantize=none",
                        detail=f"largest |w - dequantized w| / the {method} format's bound at that weight"),
            CheckResult(name=forward_name, passed=measured <= ctx.tolerance.loss, measured=measured,
                        tolerance=ctx.tolerance.loss, switch_to_turn_off="peft.quantize=none",
                        detail="relative L2 difference of the logits on the first batch")]


GROUPS: dict[str, Callable[..., list[CheckResult]]] = {
    "data": check_data,
    "truncation": check_truncation,
    "numerics": check_numerics,
    "packing": check_packing,
    "accumulation": check_accumulation,
    "kernels": check_kernels,
    "precision": check_precision,
    "peft": check_peft,
    "resume": check_resume,
    "multi_gpu": check_multi_gpu,
}
TRAINING_GROUPS = ("precision", "resume", "multi_gpu")
"""Groups that train for `steps` optimizer steps."""
FAST = ("data", "numerics", "packing", "accumulation")
"""The subset `train.verify=true` runs: one forward/backward per model, no training, no compile comparison."""


def run_checks(cfg: Config, *, only: Iterable[str] | None = None, steps: int = DEFAULT_STEPS) -> CheckReport:
    """Run the groups in `only` (default: all of `GROUPS`, in that order) on `cfg`; see `optrush.check`."""
    names = list(GROUPS) if only is None else list(only)
    unknown = [name for name in names if name not in GROUPS]
    if unknown:
        raise ConfigError(f"unknown check group(s) {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
    if steps < 2:
        raise ConfigError(f"--steps {steps}: the training checks need at least 2 steps")
    if cfg.objective in ("reward", "dpo", "grpo"):
        raise ConfigError(f"optrush check checks causal_lm/sft runs only (objective={cfg.objective}): check the same "
                          "model and settings with objective=sft on prompt/completion data")
    ctx = prepare(cfg)
    report = CheckReport(tolerance=ctx.tolerance, precision=ctx.precision,
                         context={"config": to_dict(cfg), "steps": steps, "provenance": provenance()})
    with loop.backend_flags(cfg):
        for name in (n for n in GROUPS if n in names):
            report.rows += run_group(name, ctx, steps=steps)
    return report


def run_group(name: str, ctx: CheckContext, *, steps: int) -> list[CheckResult]:
    """One group's rows, or a failed row that names where it raised."""
    kwargs = {"steps": steps} if name in TRAINING_GROUPS else {}
    try:
        return GROUPS[name](ctx, **kwargs)
    except Exception as err:  # noqa: BLE001 - reported as a failed row, with the traceback's last frame
        where = traceback.extract_tb(err.__traceback__)[-1]
        return [CheckResult(name=f"{name}: ran", passed=False,
                            detail=f"{type(err).__name__}: {err} ({where.filename}:{where.lineno})")]
    finally:
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()


def run_fast_checks(cfg: Config) -> CheckReport:
    """The `FAST` subset, for `train.verify=true`: seconds on the debug model, a few forward/backward passes of
    the real one."""
    return run_checks(cfg, only=FAST)
