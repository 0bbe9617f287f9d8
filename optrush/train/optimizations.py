"""The model transforms, applied in their one fixed order.

    model = apply_optimizations(model, cfg)

peft -> quantize (float8 training linears, frozen embedding to host memory) -> kernels -> activation
checkpointing/offload -> compile -> shard.
The order is forced: kernels and float8 replace modules that checkpointing must then wrap; checkpointing must be
inside the compiled graph so the compiler plans the recomputation; sharding wraps the final blocks (as in
torchtitan's `parallelize_llama`). Each transform is an `apply_x(model, cfg) -> model` that changes modules in
place, keeping the parameter names of the weights it does not add. Each one that the config switches on is
logged once. PEFT wraps the targeted linears in LoRA adapters and freezes the rest (optrush.peft.lora); weight
quantization stores the frozen block linears in NF4 or int8 under the adapters (QLoRA, optrush.peft.quant), and
the frozen embedding table may move to pinned host memory (optrush.peft.host_embedding); prompt tuning prepends a
learned soft prompt (optrush.peft.prompt); sharding (ddp, fsdp, hsdp over the ranks torchrun launched) is
optrush.parallel.fsdp.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from optrush.config import Config
from optrush.kernels import apply_kernels, kernel_choices
from optrush.parallel.checkpointing import apply_activation_checkpointing
from optrush.parallel.compile import apply_compile
from optrush.parallel.distributed import is_main, world_size
from optrush.parallel.fsdp import apply_data_parallel
from optrush.peft.host_embedding import apply_embedding_on_host
from optrush.peft.lora import apply_lora
from optrush.peft.prompt import apply_prompt_tuning
from optrush.peft.quant import apply_quantize
from optrush.train.float8 import apply_float8

Transform = Callable[[nn.Module, Config], nn.Module]


def apply_optimizations(model: nn.Module, cfg: Config) -> nn.Module:
    """Apply every transform `cfg` switches on, in order; returns the transformed model."""
    for name, transform in enabled_transforms(cfg):
        model = transform(model, cfg)
        if is_main():
            print(f"model transform: {name}", flush=True)
    return model


def apply_peft(model: nn.Module, cfg: Config) -> nn.Module:
    """The adapters of `peft.method`: a soft prompt, or LoRA/DoRA on the targeted linears."""
    return (apply_prompt_tuning if cfg.peft.method == "prompt_tuning" else apply_lora)(model, cfg)


def enabled_transforms(cfg: Config) -> list[tuple[str, Transform]]:
    """(description, apply function) for each transform `cfg` switches on, in application order."""
    ac = cfg.activations
    steps = []
    p = cfg.peft
    if p.method == "prompt_tuning":
        steps.append((f"peft: prompt tuning, {p.num_virtual_tokens} virtual tokens ({p.prompt_init} init)",
                      apply_peft))
    elif p.method != "none":
        scale = f"alpha/sqrt(r)={p.alpha / p.r ** 0.5:g}" if p.rslora else f"alpha/r={p.alpha / p.r:g}"
        plus = f", LoRA+ B lr x{p.lora_plus_ratio:g}" if p.lora_plus_ratio != 1 else ""
        steps.append((f"peft: {p.method} r={p.r} {scale} dropout={p.dropout:g} on {p.target_modules}{plus}",
                      apply_peft))
    if p.quantize != "none":
        steps.append((f"quantize: frozen block linears stored as {p.quantize}, dequantized per matmul "
                      "(embeddings and head unquantized)", apply_quantize))
    if p.embedding_on_host:
        steps.append(("frozen token embedding in pinned host memory, rows read over PCIe", apply_embedding_on_host))
    if cfg.precision.float8:
        steps.append(("float8 training linears in the transformer blocks (torchao, tensorwise scaling)",
                      apply_float8))
    if kernel_choices(cfg):
        steps.append((f"kernels: {', '.join(kernel_choices(cfg))}", apply_kernels))
    if ac.checkpointing != "none" or ac.offload or ac.mlp_chunk_tokens:
        parts = [f"{ac.checkpointing} activation checkpointing every {ac.every} block(s)"] \
            if ac.checkpointing != "none" else []
        parts += ["saved activations offloaded to CPU (async, prefetched)"] if ac.offload else []
        parts += [f"MLP in checkpointed chunks of {ac.mlp_chunk_tokens} tokens"] if ac.mlp_chunk_tokens else []
        steps.append((", ".join(parts), apply_activation_checkpointing))
    if cfg.compile.mode != "none":
        steps.append((f"torch.compile ({cfg.compile.mode}, dynamic={cfg.compile.dynamic})", apply_compile))
    par = cfg.parallel
    if par.strategy != "none":
        detail = "" if par.strategy == "ddp" else \
            f", reshard_after_forward={par.reshard_after_forward}, cpu_offload={par.cpu_offload}"
        steps.append((f"shard: {par.strategy} over {world_size()} ranks (reduce {par.reduce_dtype}{detail})",
                      apply_data_parallel))
    return steps
