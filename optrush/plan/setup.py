"""One training configuration as the planner sees it: the handful of choices that move memory and speed.

    setup = setup_from_config(cfg)              # what a Config asks for
    overrides = config_overrides(setup)         # back to dotted config keys (["precision.mode=bf16_pure", ...])

`Setup` is flat and hashable so the search can enumerate thousands of them; everything the memory and speed
models read is here, nothing else of the Config.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from optrush.config import Config

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True, kw_only=True, slots=True)
class Setup:
    seq_len: int = 2048
    """Tokens per row (data.max_length); rows are full (packed or synthetic)."""
    micro_batch: int = 1
    grad_accum: int = 1
    precision: str = "bf16_pure"
    """precision.mode: fp32 | bf16_mixed | bf16_pure | fp8 | fp8_pure."""
    optimizer: str = "adamw"
    """optim.name."""
    state_dtype: str | None = None
    """optim.state_dtype: fp32 | bf16 | None (the parameters' dtype)."""
    optimizer_offload: bool = False
    """optim.offload: optimizer state and step in CPU memory."""
    low_bit_min_numel: int = 1 << 20
    """optim.low_bit_min_numel: 8-bit/4-bit AdamW keep plain moments for tensors with fewer elements."""
    kahan: bool = False
    """optim.bf16_update=kahan: a bf16 rounding-residue buffer per trained weight."""
    peft: str = "none"
    """peft.method: none | lora | dora | prompt_tuning."""
    quantize: str = "none"
    """peft.quantize: frozen block linears stored as none | nf4 (QLoRA) | int8."""
    embedding_on_host: bool = False
    """peft.embedding_on_host: the frozen token embedding table lives in pinned host memory."""
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = ALL_LINEAR
    virtual_tokens: int = 20
    """peft.num_virtual_tokens (prompt tuning)."""
    checkpointing: str = "none"
    """activations.checkpointing: none | full | selective."""
    every: int = 1
    skip_last: int = 0
    """activations.skip_last: the last blocks are neither checkpointed nor offloaded."""
    offload: bool = False
    mlp_chunk_tokens: int = 0
    """activations.mlp_chunk_tokens: the MLP runs over checkpointed chunks of this many tokens (0 = off)."""
    compile: str = "none"
    """compile.mode: none | blocks | model."""
    memory_budget: float = 1.0
    """compile.memory_budget: the fraction of its activations a compiled block keeps (1 = Inductor's choice)."""
    fused_loss: bool = False
    loss_chunk_tokens: int = 4096
    attention: str = "sdpa"
    document_mask: bool = False
    """Packed rows with document masks (real packed data); False for unpacked or synthetic rows."""
    strategy: str = "none"
    """parallel.strategy: none | ddp | fsdp (| hsdp, modelled as fsdp over all GPUs: optimistic)."""
    n_gpus: int = 1
    context_degree: int = 1
    """context.degree: GPUs that split each row (ring attention); each holds seq_len / context_degree tokens of it."""
    reshard_after_forward: bool = True
    fsdp_cpu_offload: bool = False
    """parallel.cpu_offload: sharded weights, gradients and optimizer state live in CPU memory."""

    @property
    def tokens(self) -> int:
        """Tokens of one micro-batch on one GPU (its share of every row under context parallelism)."""
        return self.micro_batch * self.seq_len // self.context_degree

    def replace(self, **changes) -> Setup:
        return dataclasses.replace(self, **changes)


DEFAULT = Setup(seq_len=1)
"""A setup's defaults (a slotted dataclass keeps them on no class attribute): what `config_overrides` leaves out."""


def micro_batch_rows(cfg: Config) -> int:
    """Full rows a micro-batch holds at most: `data.batch_tokens` (when set) replaces `train.micro_batch_size`; its
    padded micro-batches (none/sorted) hold up to that many tokens, so they count as that many full rows."""
    if not cfg.data.batch_tokens:
        return cfg.train.micro_batch_size
    return max(1, cfg.data.batch_tokens // cfg.data.max_length)


def setup_from_config(cfg: Config, *, n_gpus: int = 1, document_mask: bool | None = None) -> Setup:
    """The Setup `cfg` runs. `document_mask`: None = packed real data (data.packing=bfd) has document masks."""
    targets = ALL_LINEAR if cfg.peft.target_modules == "all-linear" else tuple(cfg.peft.target_modules)
    return Setup(
        seq_len=cfg.data.max_length, micro_batch=micro_batch_rows(cfg), grad_accum=cfg.train.grad_accum,
        precision=cfg.precision.mode, optimizer=cfg.optim.name, state_dtype=cfg.optim.state_dtype,
        optimizer_offload=cfg.optim.offload, low_bit_min_numel=cfg.optim.low_bit_min_numel,
        kahan=cfg.optim.bf16_update == "kahan", peft=cfg.peft.method, quantize=cfg.peft.quantize,
        embedding_on_host=cfg.peft.embedding_on_host, lora_rank=cfg.peft.r, lora_targets=targets,
        virtual_tokens=cfg.peft.num_virtual_tokens, checkpointing=cfg.activations.checkpointing,
        every=cfg.activations.every, skip_last=cfg.activations.skip_last, offload=cfg.activations.offload,
        mlp_chunk_tokens=cfg.activations.mlp_chunk_tokens, compile=cfg.compile.mode,
        memory_budget=cfg.compile.memory_budget, fused_loss=cfg.kernels.fused_loss,
        loss_chunk_tokens=cfg.kernels.loss_chunk_tokens, attention=cfg.model.attention,
        document_mask=cfg.data.packing == "bfd" if document_mask is None else document_mask,
        strategy=cfg.parallel.strategy, n_gpus=n_gpus if cfg.parallel.strategy != "none" else 1,
        context_degree=cfg.context.degree, reshard_after_forward=cfg.parallel.reshard_after_forward,
        fsdp_cpu_offload=cfg.parallel.cpu_offload)


def config_overrides(setup: Setup) -> list[str]:
    """Dotted overrides that make a Config run `setup` (only the keys the planner chooses)."""
    out = [f"data.max_length={setup.seq_len}", f"train.micro_batch_size={setup.micro_batch}",
           f"train.grad_accum={setup.grad_accum}", f"precision.mode={setup.precision}",
           f"optim.name={setup.optimizer}", f"compile.mode={setup.compile}",
           f"kernels.fused_loss={str(setup.fused_loss).lower()}",
           f"activations.checkpointing={setup.checkpointing}", f"activations.every={setup.every}",
           f"activations.offload={str(setup.offload).lower()}", f"model.attention={setup.attention}",
           f"parallel.strategy={setup.strategy}"]
    if setup.embedding_on_host:
        out.append("peft.embedding_on_host=true")
    if setup.state_dtype is not None:
        out.append(f"optim.state_dtype={setup.state_dtype}")
    if setup.optimizer_offload:
        out.append("optim.offload=true")
    if setup.low_bit_min_numel != DEFAULT.low_bit_min_numel:
        out.append(f"optim.low_bit_min_numel={setup.low_bit_min_numel}")
    if setup.fsdp_cpu_offload:
        out.append("parallel.cpu_offload=true")
    if setup.context_degree > 1:
        out.append(f"context.degree={setup.context_degree}")
    if setup.memory_budget != DEFAULT.memory_budget:
        out.append(f"compile.memory_budget={setup.memory_budget}")
    if setup.mlp_chunk_tokens:
        out.append(f"activations.mlp_chunk_tokens={setup.mlp_chunk_tokens}")
    if setup.skip_last:
        out.append(f"activations.skip_last={setup.skip_last}")
    if setup.loss_chunk_tokens != DEFAULT.loss_chunk_tokens:
        out.append(f"kernels.loss_chunk_tokens={setup.loss_chunk_tokens}")
    if setup.peft in ("lora", "dora"):
        targets = "all-linear" if setup.lora_targets == ALL_LINEAR else "[" + ",".join(setup.lora_targets) + "]"
        out += [f"peft.method={setup.peft}", f"peft.r={setup.lora_rank}", f"peft.target_modules={targets}"]
    elif setup.peft == "prompt_tuning":
        out += ["peft.method=prompt_tuning", f"peft.num_virtual_tokens={setup.virtual_tokens}"]
    if setup.quantize != "none":
        out.append(f"peft.quantize={setup.quantize}")
        if setup.compile != "none":  # measured 1.18x on the compiled 8B QLoRA step (qlora_h100_fused.md)
            out.append("kernels.fused_dequantize=true")
    return out
