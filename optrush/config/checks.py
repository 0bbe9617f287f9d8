"""Checks on a built `Config`: values that are individually valid but wrong together, or out of range, and what a
run must still be given. Each `*_problems` function returns one message per problem, naming the keys at fault and
what to set instead; `validate` raises them together as one `ConfigError`.
"""
from __future__ import annotations

from optrush.config.errors import ConfigError, did_you_mean
from optrush.config.schema import Config, DataConfig, OptimConfig


def validate(cfg: Config, *, synthetic_data: bool = False, complete: bool = True) -> None:
    """Reject values that are individually valid but wrong together, or out of range; with `complete`, also a
    config that lacks what a run needs (see `load_config`)."""
    problems = config_problems(cfg, synthetic_data=synthetic_data, complete=complete)
    if problems:
        raise ConfigError(problems_message(problems))


def problems_message(problems: list[str]) -> str:
    return "invalid configuration:\n  - " + "\n  - ".join(problems)


def config_problems(cfg: Config, *, synthetic_data: bool = False, complete: bool = True) -> list[str]:
    """What `validate` rejects, one message per problem."""
    problems = missing_problems(cfg, synthetic_data=synthetic_data) if complete else []
    if cfg.model.path is not None and cfg.model.preset is not None:
        problems.append("set exactly one of model.path (an HF checkpoint directory) or model.preset "
                        f"(a built-in architecture); got path={cfg.model.path!r}, preset={cfg.model.preset!r}")
    if cfg.objective == "sft" and cfg.data.format == "text":
        problems.append("objective=sft trains on completions only: set data.format to prompt_completion, recipe "
                        "or chat (or use objective=causal_lm for raw text)")
    positive = {"train.max_steps": cfg.train.max_steps, "train.micro_batch_size": cfg.train.micro_batch_size,
                "train.grad_accum": cfg.train.grad_accum, "data.max_length": cfg.data.max_length,
                "logging.every": cfg.logging.every, "checkpoint.keep_last": cfg.checkpoint.keep_last,
                "train.eval_batches": cfg.train.eval_batches, "activations.every": cfg.activations.every}
    problems += [f"{key}={value}: must be >= 1" for key, value in positive.items() if value < 1]
    non_negative = {"train.warmup_steps": cfg.train.warmup_steps, "train.eval_every": cfg.train.eval_every,
                    "checkpoint.every": cfg.checkpoint.every, "train.max_grad_norm": cfg.train.max_grad_norm,
                    "optim.weight_decay": cfg.optim.weight_decay, "activations.skip_last": cfg.activations.skip_last}
    problems += [f"{key}={value}: must be >= 0" for key, value in non_negative.items() if value < 0]
    if cfg.train.lr <= 0:
        problems.append(f"train.lr={cfg.train.lr}: must be > 0")
    if cfg.train.sample_every < 0 or cfg.train.sample_max_new_tokens < 1:
        problems.append("train.sample_every must be >= 0 and train.sample_max_new_tokens >= 1")
    if cfg.train.sample_every > 0 and (not cfg.train.sample_prompts or cfg.objective == "reward"):
        problems.append("train.sample_every > 0 generates from train.sample_prompts: give at least one prompt, e.g. "
                        "train.sample_prompts=['Recipe: Soup'], with a language-model objective (not reward)")
    if cfg.data.batch_tokens and cfg.data.batch_tokens < cfg.data.max_length:
        problems.append(f"data.batch_tokens={cfg.data.batch_tokens}: must be 0 (off) or >= data.max_length="
                        f"{cfg.data.max_length}, so that a micro-batch has room for the longest example")
    if not 0 <= cfg.data.eval_fraction < 1:
        problems.append(f"data.eval_fraction={cfg.data.eval_fraction}: must be in [0, 1)")
    if cfg.data.eval_path is not None and cfg.data.eval_fraction > 0:
        problems.append("set data.eval_path or data.eval_fraction, not both")
    if cfg.train.eval_every > 0 and cfg.data.eval_path is None and cfg.data.eval_fraction == 0:
        problems.append(f"train.eval_every={cfg.train.eval_every} evaluates on held-out data, and there is none: set "
                        "data.eval_path (a held-out file) or data.eval_fraction (e.g. 0.05 of data.path), or "
                        "train.eval_every=0")
    if not 0 <= cfg.train.min_lr_ratio <= 1 or not 0 <= cfg.train.decay_fraction <= 1:
        problems.append("train.min_lr_ratio and train.decay_fraction must be in [0, 1]")
    if cfg.train.warmup_steps > cfg.train.max_steps:
        problems.append(f"train.warmup_steps={cfg.train.warmup_steps} exceeds train.max_steps={cfg.train.max_steps}")
    if cfg.precision.mode != "fp32" and cfg.train.deterministic:
        problems.append("train.deterministic=true needs precision.mode=fp32 (bf16 reductions are not repeatable)")
    if not 0 <= cfg.compile.memory_budget <= 1:
        problems.append(f"compile.memory_budget={cfg.compile.memory_budget}: must be in [0, 1] (the fraction of "
                        "activations the compiled graph keeps)")
    elif cfg.compile.memory_budget < 1 and cfg.compile.mode == "none":
        problems.append(f"compile.memory_budget={cfg.compile.memory_budget} tells torch.compile what to recompute: "
                        "set compile.mode=blocks or model (or use activations.checkpointing without compile)")
    if cfg.activations.offload and cfg.compile.mode == "model":
        problems.append("activations.offload=true needs compile.mode=blocks or none: its hooks must run outside "
                        "the compiled graph")
    problems += kernel_problems(cfg)
    problems += long_context_problems(cfg)
    problems += clean_problems(cfg)
    problems += objective_problems(cfg)
    problems += peft_problems(cfg)
    problems += optim_problems(cfg)
    problems += parallel_problems(cfg)
    problems += preset_problems(cfg)
    return problems


def missing_problems(cfg: Config, *, synthetic_data: bool) -> list[str]:
    """What a run must be given that recipes often leave to the command line."""
    problems = []
    if cfg.model.path is None and cfg.model.preset is None:
        problems.append("set exactly one of model.path (an HF checkpoint directory) or model.preset "
                        "(a built-in architecture); neither is set")
    if cfg.model.preset is not None and cfg.data.tokenizer is None and not synthetic_data:
        problems.append("model.preset builds a fresh model, so data.tokenizer must name a tokenizer directory")
    return problems


def clean_problems(cfg: Config) -> list[str]:
    """Out-of-range data.clean bounds."""
    c, problems = cfg.data.clean, []
    bounds = {"chars": (c.min_chars, c.max_chars), "items": (c.min_items, c.max_items),
              "tokens": (c.min_tokens, c.max_tokens)}
    for name, (low, high) in bounds.items():
        if low < 0 or high < 0:
            problems.append(f"data.clean.min_{name}/max_{name} must be >= 0 (0 = no bound), got {low}/{high}")
        elif high and low > high:
            problems.append(f"data.clean.min_{name}={low} exceeds data.clean.max_{name}={high}: nothing would pass")
    if not 0 < c.near_dedup_threshold <= 1:
        problems.append(f"data.clean.near_dedup_threshold={c.near_dedup_threshold}: must be in (0, 1]")
    if cfg.data.prefetch < 0 or cfg.data.num_proc < 1:
        problems.append(f"data.prefetch={cfg.data.prefetch} must be >= 0 and data.num_proc={cfg.data.num_proc} >= 1")
    if cfg.data.too_long == "split" and cfg.data.format != "text":
        problems.append(f"data.too_long=split cuts whole documents, so it needs data.format=text; data.format="
                        f"{cfg.data.format} has prompts a piece would lose: use data.too_long=truncate, drop or error")
    if c.near_dedup_ngram < 1 or c.rare_min_count < 0:
        problems.append("data.clean.near_dedup_ngram must be >= 1 and data.clean.rare_min_count >= 0")
    return problems + preference_clean_problems(cfg.data)


def preference_clean_problems(data: DataConfig) -> list[str]:
    """The data.clean rules that cannot judge preference pairs (data.format=preference), which are cleaned on their
    three texts only: list columns (items, rare vocabulary) are recipe columns a pair does not have."""
    if data.format != "preference":
        return []
    c, problems = data.clean, []
    pair_columns = (data.prompt_column, data.chosen_column, data.rejected_column)
    if c.min_items or c.max_items:
        problems.append("data.clean.min_items/max_items count a list column, which preference pairs do not have: "
                        "set them to 0 and bound the texts with data.clean.min_chars/max_chars")
    if c.rare_min_count:
        problems.append("data.clean.rare_min_count counts the items of a list column, which preference pairs do not "
                        "have: set it to 0")
    if other := [column for column in c.nonempty if column not in pair_columns]:
        problems.append(f"data.clean.nonempty={other}: preference pairs are cleaned on their texts only, the "
                        f"columns {list(pair_columns)}: list only those")
    return problems


def kernel_problems(cfg: Config) -> list[str]:
    """Attention backends and fused kernels that cannot run with the rest of the config."""
    problems = []
    if cfg.model.attention != "sdpa" and cfg.train.device == "cpu":
        why = "FlexAttention has no CPU backward" if cfg.model.attention == "flex" else "varlen_attn has no CPU kernel"
        problems.append(f"model.attention={cfg.model.attention} needs a CUDA GPU ({why}); use model.attention=sdpa "
                        "with train.device=cpu")
    if cfg.model.attention == "varlen" and cfg.precision.mode == "fp32":
        problems.append("model.attention=varlen runs FlashAttention, which takes bf16 only: set precision.mode to "
                        "bf16_mixed or bf16_pure, or use model.attention=flex or sdpa for fp32")
    if cfg.model.attention == "flex" and cfg.data.packing != "bfd" and cfg.objective in ("causal_lm", "sft",
                                                                                          "reward", "dpo"):
        problems.append(f"model.attention=flex with data.packing={cfg.data.packing}: FlexAttention's document masks "
                        "are for packed rows; padded batches change length from batch to batch, and flex compiles "
                        "anew for every length (torch 2.11 cannot compile it for a symbolic length). Set "
                        "data.packing=bfd, or model.attention=sdpa (flash attention on padded rows)")
    if cfg.kernels.fused_dequantize and cfg.peft.quantize == "none":
        problems.append("kernels.fused_dequantize=true speeds up the dequantization of a quantized base: it needs "
                        "peft.quantize=nf4 or int8")
    if cfg.kernels.loss_chunk_tokens < 1:
        problems.append(f"kernels.loss_chunk_tokens={cfg.kernels.loss_chunk_tokens}: must be >= 1")
    if cfg.kernels.z_loss < 0:
        problems.append(f"kernels.z_loss={cfg.kernels.z_loss}: must be >= 0")
    return problems


# RoPE scaling types of optrush.models.layers.rope_inv_freq and the keys each one needs (transformers' names)
ROPE_REQUIRED = {"linear": ("factor",), "dynamic": ("factor", "original_max_position_embeddings"),
                 "yarn": ("factor", "original_max_position_embeddings"),
                 "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def long_context_problems(cfg: Config) -> list[str]:
    """RoPE overrides, MLP chunking and context parallelism out of range or impossible together."""
    problems = []
    if cfg.model.rope_scaling is not None:
        scaling = cfg.model.rope_scaling
        rope_type = scaling.get("rope_type", scaling.get("type"))
        if rope_type not in ROPE_REQUIRED:
            problems.append(f"model.rope_scaling.rope_type={rope_type!r}: expected one of {', '.join(ROPE_REQUIRED)}")
        elif missing := [k for k in ROPE_REQUIRED[rope_type] if k not in scaling]:
            problems.append(f"model.rope_scaling (rope_type {rope_type}) needs {', '.join(missing)}")
    non_negative = {"model.max_seq_len": cfg.model.max_seq_len,
                    "activations.mlp_chunk_tokens": cfg.activations.mlp_chunk_tokens}
    problems += [f"{key}={value}: must be >= 0 (0 = off/default)" for key, value in non_negative.items() if value < 0]
    if cfg.activations.mlp_chunk_tokens > 0 and cfg.activations.checkpointing == "selective":
        # the block's policy saves matmul outputs inside each chunk's checkpoint too (33.6 GiB at 65,536 tokens on
        # the 1B shape, benchmarks/results/memory_peak.md): selective's memory plus the chunks' recomputation
        problems.append(f"activations.mlp_chunk_tokens={cfg.activations.mlp_chunk_tokens} with "
                        "activations.checkpointing=selective frees nothing: the selective policy keeps every MLP "
                        "chunk's matmul outputs. Use activations.checkpointing=full (or none) with MLP chunks, or "
                        "selective without them (activations.mlp_chunk_tokens=0)")
    cp = cfg.context
    if cp.degree < 1:
        problems.append(f"context.degree={cp.degree}: must be >= 1 (1 = no context parallelism)")
    elif cp.degree > 1 and (cfg.data.packing == "bfd" or cfg.model.attention != "sdpa"):
        problems.append("context.degree > 1 runs causal ring attention over whole rows: set data.packing to none "
                        "or sorted and model.attention=sdpa (packed document masks are not split across ranks)")
    if cp.degree > 1 and cfg.objective not in ("causal_lm", "sft"):
        problems.append(f"context.degree > 1 shards token-level losses: objective={cfg.objective} needs whole "
                        "sequences on each rank; use causal_lm or sft, or context.degree=1")
    if cp.degree > 1 and cfg.parallel.strategy == "none":
        problems.append("context.degree > 1 runs one process per share of each row, and their gradients are summed by "
                        "the data-parallel strategy: set parallel.strategy=ddp (or fsdp, hsdp) and launch "
                        "degree x replicas processes with --nproc")
    if cp.degree > 1 and (cfg.train.sample_every or cfg.peft.method == "prompt_tuning"):
        problems.append("context.degree > 1 shards whole rows: train.sample_every (KV-cache decoding) and "
                        "peft.method=prompt_tuning (prepends to each row) are not supported with it")
    return problems


def parallel_problems(cfg: Config) -> list[str]:
    """Data-parallel settings that cannot work together. The world size is only known at launch, so
    optrush.parallel.distributed checks the process-group environment and that `replicate` divides it."""
    p, problems = cfg.parallel, []
    if p.strategy == "hsdp" and p.replicate < 2:
        problems.append(f"parallel.strategy=hsdp needs parallel.replicate >= 2 replica groups (got {p.replicate}); "
                        "with one group use parallel.strategy=fsdp")
    if p.strategy != "hsdp" and p.replicate != 1:
        problems.append(f"parallel.replicate={p.replicate} applies to parallel.strategy=hsdp only; set it to 1")
    if p.cpu_offload and p.strategy not in ("fsdp", "hsdp"):
        problems.append("parallel.cpu_offload=true offloads FSDP2 shards: it needs parallel.strategy=fsdp or hsdp")
    if p.cpu_offload and cfg.train.device == "cpu":
        problems.append("parallel.cpu_offload=true moves shards between GPU and host: it needs train.device=cuda "
                        "or auto")
    if p.strategy == "ddp" and p.reduce_dtype == "bf16" and cfg.train.device == "cpu":
        problems.append("parallel.reduce_dtype=bf16 under ddp is torch's bf16 all-reduce hook, which needs NCCL "
                        "(CUDA): use parallel.reduce_dtype=fp32 on CPU, or parallel.strategy=fsdp")
    if p.strategy != "none" and cfg.objective == "dpo" and cfg.dpo.reference == "precomputed":
        problems.append("dpo.reference=precomputed caches the reference log-probs in one file that every rank would "
                        "write at once (not supported yet): use dpo.reference=copy with a parallel.strategy")
    if p.strategy != "none" and cfg.train.verify:
        problems.append("train.verify=true runs its checks in one process: run `optrush check CONFIG "
                        "parallel.strategy=none` before the distributed run and set train.verify=false")
    return problems


def optimizer_problems(o: OptimConfig) -> list[str]:
    """optim.* values out of range or wrong together (also checked by optrush.optim.build_optimizer)."""
    problems = []
    if not all(0 <= b < 1 for b in o.betas):
        problems.append(f"optim.betas={list(o.betas)}: each must be in [0, 1) (e.g. [0.9, 0.95])")
    if not 0 <= o.momentum < 1:
        problems.append(f"optim.momentum={o.momentum}: must be in [0, 1) (e.g. 0.95)")
    if not o.eps > 0:  # also NaN
        problems.append(f"optim.eps={o.eps}: must be > 0 (it keeps the update's denominator off zero; e.g. 1e-8)")
    if o.ns_steps < 1:
        problems.append(f"optim.ns_steps={o.ns_steps}: must be >= 1")
    if o.low_bit_min_numel < 0:
        problems.append(f"optim.low_bit_min_numel={o.low_bit_min_numel}: must be >= 0 (0 quantizes every tensor "
                        "torchao can)")
    if o.fused and o.name != "adamw":
        problems.append(f"optim.fused=true selects torch's fused AdamW kernel: it applies to optim.name=adamw only, "
                        f"not {o.name}; set optim.fused=null")
    if o.fused and o.bf16_update != "plain":
        problems.append(f"optim.fused=true rounds bf16 weights to nearest: set optim.fused=null to use "
                        f"optim.bf16_update={o.bf16_update}")
    if o.name in ("adamw8bit", "adamw4bit", "adafactor") and o.state_dtype is not None:
        problems.append(f"optim.state_dtype applies to adamw, lion, muon and schedule_free_adamw; {o.name} keeps "
                        "its own compact state: set optim.state_dtype=null")
    if o.name in ("adamw8bit", "adamw4bit") and o.bf16_update == "kahan":
        problems.append(f"optim.bf16_update=kahan is not available with {o.name} (torchao's kernel offers "
                        "stochastic rounding): use optim.bf16_update=stochastic")
    if o.name == "adafactor" and o.bf16_update != "plain":
        problems.append("optim.bf16_update applies to adamw, adamw8bit/4bit, lion, muon and schedule_free_adamw, "
                        "not adafactor: set optim.bf16_update=plain")
    return problems


def optim_problems(cfg: Config) -> list[str]:
    """Optimizer settings that clash with the precision, device, schedule or EMA settings."""
    o, problems = cfg.optim, optimizer_problems(cfg.optim)
    if o.bf16_update != "plain" and not cfg.precision.bf16_weights:
        problems.append(f"optim.bf16_update={o.bf16_update} rounds updates into bf16 weights: it needs "
                        f"precision.mode=bf16_pure or fp8_pure (got {cfg.precision.mode}); or set "
                        "optim.bf16_update=plain")
    weights = "bf16" if cfg.precision.bf16_weights else "fp32"
    if o.fused and o.name == "adamw" and o.state_dtype not in (None, weights):
        problems.append(f"optim.fused=true keeps AdamW's moments in the weights' dtype ({weights}): set "
                        f"optim.fused=null to use optim.state_dtype={o.state_dtype}")
    if o.offload and cfg.train.device == "cpu":
        problems.append("optim.offload=true moves optimizer state from the GPU to the CPU: it needs a CUDA device "
                        "(train.device=cpu); set optim.offload=false")
    if o.offload and cfg.parallel.strategy != "none":
        problems.append(f"optim.offload=true is single-GPU (torchao CPUOffloadOptimizer), not for parallel.strategy="
                        f"{cfg.parallel.strategy}; use parallel.strategy=fsdp with parallel.cpu_offload=true instead")
    if cfg.parallel.strategy in ("fsdp", "hsdp") and (o.name == "muon" or o.bf16_update == "stochastic"):
        what = ("optim.name=muon (Newton-Schulz needs each whole matrix)" if o.name == "muon" else
                "optim.bf16_update=stochastic (written for plain tensors, not sharded DTensors)")
        problems.append(f"{what} is not supported with parallel.strategy={cfg.parallel.strategy} yet: FSDP shards "
                        "the weights; use parallel.strategy=ddp or none")
    if o.offload and o.name == "schedule_free_adamw":
        problems.append("optim.offload=true cannot switch schedule_free_adamw between its train and eval weights; "
                        "use another optimizer or optim.offload=false")
    if o.name == "schedule_free_adamw" and cfg.train.schedule != "constant":
        problems.append(f"optim.name=schedule_free_adamw replaces the decay schedule: set train.schedule=constant "
                        f"(train.warmup_steps still applies; got train.schedule={cfg.train.schedule})")
    if not 0 <= cfg.train.ema_decay < 1:
        problems.append(f"train.ema_decay={cfg.train.ema_decay}: must be in [0, 1) (0 = no EMA; e.g. 0.999)")
    if cfg.train.ema_decay and o.name == "schedule_free_adamw":
        problems.append("train.ema_decay with optim.name=schedule_free_adamw: schedule-free already evaluates an "
                        "average of its iterates; set train.ema_decay=0")
    return problems


PEFT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def peft_problems(cfg: Config) -> list[str]:
    """LoRA/DoRA settings out of range, and combinations that cannot work."""
    p, problems = cfg.peft, []
    if p.quantize != "none" and p.method not in ("lora", "dora"):
        problems.append(f"peft.quantize={p.quantize} quantizes a frozen base under LoRA adapters (QLoRA): set "
                        f"peft.method=lora or dora (got {p.method}), or peft.quantize=none")
    if p.embedding_on_host and p.method not in ("lora", "dora"):
        problems.append(f"peft.embedding_on_host=true keeps a frozen embedding table in host memory: set "
                        f"peft.method=lora or dora (got {p.method}), or peft.embedding_on_host=false")
    if p.embedding_on_host and cfg.parallel.strategy != "none":
        problems.append(f"peft.embedding_on_host=true works on one GPU (NCCL cannot broadcast or shard host "
                        f"memory): set parallel.strategy=none (got {cfg.parallel.strategy}), or "
                        "peft.embedding_on_host=false")
    if p.method == "prompt_tuning":
        return problems + prompt_tuning_problems(cfg)
    if p.method == "none":
        return problems
    if p.r < 1:
        problems.append(f"peft.r={p.r}: must be >= 1")
    if p.alpha <= 0:
        problems.append(f"peft.alpha={p.alpha}: must be > 0")
    if not 0 <= p.dropout < 1:
        problems.append(f"peft.dropout={p.dropout}: must be in [0, 1)")
    if p.lora_plus_ratio <= 0:
        problems.append(f"peft.lora_plus_ratio={p.lora_plus_ratio}: must be > 0 (1 = plain LoRA)")
    targets = [p.target_modules] if isinstance(p.target_modules, str) else p.target_modules
    if "lm_head" in targets:
        problems.append("peft.target_modules: lm_head cannot be adapted: the training loss (model.loss_fn, fused "
                        "or not) reads output.weight directly, so an adapter on the head would be bypassed; remove "
                        "lm_head (all-linear covers every projection of the blocks)")
    elif p.target_modules != "all-linear":
        bad = [t for t in targets if t not in PEFT_TARGETS]
        if bad or not targets:
            given = f"unknown module name(s) {', '.join(map(repr, bad))}" if bad else "an empty list"
            problems.append(f"peft.target_modules: {given}; use all-linear or a list of names from "
                            f"{', '.join(PEFT_TARGETS)}, e.g. peft.target_modules=[q_proj, v_proj]")
    if cfg.precision.float8:
        problems.append(f"peft.method=lora/dora with precision.mode={cfg.precision.mode} is not supported yet: the "
                        "float8 transform would replace the adapted linears; use bf16_mixed or bf16_pure")
    return problems


def prompt_tuning_problems(cfg: Config) -> list[str]:
    """Prompt tuning prepends one soft prompt to every row, so a row must hold a single document."""
    problems = []
    if cfg.peft.num_virtual_tokens < 1:
        problems.append(f"peft.num_virtual_tokens={cfg.peft.num_virtual_tokens}: must be >= 1")
    if cfg.data.packing == "bfd":
        problems.append("peft.method=prompt_tuning prepends the soft prompt to each row, and data.packing=bfd packs "
                        "several documents into one row: set data.packing=none or sorted")
    if cfg.peft.save != "adapter":
        problems.append(f"peft.method=prompt_tuning cannot be merged into the weights (peft.save={cfg.peft.save}): "
                        "set peft.save=adapter")
    if cfg.objective not in ("causal_lm", "sft"):
        problems.append(f"peft.method=prompt_tuning trains causal_lm or sft objectives, not {cfg.objective}")
    return problems


def objective_problems(cfg: Config) -> list[str]:
    """Alignment objectives (reward, dpo, grpo) and the data and settings they need."""
    problems = []
    pairwise = cfg.objective in ("reward", "dpo")
    if pairwise and cfg.data.format != "preference":
        problems.append(f"objective={cfg.objective} trains on preference pairs: set data.format=preference (records "
                        f"with {cfg.data.prompt_column!r}, {cfg.data.chosen_column!r}, {cfg.data.rejected_column!r})")
    if cfg.data.format == "preference" and not pairwise:
        problems.append(f"data.format=preference holds pairs, which objective={cfg.objective} cannot use: set "
                        "objective=reward or objective=dpo")
    if cfg.data.shared_prompt and not pairwise:
        problems.append("data.shared_prompt=true packs preference pairs: it needs objective=reward or dpo")
    if cfg.data.shared_prompt and (cfg.model.attention == "varlen" or cfg.compile.mode != "none"):
        problems.append("data.shared_prompt=true needs model.attention=sdpa or flex and compile.mode=none (variable-"
                        "length attention cannot express a prompt shared by two branches; swapping the attention for each pair "
                        "forward is not tested under compile yet)")
    if cfg.objective in ("reward", "dpo", "grpo") and cfg.train.verify:
        problems.append(f"train.verify=true checks causal_lm/sft runs only; set train.verify=false for "
                        f"objective={cfg.objective}")
    if cfg.objective == "dpo":
        d = cfg.dpo
        if d.beta <= 0:
            problems.append(f"dpo.beta={d.beta}: must be > 0")
        if not 0 <= d.label_smoothing < 0.5:
            problems.append(f"dpo.label_smoothing={d.label_smoothing}: must be in [0, 0.5)")
        if d.label_smoothing > 0 and d.loss not in ("sigmoid", "robust", "simpo"):
            problems.append(f"dpo.label_smoothing applies to dpo.loss=sigmoid, robust or simpo, not {d.loss}; "
                            "set dpo.label_smoothing=0")
        if d.reference == "lora_disabled" and cfg.peft.method not in ("lora", "dora"):
            problems.append(f"dpo.reference=lora_disabled is the model with its adapters switched off: it needs "
                            f"peft.method=lora or dora (got {cfg.peft.method}); or use dpo.reference=copy")
    if cfg.objective == "grpo":
        g = cfg.grpo
        if cfg.data.format not in ("prompt_completion", "recipe", "chat"):
            problems.append("objective=grpo samples completions of the data's prompts: set data.format to "
                            "prompt_completion, recipe or chat")
        if cfg.data.packing == "bfd":
            problems.append("objective=grpo takes one prompt per row: set data.packing=none (or sorted)")
        if g.group_size < 2:
            problems.append(f"grpo.group_size={g.group_size}: must be >= 2 (advantages compare completions "
                            "within a group)")
        if g.max_new_tokens < 1:
            problems.append(f"grpo.max_new_tokens={g.max_new_tokens}: must be >= 1")
        if not g.temperature > 0:
            problems.append(f"grpo.temperature={g.temperature}: must be > 0 (GRPO samples: the completions of a "
                            "group must differ; e.g. 1.0)")
        if not g.clip_eps > 0:
            problems.append(f"grpo.clip_eps={g.clip_eps}: must be > 0 (e.g. 0.2)")
        if not g.kl_beta >= 0:
            problems.append(f"grpo.kl_beta={g.kl_beta}: must be >= 0 (0 = no KL penalty)")
        if g.updates_per_generation < 1:
            problems.append(f"grpo.updates_per_generation={g.updates_per_generation}: must be >= 1")
        if g.reference == "lora_disabled" and cfg.peft.method not in ("lora", "dora"):
            problems.append(f"grpo.reference=lora_disabled is the model with its adapters switched off: it needs "
                            f"peft.method=lora or dora (got {cfg.peft.method}); or use grpo.reference=copy")
        if not g.rewards or any(":" not in name for name in g.rewards):
            problems.append(f"grpo.rewards={g.rewards!r}: give one or more 'module:function' import strings, "
                            "e.g. [optrush.objectives.grpo:recipe_format_reward]")
    return problems

# The names of optrush.models.presets.PRESETS, spelled out here because importing that module loads torch, which
# loading a config does not need (`optrush config show` stays fast); tests/test_startup_errors.py keeps them equal.
PRESET_NAMES = ("debug", "demo", "llama3.2-1b", "llama3.2-3b", "llama3.1-8b", "llama3.1-70b", "qwen2.5-0.5b",
                "qwen3-0.6b", "mistral-7b-v0.3")


def preset_problems(cfg: Config) -> list[str]:
    """An unknown model.preset, found before the data is tokenized for a model that cannot be built."""
    preset = cfg.model.preset
    if preset is None or preset in PRESET_NAMES:
        return []
    hint = did_you_mean(preset, PRESET_NAMES)
    return [f"model.preset={preset!r} is not a built-in architecture.{hint} Valid presets: {', '.join(PRESET_NAMES)}; "
            "or set model.path to an HF checkpoint directory"]
