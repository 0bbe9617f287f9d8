"""FP8 training (`precision.mode=fp8` or `fp8_pure`): the transformer blocks' linear layers run their matmuls in
float8.

    require_float8(device, mode)      # at start-up: a clear error on CPU, older GPUs, or without torchao
    model = apply_float8(model, cfg)  # swaps nn.Linear -> torchao Float8Linear (same parameter names)

torchao's float8 training (https://github.com/pytorch/ao/tree/main/torchao/float8) with its default tensorwise
dynamic scaling: each forward casts weights and activations to e4m3 (gradients to e5m2) with a scale from the
current absolute maximum and multiplies with `torch._scaled_mm`. Under `fp8` the master weights stay fp32 and
everything else runs under bf16 autocast (as in `bf16_mixed`); under `fp8_pure` the weights are bf16 and nothing
is autocast (as in `bf16_pure`: no fp32 copy to cast from, the optimizer's update written into bf16 weights, so
optim.bf16_update applies). The output head is left in bf16: the loss computes it from its weight
directly, and the logits are the most precision-sensitive matmul. Float8 pays off at model scale and under
torch.compile, which fuses the amax/scale/cast kernels; eager float8 is usually slower than bf16.
"""
from __future__ import annotations

import torch
from torch import nn

from optrush.config import Config, ConfigError

# torch._scaled_mm needs both matmul dimensions of each weight divisible by 16
FP8_ALIGNMENT = 16


BF16_MODE_OF = {"fp8": "bf16_mixed", "fp8_pure": "bf16_pure"}
"""The same precision without float8 matmuls: what to use where float8 cannot run."""


def require_float8(device: torch.device, mode: str) -> None:
    """Raise ConfigError unless `device` has FP8 tensor cores and torchao is installed (`mode`: the
    precision.mode asking, named in the message)."""
    instead = f"use precision.mode={BF16_MODE_OF[mode]}"
    if device.type != "cuda":
        raise ConfigError(f"precision.mode={mode} needs an NVIDIA GPU with FP8 tensor cores (H100/H200, compute "
                          f"capability 8.9+), but this run is on {device.type}; {instead}")
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        raise ConfigError(f"precision.mode={mode} needs FP8 tensor cores (compute capability 8.9+, e.g. H100), but "
                          f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}; {instead}")
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        raise ConfigError(f"precision.mode={mode} needs torchao: pip install 'torchao>=0.15' "
                          "(or pip install 'optrush[gpu]')") from None


def apply_float8(model: nn.Module, cfg: Config) -> nn.Module:
    """Convert the linear layers inside `model.layers` to float8 training in place; returns the model."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    device = next(model.parameters()).device
    require_float8(device, cfg.precision.mode)
    convert_to_float8_training(model, config=Float8LinearConfig(), module_filter_fn=in_blocks_and_aligned)
    return model


def in_blocks_and_aligned(module: nn.Module, fqn: str) -> bool:
    return (fqn.startswith("layers.") and isinstance(module, nn.Linear)
            and module.in_features % FP8_ALIGNMENT == 0 and module.out_features % FP8_ALIGNMENT == 0)
