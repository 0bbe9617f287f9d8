"""The one typed configuration tree of optrush.

A YAML file holds only the values that differ from these defaults; the CLI adds dotted overrides
(`train.lr=2e-4 data.packing=bfd`). `optrush.config.load_config` builds a `Config` from both and rejects unknown
keys, wrong types and incompatible combinations before any work starts. A list field also takes one item alone
(`data.json_columns=NER` is `[NER]`). This module imports no torch.
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
    rope_scaling: dict | None = None
    """Override the checkpoint's RoPE scaling to extend its context (transformers' definitions), e.g.
    `{rope_type: yarn, factor: 4.0, original_max_position_embeddings: 8192}`; rope_type is one of linear (PI),
    dynamic (NTK, evaluated at `max_seq_len`), yarn, llama3 (+ low_freq_factor, high_freq_factor). null = keep."""
    max_seq_len: int = 0
    """Rows of the RoPE tables = the longest trainable sequence (saved as max_position_embeddings); 0 = the
    checkpoint's or preset's. Raise it with `rope_scaling` to fine-tune beyond the original context."""


@dataclass(kw_only=True, slots=True)
class DataCleanConfig:
    """Filters applied to the training records before tokenization (`optrush data clean` runs the same ones and
    writes a report). Every rule is off at its default; rules run in the order listed here, and every dropped
    record is counted under the first rule that rejected it."""
    drop_patterns: list[str] = field(default_factory=list)
    """Regular expressions (Python `re`); a record whose text matches any of them is dropped."""
    charset: str | None = None
    """A regex character class, e.g. `[\\x00-\\x7f]`; a record holding a character outside it is dropped."""
    nonempty: list[str] = field(default_factory=list)
    """Columns that must be present and non-blank (non-empty for lists)."""
    min_chars: int = 0
    """Fewest characters of text (all string fields and list items); 0 = no minimum."""
    max_chars: int = 0
    """Most characters of text; 0 = no maximum."""
    items_field: str = "ingredients"
    """The list column that `min_items` / `max_items` count."""
    min_items: int = 0
    """Fewest items in `items_field`; 0 = no minimum."""
    max_items: int = 0
    """Most items in `items_field`; 0 = no maximum."""
    min_tokens: int = 0
    """Fewest tokens of the rendered example (as `data.format` renders it, BOS included); 0 = no minimum."""
    max_tokens: int = 0
    """Most tokens of the rendered example; 0 = no maximum (`data.max_length` still applies after cleaning)."""
    dedup: bool = False
    """Drop exact duplicates (equal field for field), keeping the first."""
    near_dedup: bool = False
    """Drop near-duplicates: MinHash signatures of word n-grams with LSH banding, keeping the first."""
    near_dedup_threshold: float = 0.8
    """Estimated Jaccard similarity of word n-gram sets at or above which a record is a near-duplicate."""
    near_dedup_ngram: int = 3
    """Words per shingle for near-duplicate detection."""
    rare_field: str = "NER"
    """The list column whose items `rare_min_count` counts (for recipes: NER ingredient names)."""
    rare_min_count: int = 0
    """Drop records using an item of `rare_field` found in fewer than this many records; 0 = off."""


@dataclass(kw_only=True, slots=True)
class DataConfig:
    path: str | None = None
    """Training data: a JSONL, JSON, Parquet or CSV/TSV file, a folder of text files (one document per file), or a
    directory written by `datasets`' `save_to_disk` (see `optrush.data.sources`)."""
    on_error: Literal["error", "skip"] = "error"
    """A malformed row: `error` stops with the file and line/row; `skip` counts it, reports it and writes it to
    `rejects_path`."""
    json_columns: list[str] = field(default_factory=list)
    """Columns that hold JSON text to decode on read, e.g. `[ingredients, directions, NER]` for RecipeNLG's CSV,
    whose lists are stored as JSON strings."""
    rejects_path: str | None = None
    """data.on_error=skip: JSONL file the bad rows are written to (default: `<data.path>.rejects.jsonl`)."""
    eval_path: str | None = None
    """Held-out data in the same format; when unset, `eval_fraction` of `path` is held out."""
    eval_fraction: float = 0.0
    """Fraction of records held out for evaluation when `eval_path` is unset (0 = no eval)."""
    format: Literal["text", "prompt_completion", "recipe", "chat", "preference"] = "text"
    """How a record becomes tokens: raw `text` (every token trained), `prompt_completion` or `recipe`
    (loss on the completion only), `chat` (a list of system/user/assistant messages; loss on assistant turns
    only), `preference` (prompt, chosen and rejected columns; objective=reward or dpo)."""
    messages_column: str = "messages"
    """data.format=chat: the column holding the list of {"role", "content"} messages."""
    chat_template: Literal["tokenizer", "chatml", "qwen", "llama3"] = "tokenizer"
    """data.format=chat: render with the tokenizer's own chat template, or a built-in one (optrush.data.chat)."""
    text_column: str = "text"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    chosen_column: str = "chosen"
    """data.format=preference: the column holding the preferred completion."""
    rejected_column: str = "rejected"
    """data.format=preference: the column holding the dispreferred completion."""
    shared_prompt: bool = False
    """data.format=preference: store each pair's prompt once, both completions attending to it (positions continue
    from the prompt); the same log-probs and rewards as separate sequences, fewer tokens. Needs model.attention=sdpa."""
    tokenizer: str | None = None
    """Tokenizer directory; defaults to `model.path`."""
    max_length: int = 2048
    """Longest sequence in tokens (including BOS/EOS)."""
    too_long: Literal["truncate", "drop", "error", "split"] = "truncate"
    """What to do with a record longer than `max_length`: keep its first `max_length` tokens, drop it, stop with an
    error naming it, or (data.format=text only) cut it into consecutive pieces of `max_length` tokens; the counts
    (and the tokens truncation cut) are always reported."""
    packing: Literal["none", "sorted", "bfd"] = "bfd"
    """`none`: pad each micro-batch to its longest sequence. `sorted`: sort by length, cut into micro-batches,
    shuffle the micro-batches (each padded to its longest). `bfd`: best-fit-decreasing packing of whole
    documents into rows of `max_length` tokens (document-causal attention, positions restart per document)."""
    batch_tokens: int = 0
    """Size micro-batches by padded tokens instead of `train.micro_batch_size` rows (0 = off; then >=
    `max_length`): `none`/`sorted` put as many rows in a micro-batch as keep rows x longest within it, `bfd` uses
    `batch_tokens // max_length` rows. Replaces `train.micro_batch_size` in the train and eval loaders."""
    shuffle: bool = True
    prefetch: int = 2
    """Training micro-batches collated (and pinned, on CUDA) ahead by a background thread; 0 = none."""
    num_proc: int = 1
    """Processes that tokenize the data (1 = in this process; the fast tokenizer also uses threads)."""
    cache_dir: str | None = None
    """Tokenize once: cache the tokenized examples here, keyed by the data files, the tokenizer and the config
    fields that shape examples, and reuse them on later runs (`optrush.data.cache`); unset = no cache."""
    clean: DataCleanConfig = field(default_factory=DataCleanConfig)
    """Record filters applied before tokenization (see `DataCleanConfig`); all off by default."""


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
    """Run the eval loop every N steps (0 = only at the end, when eval data exists); N > 0 needs eval data
    (data.eval_path or data.eval_fraction)."""
    eval_batches: int = 20
    """Micro-batches per evaluation."""
    sample_every: int = 0
    """Every N steps, greedily continue `train.sample_prompts` and log the texts (`sample_0`, ...) and their
    repetition rate (recipe data: also recipe metrics) to the metrics (optrush.generate.evaluate); 0 = off."""
    sample_prompts: list[str] = field(default_factory=list)
    """Prompts for `train.sample_every`."""
    sample_max_new_tokens: int = 64
    """Longest sample of `train.sample_every`, in tokens."""
    verify: bool = False
    """Run the fast subset of `optrush check` (data sanity, numerics, packed == unpacked, accumulation == one
    large batch) on this config before the first step, and stop if any check fails (`optrush.check`)."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the trained weights with this decay (e.g. 0.999) and evaluate and
    save it instead of the raw weights (optrush.optim.ema); 0 = off."""


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    name: Literal["adamw", "adamw8bit", "adamw4bit", "adafactor", "lion", "muon", "schedule_free_adamw"] = "adamw"
    """`adamw`; `adamw8bit` / `adamw4bit` (torchao, moments quantised blockwise); `adafactor` (factored second
    moments; its lr is relative to each weight's RMS); `lion` (sign updates, one buffer; use a 3-10x smaller
    lr); `muon` (orthogonalised momentum for the hidden matrices, AdamW for the rest); `schedule_free_adamw`
    (no decay schedule: needs train.schedule=constant). See README "Optimizers"."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas (momentum, second moment); Lion's (interpolation, momentum) betas; schedule-free's beta1 is
    the interpolation between its average and its iterate."""
    eps: float = 1e-8
    """Added to the denominator of Adam-style updates (> 0)."""
    weight_decay: float = 0.0
    """Decoupled weight decay; applied to matrices only (not norms, biases)."""
    fused: bool | None = None
    """Fused AdamW kernel; `null` = on for CUDA, off for CPU."""
    momentum: float = 0.95
    """muon: momentum of the Nesterov gradient buffer that is orthogonalised."""
    ns_steps: int = 5
    """muon: Newton-Schulz iterations per orthogonalisation."""
    state_dtype: Literal["fp32", "bf16"] | None = None
    """Dtype of the optimizer's moment buffers (adamw, lion, muon, schedule_free_adamw); `null` = the weights'
    dtype (bf16 under precision.mode=bf16_pure and fp8_pure). bf16 halves the state memory."""
    bf16_update: Literal["plain", "kahan", "stochastic"] = "plain"
    """precision.mode=bf16_pure or fp8_pure: how an update is written into the bf16 weights: `plain` rounds to
    nearest (updates under half a bf16 ulp are lost), `kahan` carries the rounding residue to the next step (2 more
    bytes per weight), `stochastic` rounds up or down at random, unbiased (adamw8bit/adamw4bit: stochastic only)."""
    offload: bool = False
    """Keep optimizer state and the optimizer step on the CPU (torchao CPUOffloadOptimizer; CUDA only)."""
    low_bit_min_numel: int = 1_048_576
    """adamw8bit/adamw4bit: tensors with fewer elements (default 2**20) keep moments in their own dtype and are
    stepped together in a few multi-tensor kernels, instead of one compiled torchao step each (about 0.45 ms per
    tensor on an H100; 8-bit moments would save at most 6 MiB per such tensor). 0 quantizes every tensor torchao
    can (4096+ elements). See optrush.optim.low_bit."""


BF16_WEIGHT_MODES = ("bf16_pure", "fp8_pure")
"""precision.mode values that store the weights (and by default the optimizer state) in bf16."""
AUTOCAST_MODES = ("bf16_mixed", "fp8")
"""precision.mode values that keep fp32 weights and compute under bf16 autocast."""
FLOAT8_MODES = ("fp8", "fp8_pure")
"""precision.mode values whose transformer-block linears multiply in float8 (optrush.train.float8)."""


@dataclass(kw_only=True, slots=True)
class PrecisionConfig:
    mode: Literal["fp32", "bf16_mixed", "bf16_pure", "fp8", "fp8_pure"] = "fp32"
    """`fp32`; `bf16_mixed`: fp32 weights and optimizer, bf16 autocast compute; `bf16_pure`: bf16 weights (and
    optimizer state unless optim.state_dtype=fp32; optim.bf16_update picks plain/kahan/stochastic writes);
    `fp8`: `bf16_mixed` with the block matmuls in float8 (torchao float8 training; needs torchao and a GPU of
    compute capability 8.9+, e.g. H100); `fp8_pure`: `bf16_pure` with the block matmuls in float8."""
    tf32: bool = True
    """Allow TF32 matmuls on Ampere+ GPUs (no effect on CPU)."""

    @property
    def bf16_weights(self) -> bool:
        return self.mode in BF16_WEIGHT_MODES

    @property
    def autocast(self) -> bool:
        return self.mode in AUTOCAST_MODES

    @property
    def float8(self) -> bool:
        return self.mode in FLOAT8_MODES


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
    fused_dequantize: bool = False
    """QLoRA (peft.quantize nf4/int8): dequantize each frozen weight with one kernel instead of the eager
    gather/scale/cast chain: Triton for NF4 on CUDA, in forward and backward; otherwise a compiled one per weight
    shape in the forward."""


@dataclass(kw_only=True, slots=True)
class CompileConfig:
    mode: Literal["none", "blocks", "model"] = "none"
    """torch.compile: `blocks` compiles each transformer block (fast to compile), `model` the whole model."""
    dynamic: bool | None = None
    """Dynamic shapes for varying packed lengths (`null`: let torch decide)."""
    memory_budget: float = 1.0
    """Fraction of its activations the compiled graph keeps for backward (0-1): 1 keeps what is fastest; lower
    values recompute the cheapest ops in backward (pointwise first, then matmuls) until the kept activations fit
    the fraction; 0 recomputes everything, like full checkpointing. Inductor's min-cut partitioner (torch's
    `activation_memory_budget`), set for this model's compile only; needs compile.mode=blocks or model."""


@dataclass(kw_only=True, slots=True)
class ActivationsConfig:
    checkpointing: Literal["none", "full", "selective"] = "none"
    """Activation checkpointing per transformer block: `full` recomputes the whole block in backward,
    `selective` saves matmul outputs and recomputes the cheap ops."""
    every: int = 1
    """Checkpoint every k-th block only (1 = all blocks)."""
    skip_last: int = 0
    """The last n blocks are neither checkpointed nor offloaded. Backward reaches them first, so what they keep is
    held through the loss only, and they skip their recomputation and the copy round trip: a few blocks' worth
    of memory for speed (e.g. freed by a smaller kernels.loss_chunk_tokens)."""
    offload: bool = False
    """Keep what each block saves for backward (its inputs, with `checkpointing: full`) in pinned CPU memory,
    copied on a side CUDA stream during the forward pass and prefetched one block ahead in backward."""
    mlp_chunk_tokens: int = 0
    """Run each MLP over chunks of this many tokens, each chunk checkpointed, so its (tokens x ffn_dim)
    intermediates never exist for the whole sequence; 0 = off. For very long sequences (e.g. 8192), with
    checkpointing full or none (selective would keep the chunks' matmul outputs)."""


@dataclass(kw_only=True, slots=True)
class ContextConfig:
    degree: int = 1
    """Context parallelism: ranks that split each sequence and run ring attention (optrush.parallel.context);
    1 = off. data.max_length must divide by it (by 2 x degree for the zigzag layout)."""
    layout: Literal["zigzag", "contiguous"] = "zigzag"
    """How the sequence is cut: `zigzag` gives rank r chunks r and 2 x degree - 1 - r (equal causal work on
    every rank); `contiguous` gives rank r the r-th slice (the last rank does the most work)."""


@dataclass(kw_only=True, slots=True)
class PeftConfig:
    method: Literal["none", "lora", "dora", "prompt_tuning"] = "none"
    """Parameter-efficient fine-tuning: `none` trains every weight; `lora` trains low-rank adapters on
    `target_modules` (everything else frozen); `dora` adds DoRA's per-output magnitude vector (optrush.peft.lora);
    `prompt_tuning` trains only `num_virtual_tokens` embeddings prepended to every sequence (optrush.peft.prompt)."""
    r: int = 16
    """LoRA rank (columns of B, rows of A)."""
    alpha: float = 32.0
    """LoRA alpha: the update is scaled by alpha / r (alpha / sqrt(r) with `rslora`)."""
    dropout: float = 0.0
    """Dropout on the adapter's input, in [0, 1); 0 costs nothing (no copy of the input)."""
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    """`all-linear` (every attention and MLP projection) or a list of HF module names: q_proj, k_proj, v_proj,
    o_proj, gate_proj, up_proj, down_proj. One name alone (`q_proj`) means a one-element list."""
    rslora: bool = False
    """Rank-stabilised LoRA: scale by alpha / sqrt(r) (arXiv:2312.03732)."""
    lora_plus_ratio: float = 1.0
    """LoRA+ (arXiv:2402.12354): the B matrices learn at `train.lr` times this ratio (1 = plain LoRA; the
    paper suggests 16)."""
    save: Literal["merged", "adapter", "both"] = "both"
    """What `<output_dir>/final` holds: the `merged` HF model, the PEFT `adapter` (in `final/adapter`), or both."""
    quantize: Literal["none", "nf4", "int8"] = "none"
    """Store the frozen base weights of the blocks' linear layers quantized (QLoRA; needs method lora or dora):
    `nf4` 4-bit NormalFloat with double-quantized scales (4.127 bits/weight), `int8` per-row absmax; dequantized
    per matmul, computed in the training dtype. Embeddings and the output head stay unquantized
    (optrush.peft.quant)."""
    embedding_on_host: bool = False
    """Keep the frozen token embedding table in pinned host memory, read over PCIe by the GPU's embedding kernel
    (method lora or dora, one GPU, untied head): frees vocab x dim of GPU memory (1 GiB at Llama 3 8B) for a few
    ms per step (optrush.peft.host_embedding)."""
    num_virtual_tokens: int = 20
    """Prompt tuning: learned embeddings prepended to every sequence."""
    prompt_init: Literal["vocab", "random"] = "vocab"
    """Prompt tuning: start the virtual tokens from the embeddings of randomly drawn vocabulary tokens (`vocab`,
    PEFT's SAMPLE_VOCAB) or from normal noise with the embedding table's standard deviation (`random`)."""


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    strategy: Literal["none", "ddp", "fsdp", "hsdp"] = "none"
    """Data parallelism over the processes torchrun launches (`optrush train ... --nproc N`): `none` (one
    device), `ddp` (replicated model, all-reduced gradients), `fsdp` (FSDP2: weights, gradients and optimizer
    state sharded per transformer block), `hsdp` (FSDP2 within groups of `world / replicate` ranks, replicated
    across `replicate` groups). See optrush/parallel/fsdp.py."""
    reshard_after_forward: bool = True
    """fsdp/hsdp: free each block's gathered weights after its forward and gather them again for backward
    (ZeRO-3, least memory); false keeps them until backward (ZeRO-2-like: one all-gather fewer per block)."""
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """Dtype gradients are reduced in across ranks. The gathered weights' dtype follows precision.mode
    (bf16 under bf16_mixed/fp8, otherwise the parameters' own)."""
    replicate: int = 1
    """hsdp: number of replica groups (e.g. nodes); the shard degree is world size / replicate. Must be > 1 for
    hsdp and 1 otherwise."""
    cpu_offload: bool = False
    """fsdp/hsdp: keep sharded weights, gradients and the optimizer step in CPU memory (FSDP2 CPUOffloadPolicy);
    needs CUDA."""


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    every: int = 0
    """Save a resumable checkpoint every N steps (0: none; `save_final` still writes the trained model)."""
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
    and cached in `<output_dir>/reference_logps.pt` (no second model in memory); `lora_disabled`: the trained model
    with its adapters switched off, i.e. the starting model, at no extra memory (needs peft.method=lora or dora)."""
    simpo_gamma: float = 0.5
    """SimPO target reward margin gamma (in units of beta-scaled average log-prob)."""


@dataclass(kw_only=True, slots=True)
class GRPOConfig:
    group_size: int = 4
    """objective=grpo: completions sampled per prompt (k); advantages are normalised within each group."""
    rewards: list[str] = field(default_factory=lambda: ["optrush.objectives.grpo:recipe_format_reward"])
    """Reward functions as `module:function` or `path/to/file.py:function`; each is called as fn(prompts,
    completions), two lists of strings (checked at start-up), and returns one float per completion; the rewards are
    summed."""
    clip_eps: float = 0.2
    """PPO clip range of the probability ratio."""
    kl_beta: float = 0.04
    """Weight of the per-token KL penalty to the frozen starting model (0: no reference model is kept)."""
    max_new_tokens: int = 64
    """Longest sampled completion in tokens."""
    temperature: float = 1.0
    """Sampling temperature (> 0)."""
    updates_per_generation: int = 1
    """Optimizer steps trained on each generated batch (TRL's `num_iterations`): > 1 reuses the rollouts with the
    sampling policy's log-probs stored, so the ratio moves off 1 and the clip binds."""
    reference: Literal["copy", "lora_disabled"] = "copy"
    """KL reference: `copy` (a frozen copy of the starting model) or `lora_disabled` (the trained model with its
    adapters switched off: no second model in memory; needs peft.method=lora or dora)."""


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
    context: ContextConfig = field(default_factory=ContextConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
