"""Load a model to generate from: an HF checkpoint, or a base model with a LoRA/DoRA adapter on top.

    model, tokenizer = load_for_generation("runs/x/final")                       # full (or merged) checkpoint
    model, tokenizer = load_for_generation("runs/x/checkpoints/step_00000100")   # a training checkpoint
    model, tokenizer = load_for_generation(adapter="runs/x/final/adapter")       # base from adapter_config.json
    model, tokenizer = load_for_generation("Llama-3.2-1B", adapter="out/adapter")  # base given explicitly

The adapter is a PEFT directory (adapter_config.json + adapter_model.safetensors, as `optrush.peft.export` and
`peft` write it). `ckpt` itself may be one, or a run's final/ or step directory that holds only `adapter/`
(peft.save=adapter). A step directory of a full-model run stands for its `model/` folder, which holds the tokenizer
too. The base is `base`, else `ckpt` when it is a full checkpoint, else the adapter config's
`base_model_name_or_path`. The adapters are merged into the base weights once loaded: decoding then costs what
the base costs. The tokenizer is the first directory holding one among the adapter, its parent and the base.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from optrush.config import ConfigError
from optrush.peft.export import ADAPTER_CONFIG, adapter_directory, base_quantization, load_adapter
from optrush.peft.lora import merge_lora_unless_quantized


def resolve(ckpt: str | Path | None, *, adapter: str | Path | None,
            base: str | Path | None) -> tuple[Path, Path | None, Path]:
    """(model directory, adapter directory or None, tokenizer directory) for the arguments above."""
    # imported here: optrush.train imports the objectives, and GRPO's imports this package
    from optrush.train.checkpoint import checkpoint_model_dir

    ckpt = None if ckpt is None else Path(ckpt)
    if adapter is None and ckpt is not None and (found := adapter_directory(ckpt)) is not None:
        adapter, ckpt = found, None
    if adapter is None:
        if ckpt is None:
            raise ConfigError("no model given: pass a checkpoint directory, or --adapter DIR (with --base)")
        ckpt = checkpoint_model_dir(ckpt)
        return ckpt, None, ckpt
    adapter = Path(adapter)
    if not (adapter / ADAPTER_CONFIG).is_file():
        raise ConfigError(f"--adapter {adapter}: no {ADAPTER_CONFIG} there; give a PEFT adapter directory, e.g. a "
                          "run's final/adapter")
    model_dir = base or ckpt or json.loads((adapter / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if model_dir is None:
        raise ConfigError(f"{adapter / ADAPTER_CONFIG} names no base model (the run started from model.preset): "
                          "pass --base with the base model directory")
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"base model {model_dir}: no config.json there; pass --base with the base model's HF "
                          "directory")
    tokenizer_dir = next((d for d in (adapter, adapter.parent, model_dir) if (d / "tokenizer.json").is_file()),
                         model_dir)
    return model_dir, adapter, tokenizer_dir


def load_for_generation(ckpt: str | Path | None = None, *, adapter: str | Path | None = None,
                        base: str | Path | None = None, device: torch.device | str = "cpu") -> tuple[nn.Module, object]:
    """(model in eval mode with any adapter merged in, tokenizer). A QLoRA adapter's base is quantized as in
    training (`base_quantization`): the model generates through the unmerged adapters, as it trained (folding them
    into quantized weights would lose them; into the unquantized base would not be the model that trained).
    Weights holding NaN or inf are refused (`check_finite_weights`)."""
    from optrush.data.tokenizer import load_tokenizer
    from optrush.models.io import load_model

    model_dir, adapter_dir, tokenizer_dir = resolve(ckpt, adapter=adapter, base=base)
    quantize = "none" if adapter_dir is None else base_quantization(adapter_dir, model_dir)
    model = load_model(model_dir, device=device, quantize=quantize)
    if adapter_dir is not None:
        merge_lora_unless_quantized(load_adapter(model, adapter_dir))
    check_finite_weights(model, checkpoint=model_dir if adapter_dir is None else adapter_dir)
    return model.eval(), load_tokenizer(tokenizer_dir)


def check_finite_weights(model: nn.Module, *, checkpoint: Path) -> None:
    """Stop at load when a weight holds NaN or inf: such a model's logits are not finite, so it would generate
    garbage (greedy) or fail mid-output (sampling), and its perplexity would be NaN."""
    weights = [(name, p) for name, p in model.named_parameters() if p.is_floating_point()]
    finite = torch.stack([torch.isfinite(p).all() for _, p in weights]).tolist() if weights else []  # one sync
    broken = [name for (name, _), ok in zip(weights, finite) if not ok]
    if broken:
        raise ValueError(f"{checkpoint}: {len(broken)} of {len(weights)} weight tensors hold NaN or inf (first: "
                         f"{broken[0]}), so the model's logits are not finite: the checkpoint is broken, e.g. its "
                         "training run diverged (see the loss in its metrics.jsonl); use an earlier step_N/ "
                         "checkpoint, or train again with a lower train.lr")


def generation_device(name: str | None) -> torch.device:
    """The device of `--device NAME` (None: cuda when available, else cpu), checked before any model loads."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name}: not a device name; use cpu, cuda, cuda:N or mps (or leave --device "
                          "out: cuda when available, else cpu)") from None
    visible = {"cuda": torch.cuda.device_count(), "mps": int(torch.backends.mps.is_available())}
    if device.type in visible and (device.index or 0) >= visible[device.type]:
        raise ConfigError(f"--device {name}: this machine has {visible[device.type]} {device.type.upper()} "
                          "device(s) that torch can use; use --device cpu, or leave --device out (cuda when "
                          "available, else cpu)")
    return device
