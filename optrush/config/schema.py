"""The one typed configuration tree of optrush.

A YAML file holds only the values that differ from these defaults; the CLI adds dotted overrides
(`train.lr=2e-4 data.packing=bfd`). `optrush.config.load_config` builds a `Config` from both and rejects unknown
keys, wrong types and incompatible combinations before any work starts. This module imports no torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    path: str | None = None
    """HF checkpoint directory (config.json + *.safetensors) to start from. Exactly one of path/preset."""
    preset: str | None = None
    """Name of a built-in architecture (see `optrush.models.presets.PRESETS`), randomly initialised."""
    attention: Literal["sdpa", "flex", "varlen"] = "sdpa"
    """Attention backend. `sdpa`: PyTorch SDPA (packed batches get a dense document-causal mask); `flex`:
    FlexAttention with a document-causal block mask; `varlen`: variable-length attention over packed documents."""


@dataclass(kw_only=True, slots=True)
class DataConfig:
    path: str | None = None
    """Training data: a JSONL file (one record per line)."""
    eval_path: str | None = None
    """Held-out data in the same format; when unset, `eval_fraction` of `path` is held out."""
    eval_fraction: float = 0.0
    """Fraction of records held out for evaluation when `eval_path` is unset (0 = no eval)."""
    format: Literal["text", "prompt_completion", "recipe", "preference"] = "text"
    """How a record becomes tokens: raw `text` (every token trained), `prompt_completion` or `recipe`
    (loss on the completion only), `preference` (prompt, chosen and rejected columns; objective=reward or dpo)."""
    text_column: str = "text"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    chosen_column: str = "chosen"
    """data.format=preference: the column holding the preferred completion."""
    rejected_column: str = "rejected"
    """data.format=preference: the column holding the dispreferred completion."""
    tokenizer: str | None = None
    """Tokenizer directory; defaults to `model.path`."""
    max_length: int = 2048
    """Longest sequence in tokens (including BOS/EOS)."""
    too_long: Literal["truncate", "drop", "error"] = "truncate"
    """What to do with a record longer than `max_length`; the count is always reported."""
    packing: Literal["none", "bfd"] = "bfd"
    """`none`: pad each micro-batch to its longest sequence. `bfd`: best-fit-decreasing packing of whole
    documents into rows of `max_length` tokens (document-causal attention, positions restart per document)."""
    shuffle: bool = True


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    max_steps: int = 100
    """Optimizer steps to run."""
    micro_batch_size: int = 8
    """Rows per micro-batch (each row holds up to `data.max_length` tokens)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; the loss is normalised by the step's total trained tokens."""
    lr: float = 3e-4
    schedule: Literal["constant", "linear", "cosine", "wsd"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of `lr` (linear, cosine, wsd)."""
    decay_fraction: float = 0.2
    """wsd only: fraction of `max_steps` spent in the final decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm; 0 disables it."""
    seed: int = 0
    deterministic: bool = False
    """Deterministic algorithms and single-threaded reductions (bitwise repeatable CPU runs)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_every: int = 0
    """Run the eval loop every N steps (0 = only at the end, when eval data exists)."""
    eval_batches: int = 20
    """Micro-batches per evaluation."""
    verify: bool = False
    """Run the fast subset of `optrush check` (data sanity, numerics, packed == unpacked, accumulation == one
    large batch) on this config before the first step, and stop if any check fails (`optrush.check`)."""


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    name: Literal["adamw"] = "adamw"
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    """Decoupled weight decay; applied to matrices only (not norms, biases)."""
    fused: bool | None = None
    """Fused AdamW kernel; `null` = on for CUDA, off for CPU."""


@dataclass(kw_only=True, slots=True)
class PrecisionConfig:
    mode: Literal["fp32", "bf16_mixed", "bf16_pure", "fp8"] = "fp32"
    """`fp32`; `bf16_mixed`: fp32 weights and optimizer, bf16 autocast compute; `bf16_pure`: bf16 weights;
    `fp8`: `bf16_mixed` with the block matmuls in float8 (torchao float8 training; needs torchao and a GPU of
    compute capability 8.9+, e.g. H100)."""
    tf32: bool = True
    """Allow TF32 matmuls on Ampere+ GPUs (no effect on CPU)."""


@dataclass(kw_only=True, slots=True)
class KernelsConfig:
    fused_loss: bool = False
    """Fused linear + cross-entropy computed in chunks, never materialising the full (tokens x vocab) logits."""
    loss_chunk_tokens: int = 4096
    """Tokens per chunk of the fused loss (smaller = less memory, more launches)."""
    z_loss: float = 0.0
    """Weight of the z-loss (log-partition squared) regulariser; 0 disables it."""
    fused_ops: bool = False
    """Fused RMSNorm, RoPE and SwiGLU kernels (compile-friendly)."""


@dataclass(kw_only=True, slots=True)
class CompileConfig:
    mode: Literal["none", "blocks", "model"] = "none"
    """torch.compile: `blocks` compiles each transformer block (fast to compile), `model` the whole model."""
    dynamic: bool | None = None
    """Dynamic shapes for varying packed lengths (`null`: let torch decide)."""


@dataclass(kw_only=True, slots=True)
class ActivationsConfig:
    checkpointing: Literal["none", "full", "selective"] = "none"
    """Activation checkpointing per transformer block: `full` recomputes the whole block in backward,
    `selective` saves matmul outputs and recomputes the cheap ops."""
    every: int = 1
    """Checkpoint every k-th block only (1 = all blocks)."""
    offload: bool = False
    """Keep saved activations in pinned CPU memory during the forward pass."""


@dataclass(kw_only=True, slots=True)
class PeftConfig:
    method: Literal["none"] = "none"
    """Parameter-efficient fine-tuning method (`none` trains every weight)."""


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    strategy: Literal["none"] = "none"
    """Multi-device strategy (`none`: one device)."""


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    every: int = 0
    """Save a resumable checkpoint every N steps (0 = only at the end)."""
    keep_last: int = 2
    """Resumable checkpoints kept on disk; older ones are deleted after a newer one is complete."""
    resume: str = "auto"
    """`auto`: continue from the newest complete checkpoint in output_dir if any; `never`; or a checkpoint dir."""
    save_final: bool = True
    """Write the trained model in HF format (plus tokenizer) to `<output_dir>/final`."""


@dataclass(kw_only=True, slots=True)
class LoggingConfig:
    every: int = 1
    """Log metrics every N steps."""
    progress: bool = True
    """Show a rich progress bar (off automatically when not attached to a terminal)."""
    tensorboard: bool = False
    """Also write TensorBoard event files to `<output_dir>/tensorboard` (needs the tensorboard package)."""


@dataclass(kw_only=True, slots=True)
class RewardConfig:
    margin: float = 0.0
    """objective=reward: Bradley-Terry loss -log sigmoid(r_chosen - r_rejected - margin); 0 is the plain loss."""


@dataclass(kw_only=True, slots=True)
class DPOConfig:
    loss: Literal["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo"] = "sigmoid"
    """objective=dpo: `sigmoid` (DPO), `ipo`, `hinge` (SLiC), `robust` (noise-robust DPO); `simpo` and `orpo`
    need no reference model (see optrush/objectives/dpo.py for the formulas and papers)."""
    beta: float = 0.1
    """Strength of the implicit KL (temperature of the preference logits); ORPO: weight of the odds-ratio term."""
    label_smoothing: float = 0.0
    """Assumed probability that a preference label is flipped (sigmoid, robust, simpo); in [0, 0.5)."""
    reference: Literal["copy", "precomputed", "lora_disabled"] = "copy"
    """`copy`: a frozen copy of the starting model; `precomputed`: its log-probs computed once before training
    and cached in `<output_dir>/reference_logps.pt` (no second model in memory); `lora_disabled`: the base model
    with its adapters switched off (needs LoRA, issue #6: not available yet)."""
    simpo_gamma: float = 0.5
    """SimPO target reward margin gamma (in units of beta-scaled average log-prob)."""


@dataclass(kw_only=True, slots=True)
class GRPOConfig:
    group_size: int = 4
    """objective=grpo: completions sampled per prompt (k); advantages are normalised within each group."""
    rewards: list[str] = field(default_factory=lambda: ["optrush.objectives.grpo:recipe_format_reward"])
    """Reward functions as `module:function` import strings; each takes (prompts, completions) lists of
    strings and returns one float per completion; the rewards are summed."""
    clip_eps: float = 0.2
    """PPO clip range of the probability ratio."""
    kl_beta: float = 0.04
    """Weight of the per-token KL penalty to the frozen starting model (0: no reference model is kept)."""
    max_new_tokens: int = 64
    """Longest sampled completion in tokens."""
    temperature: float = 1.0
    """Sampling temperature (> 0)."""


@dataclass(kw_only=True, slots=True)
class Config:
    output_dir: str = "runs/default"
    """Where checkpoints, metrics and the final model go."""
    objective: Literal["causal_lm", "sft", "reward", "dpo", "grpo"] = "causal_lm"
    """`causal_lm`: next-token loss on every labelled token (pretraining); `sft`: the same loss, and the data
    format must mask prompts (prompt_completion or recipe); `reward`: a Bradley-Terry reward model and `dpo`: the
    DPO family, both on preference pairs (data.format=preference); `grpo`: group-relative policy optimisation on
    sampled completions of the data's prompts."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    activations: ActivationsConfig = field(default_factory=ActivationsConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
