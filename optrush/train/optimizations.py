"""The model transforms, applied in their one fixed order.

    model = apply_optimizations(model, cfg)

peft -> quantize (float8 training linears) -> kernels -> activation checkpointing/offload -> compile -> shard.
The order is forced: kernels and float8 replace modules that checkpointing must then wrap; checkpointing must be
inside the compiled graph so the compiler plans the recomputation; sharding wraps the final blocks (as in
torchtitan's `parallelize_llama`). Each transform is an `apply_x(model, cfg) -> model` that changes modules in
place, keeping the parameter names of the weights it does not add. Each one that the config switches on is
logged once. PEFT wraps the targeted linears in LoRA adapters and freezes the rest (optrush.peft.lora); weight
quantization and sharding have no implementation yet (the config accepts only `none` for them).
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from optrush.config import Config
from optrush.kernels import apply_kernels, kernel_choices
from optrush.parallel.checkpointing import apply_activation_checkpointing
from optrush.parallel.compile import apply_compile
from optrush.peft.lora import apply_lora
from optrush.train.float8 import apply_float8

Transform = Callable[[nn.Module, Config], nn.Module]


def apply_optimizations(model: nn.Module, cfg: Config) -> nn.Module:
    """Apply every transform `cfg` switches on, in order; returns the transformed model."""
    for name, transform in enabled_transforms(cfg):
        model = transform(model, cfg)
        print(f"model transform: {name}", flush=True)
    return model


def enabled_transforms(cfg: Config) -> list[tuple[str, Transform]]:
    """(description, apply function) for each transform `cfg` switches on, in application order."""
    ac = cfg.activations
    steps = []
    p = cfg.peft
    if p.method != "none":
        scale = f"alpha/sqrt(r)={p.alpha / p.r ** 0.5:g}" if p.rslora else f"alpha/r={p.alpha / p.r:g}"
        plus = f", LoRA+ B lr x{p.lora_plus_ratio:g}" if p.lora_plus_ratio != 1 else ""
        steps.append((f"peft: {p.method} r={p.r} {scale} dropout={p.dropout:g} on {p.target_modules}{plus}",
                      apply_lora))
    if cfg.precision.mode == "fp8":
        steps.append(("float8 training linears in the transformer blocks (torchao, tensorwise scaling)",
                      apply_float8))
    if kernel_choices(cfg):
        steps.append((f"kernels: {', '.join(kernel_choices(cfg))}", apply_kernels))
    if ac.checkpointing != "none" or ac.offload:
        parts = [f"{ac.checkpointing} activation checkpointing every {ac.every} block(s)"] \
            if ac.checkpointing != "none" else []
        parts += ["saved activations offloaded to CPU"] if ac.offload else []
        steps.append((", ".join(parts), apply_activation_checkpointing))
    if cfg.compile.mode != "none":
        steps.append((f"torch.compile ({cfg.compile.mode}, dynamic={cfg.compile.dynamic})", apply_compile))
    return steps
