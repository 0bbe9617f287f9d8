"""Analytical peak-memory model of one training step: one readable function per term, in bytes per GPU.

    memory = estimate_memory(args, setup)          # args: ModelArgs, setup: optrush.plan.setup.Setup
    memory.peak_gib, memory.terms                  # allocated at the peak (as torch.cuda.max_memory_allocated)
    required_gib(memory, n_gpus=1)                 # + CUDA context and allocator slack: what must fit on the GPU

The peak of a step is the larger of two moments. At the loss (end of the forward pass): weights, optimizer states,
every activation the blocks saved for backward, and the loss's own working memory; gradients do not exist yet
(the loop frees them with `zero_grad(set_to_none=True)`) unless micro-batches accumulate. At the end of backward:
weights, states, all gradients and one block's recomputation. The activation sets are counted tensor by tensor
from what autograd keeps in `optrush.models.llama` (eager) and what Inductor's partitioner keeps when the blocks
are compiled (matmul inputs and outputs; the pointwise ops are recomputed), so no constant is fitted per row.
`benchmarks/plan_accuracy.py` compares these predictions with every measured GPU configuration.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from optrush.config.schema import BF16_WEIGHT_MODES, FLOAT8_MODES
from optrush.kernels.fused_loss import TRACED_CHUNKS
from optrush.models.llama import ModelArgs
from optrush.plan.setup import ALL_LINEAR, Setup

GIB = 2**30
NF4_BITS = 4.127
"""NF4 with double quantization: 4 bits + an 8-bit absmax per 64 weights + an fp32 scale per 256 absmax blocks
(QLoRA, https://arxiv.org/abs/2305.14314 section 3: 4 + 8/64 + 32/(64*256) bits per parameter)."""
CUDA_CONTEXT_GIB = 0.6
"""CUDA context, kernels and cuBLAS handles outside PyTorch's allocator (about 0.5-0.6 GiB on Hopper with lazy
module loading); not part of max_memory_allocated, but it must fit too."""
NCCL_GIB = 0.5
"""NCCL communicator buffers per GPU when several GPUs train together."""
ALLOCATOR_SLACK = 0.08
"""Fraction the caching allocator reserves beyond what is allocated (fragmentation, rounding to blocks)."""

INT8_BITS = 8.0
"""int8 weight-only base: one byte per weight plus a per-row scale (negligible)."""

PARAM_BYTES = {"fp32": 4, "bf16_mixed": 4, "bf16_pure": 2, "fp8": 4, "fp8_pure": 2}
COMPUTE_BYTES = {"fp32": 4, "bf16_mixed": 2, "bf16_pure": 2, "fp8": 2, "fp8_pure": 2}


@dataclass(frozen=True, kw_only=True, slots=True)
class Memory:
    terms: dict[str, float]
    """Bytes of each term at the peak moment (per GPU)."""
    phases: dict[str, float]
    """Total bytes at each candidate peak moment: `loss` (end of forward) and `backward` (end of backward)."""

    @property
    def peak_bytes(self) -> float:
        return max(self.phases.values())

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB


def required_gib(memory: Memory, *, n_gpus: int) -> float:
    """GiB one GPU must have free: the allocated peak plus allocator slack, CUDA context and NCCL buffers."""
    return memory.peak_gib * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT_GIB + (NCCL_GIB if n_gpus > 1 else 0.0)


# ----------------------------------------------------------------------------------------------------- shapes

def linear_shapes(a: ModelArgs) -> dict[str, tuple[int, int]]:
    """(in, out) features of each block linear, by HF name (what peft.target_modules names)."""
    q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    return {"q_proj": (a.dim, q), "k_proj": (a.dim, kv), "v_proj": (a.dim, kv), "o_proj": (q, a.dim),
            "gate_proj": (a.dim, a.ffn_dim), "up_proj": (a.dim, a.ffn_dim), "down_proj": (a.ffn_dim, a.dim)}


def block_linear_params(a: ModelArgs) -> int:
    return sum(i * o for i, o in linear_shapes(a).values())


def block_other_params(a: ModelArgs) -> int:
    """Norm gains and biases of one block."""
    bias = (a.n_heads + 2 * a.n_kv_heads) * a.head_dim if a.qkv_bias else 0
    return 2 * a.dim + (2 * a.head_dim if a.qk_norm else 0) + bias


def embedding_params(a: ModelArgs) -> int:
    """Embedding, output head (unless tied) and final norm."""
    return a.vocab_size * a.dim * (1 if a.tie_embeddings else 2) + a.dim


def total_params(a: ModelArgs) -> int:
    return a.n_layers * (block_linear_params(a) + block_other_params(a)) + embedding_params(a)


Shapes = Counter  # tensor shape -> how many trainable tensors have it


def adapter_shapes(a: ModelArgs, s: Setup) -> Shapes:
    """Trainable PEFT tensors: per targeted linear of every block A (r, in) and B (out, r) (+ DoRA's magnitude
    vector), or prompt tuning's (virtual tokens, dim) embeddings."""
    if s.peft == "prompt_tuning":
        return Counter({(s.virtual_tokens, a.dim): 1})
    shapes = Counter()
    if s.peft == "none":
        return shapes
    for name, (fan_in, fan_out) in linear_shapes(a).items():
        if name in s.lora_targets:
            shapes.update([(s.lora_rank, fan_in), (fan_out, s.lora_rank)] + ([(fan_out,)] if s.peft == "dora" else []))
    return Counter({shape: count * a.n_layers for shape, count in shapes.items()})


def trainable_shapes(a: ModelArgs, s: Setup) -> Shapes:
    """Shapes of every trainable tensor (what gradients and optimizer states cover), with their counts."""
    if s.peft != "none":
        return adapter_shapes(a, s)
    block = [(o, i) for i, o in linear_shapes(a).values()] + [(a.dim,), (a.dim,)]
    if a.qk_norm:
        block += [(a.head_dim,), (a.head_dim,)]
    if a.qkv_bias:
        block += [(a.n_heads * a.head_dim,), (a.n_kv_heads * a.head_dim,), (a.n_kv_heads * a.head_dim,)]
    shapes = Counter({shape: count * a.n_layers for shape, count in Counter(block).items()})
    shapes.update([(a.vocab_size, a.dim)] * (1 if a.tie_embeddings else 2) + [(a.dim,)])
    return shapes


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def count_params(shapes: Shapes) -> int:
    return sum(numel(shape) * count for shape, count in shapes.items())


def base_linear_bytes(s: Setup) -> float:
    """Bytes per frozen or trained block-linear weight as stored (peft.quantize)."""
    bits = {"nf4": NF4_BITS, "int8": INT8_BITS}.get(s.quantize)
    return PARAM_BYTES[s.precision] if bits is None else bits / 8


def state_element_bytes(s: Setup) -> int:
    """optim.state_dtype, else the parameters' dtype."""
    return {"fp32": 4, "bf16": 2}.get(s.state_dtype, PARAM_BYTES[s.precision])


def shard(nbytes: float, s: Setup) -> float:
    """FSDP divides parameters, gradients and optimizer states evenly over the GPUs (or keeps the shards in CPU
    memory with parallel.cpu_offload)."""
    if s.strategy not in ("fsdp", "hsdp"):
        return nbytes
    return 0.0 if s.fsdp_cpu_offload else nbytes / s.n_gpus


# ---------------------------------------------------------------------------------------- persistent terms

def weights_bytes(a: ModelArgs, s: Setup) -> float:
    """Parameters in their storage dtype (fp32 master weights for bf16_mixed and fp8). peft.quantize stores the
    block linears in NF4 or int8 and everything else in the parameter dtype; PEFT adds its own tensors;
    peft.embedding_on_host keeps an untied embedding table in host memory."""
    p = PARAM_BYTES[s.precision]
    linear = a.n_layers * block_linear_params(a)
    rest = total_params(a) - linear - (a.vocab_size * a.dim if host_embedding(a, s) else 0)
    adapters = count_params(adapter_shapes(a, s)) * p
    return shard(linear * base_linear_bytes(s) + rest * p + adapters, s)


def host_embedding(a: ModelArgs, s: Setup) -> bool:
    """Whether the embedding table is in host memory (a tied one cannot be: the transform refuses it)."""
    return s.embedding_on_host and not a.tie_embeddings


def rope_bytes(a: ModelArgs) -> float:
    """The fp32 cos/sin tables (max_seq_len x head_dim / 2 each), non-persistent buffers."""
    return 2 * a.max_seq_len * (a.head_dim // 2) * 4


def gradient_bytes(a: ModelArgs, s: Setup) -> float:
    """One gradient per trainable parameter, in the parameter dtype."""
    return shard(count_params(trainable_shapes(a, s)) * PARAM_BYTES[s.precision], s)


def optimizer_bytes(a: ModelArgs, s: Setup) -> float:
    """Optimizer state of every trainable tensor on the GPU, by optimizer (see `state_bytes`), plus the bf16
    Kahan residue (optim.bf16_update=kahan); nothing with optim.offload (state and step in CPU memory)."""
    if s.optimizer_offload:
        return 0.0
    shapes = trainable_shapes(a, s)
    embed = {(a.vocab_size, a.dim)}
    states = sum(count * state_bytes(s.optimizer, x, element_bytes=state_element_bytes(s),
                                     hidden_matrix=len(x) == 2 and (s.peft != "none" or x not in embed),
                                     low_bit_min_numel=s.low_bit_min_numel)
                 for x, count in shapes.items())
    kahan = count_params(shapes) * 2 if s.kahan and s.precision in BF16_WEIGHT_MODES else 0
    return shard(states + kahan, s)


def state_bytes(optimizer: str, shape: tuple[int, ...], *, element_bytes: int, hidden_matrix: bool,
                low_bit_min_numel: int = 1 << 20) -> float:
    """Bytes of optimizer state for one tensor (optrush.optim.optimizer's table). Moments take `element_bytes`
    each, except torchao's quantized AdamW: blockwise 8-bit (block 256) or 4-bit (block 128) codes plus an fp32
    scale per block, for tensors of at least 4096 and `low_bit_min_numel` elements (smaller ones keep plain
    states, optrush.optim.low_bit). Adafactor factors a matrix's
    second moment into row and column vectors and keeps no momentum; Lion keeps one momentum; Muon one for
    hidden matrices (LoRA adapters and block linears) and AdamW's two for the rest; schedule-free AdamW z and v."""
    n = numel(shape)
    if optimizer in ("adamw", "schedule_free_adamw"):
        return 2 * n * element_bytes
    if optimizer in ("adamw8bit", "adamw4bit"):
        if n < max(4096, low_bit_min_numel):
            return 2 * n * element_bytes
        bits, block = (8, 256) if optimizer == "adamw8bit" else (4, 128)
        return 2 * (n * bits / 8 + math.ceil(n / block) * 4)
    if optimizer == "adafactor":
        return (shape[0] + shape[1]) * element_bytes if len(shape) == 2 else n * element_bytes
    if optimizer == "lion":
        return n * element_bytes
    if optimizer == "muon":
        return n * element_bytes if hidden_matrix else 2 * n * element_bytes
    raise ValueError(f"the planner has no memory model for optim.name={optimizer!r}")


def autocast_cache_bytes(a: ModelArgs, s: Setup) -> float:
    """bf16 copies of fp32 weights made by autocast (bf16_mixed, fp8) and kept for backward by the matmuls that
    used them: every block linear and the output head. Float8 linears recompute their casts (fp8 keeps only the
    head's copy); under FSDP the gathered bf16 weights replace the copies (see `fsdp_gathered_bytes`)."""
    if s.precision not in ("bf16_mixed", "fp8") or s.strategy in ("fsdp", "hsdp"):
        return 0.0
    # the fused loss computes its gradients inside its own forward: its cast of the head is freed per chunk
    head = 0 if s.fused_loss else a.vocab_size * a.dim * 2
    # autocast caches only the casts of weights that train; a frozen (adapter-trained) base's copy is what each
    # matmul saves for backward instead, so a checkpointed block drops it and casts again when it recomputes
    layers = a.n_layers if s.peft == "none" else layer_policies(a, s).count("none")
    blocks = layers * block_linear_params(a) * 2 if s.precision == "bf16_mixed" and s.quantize == "none" else 0
    return head + blocks


def fsdp_gathered_bytes(a: ModelArgs, s: Setup) -> float:
    """Unsharded weights alive at once under FSDP2: the root (embedding, head) for the whole step and two blocks
    (the running one and the prefetched next), or every block when they are not resharded after forward."""
    if s.strategy not in ("fsdp", "hsdp") or s.n_gpus == 1:
        return 0.0
    gathered = COMPUTE_BYTES[s.precision]
    block = block_linear_params(a) * (gathered if s.quantize == "none" else base_linear_bytes(s))
    blocks = a.n_layers if not s.reshard_after_forward else min(2, a.n_layers)
    return (embedding_params(a) * gathered + blocks * block) * (s.n_gpus - 1) / s.n_gpus


# --------------------------------------------------------------------------------------------- activations

def residual_bytes(s: Setup) -> int:
    """Bytes per element of the residual stream and its gradient: the weights' dtype (fp32 under autocast)."""
    return PARAM_BYTES[s.precision]


def block_activation_bytes(a: ModelArgs, s: Setup, *, policy: str) -> float:
    """Bytes per token that one block keeps for backward under checkpointing `policy` (none/selective/full)."""
    d, f, q, kv = a.dim, a.ffn_dim, a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    act = COMPUTE_BYTES[s.precision]
    res = residual_bytes(s)
    # SDPA with a dense document mask runs the memory-efficient kernel on KV heads repeated to n_heads
    kv_saved = q if s.attention == "sdpa" and s.document_mask else kv
    lse = 4 * a.n_heads
    # activations.mlp_chunk_tokens: each MLP chunk is a checkpoint that saves only its slice of the input
    mlp = 0 if s.mlp_chunk_tokens and s.tokens > s.mlp_chunk_tokens else 1
    adapters = act * s.lora_rank * sum(1 for t in s.lora_targets if t in ALL_LINEAR) \
        if s.peft in ("lora", "dora") else 0
    if policy == "full":
        return res * d
    if policy == "selective" and s.quantize != "none":
        # the quantized base's matmuls are recomputed (see optrush.parallel.checkpointing.SAVED_OPS): the block
        # input, attention's output and log-sum-exp, the adapters' x A (measured on the 8B QLoRA ladder at B=1:
        # +0.5 GiB over full checkpointing)
        return res * d + act * q + lse + adapters
    if policy == "selective":  # matmul and attention outputs plus the block input; pointwise ops recomputed
        # (MLP chunks are refused with selective: its policy would keep the chunks' matmul outputs anyway)
        kept = res * d + act * (q + 2 * kv) + act * q + lse + act * d + 2 * act * f
        # eager also keeps the w2 output (nothing in backward needs it, so the compiler drops it)
        return kept + (act * d if s.compile == "none" else 0) + adapters
    if s.compile != "none":
        # Inductor keeps the residuals, the matmul inputs and outputs, attention's inputs/outputs and the two
        # RMSNorm rstd vectors; norms, RoPE and SiLU*mul are recomputed in backward. Under float8 linears it keeps
        # no matmul input (no fp8 copy either): the norms and SiLU*mul are recomputed and cast again in backward
        # (a compiled block's saved tensors, tests/test_plan.py; the 1B step's 15.8 GiB, fp8_pure_h100.md).
        # With chunked MLPs one (token x dim) tensor a block fewer: the chunks' checkpoint input stands in for the
        # MLP's matmul input (5.5 instead of 6.5 per block in the 65,536-token trace, memory_peak/
        # peak_65k_nockpt_varlen_chunks.json; plan_picks_h100.md's long rows had been 11-13% over)
        inputs = (1 - mlp) * act * d if s.precision in FLOAT8_MODES else (1 + mlp) * act * d + mlp * act * f
        whole = 2 * res * d + inputs + act * (q + 2 * kv_saved) + act * q + lse + mlp * 2 * act * f + 2 * 4 + adapters
        # compile.memory_budget: the partitioner keeps part of what lies between saving the graph's inputs only (a
        # compiled block's input; nothing per block for the whole model) and `whole`
        floor = res * d if s.compile == "blocks" else 0
        return floor + kept_fraction(s.memory_budget) * (whole - floor)
    # Eager RMSNorm keeps its fp32 input, the normalised x and the linear's input (optrush.models.layers.RMSNorm);
    # eager float8 linears keep their inputs in the compute dtype as bf16 ones do (torchao casts again in backward)
    norm = 4 * d + res * d + act * d
    swiglu = mlp * 4 * act * f  # w1 out, silu out, w3 out, and the product (w2's input)
    # cos/sin cast to the working dtype for q and again for k; in fp32 the cast is a no-op and both share them
    rope = (2 if act == 4 else 4) * (a.head_dim // 2) * act
    rstd = 2 * 4  # each RMSNorm's fp32 reciprocal RMS, one value per token
    return 2 * norm + rstd + act * (q + 2 * kv_saved) + act * q + lse + swiglu + rope + adapters


BUDGET_KEPT = ((0.0, 0.0), (0.3, 0.55), (0.5, 0.76), (1.0, 1.0))
"""(compile.memory_budget, fraction of the compiled graph's activations kept), measured on the 1B step on an H100
(train_speed_h100_memory_budget.md: 2.26 and 4.17 of 9.27 GiB less at budgets 0.5 and 0.3). The partitioner's
budget is a fraction of its own size estimate, and what it keeps falls slower than the budget."""


def kept_fraction(memory_budget: float) -> float:
    """The fraction of activations a compiled graph keeps under `memory_budget`: BUDGET_KEPT, linear between."""
    for (b0, k0), (b1, k1) in zip(BUDGET_KEPT, BUDGET_KEPT[1:]):
        if memory_budget <= b1:
            return k0 + (k1 - k0) * (memory_budget - b0) / (b1 - b0)
    return 1.0


def handled_blocks(a: ModelArgs, s: Setup) -> int:
    """Blocks that checkpointing and offload apply to: all but the last `skip_last`."""
    return a.n_layers - min(s.skip_last, a.n_layers)


def layer_policies(a: ModelArgs, s: Setup) -> list[str]:
    """The checkpointing policy of each block (`every: k` checkpoints blocks 0, k, 2k, ...; `skip_last` none)."""
    if s.checkpointing == "none":
        return ["none"] * a.n_layers
    handled = handled_blocks(a, s)
    return [s.checkpointing if i % s.every == 0 and i < handled else "none" for i in range(a.n_layers)]


def activation_bytes(a: ModelArgs, s: Setup) -> float:
    """What all blocks keep on the GPU for backward at the end of the forward pass. With offload the saved
    tensors of the handled blocks go to CPU memory, but for the last one's and the prefetched next one's."""
    per_layer = [block_activation_bytes(a, s, policy=p) * s.tokens for p in layer_policies(a, s)]
    if s.offload:
        handled = handled_blocks(a, s)
        return sum(sorted(per_layer[:handled])[-2:]) + sum(per_layer[handled:])
    return sum(per_layer)


def kept_activation_bytes(a: ModelArgs, s: Setup) -> float:
    """What the last `skip_last` blocks keep when the others are checkpointed or offloaded: their backward runs
    first and frees it, before any earlier block recomputes."""
    if s.checkpointing == "none" and not s.offload:
        return 0.0
    return (a.n_layers - handled_blocks(a, s)) * block_activation_bytes(a, s, policy="none") * s.tokens


def recompute_bytes(a: ModelArgs, s: Setup) -> float:
    """During backward, a checkpointed block re-runs its forward and holds its full activation set again; under
    compile.memory_budget a compiled block recomputes what its budget left out."""
    if s.checkpointing == "none" and not s.offload:
        budget_left_out = block_activation_bytes(a, s.replace(memory_budget=1.0), policy="none") \
            - block_activation_bytes(a, s, policy="none")
        return budget_left_out * s.tokens
    return block_activation_bytes(a, s.replace(memory_budget=1.0), policy="none") * s.tokens


def block_backward_bytes(a: ModelArgs, s: Setup) -> float:
    """Transient buffers of one block's backward beside its saved or recomputed activations: the gradients of
    q, k and v (k and v expanded to the query heads before the kernel sums them, for grouped KV heads), the
    attention kernel's fp32 dq accumulator, and the residual-stream gradients entering and leaving the block."""
    d, q, kv = a.dim, a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    act = COMPUTE_BYTES[s.precision]
    res = residual_bytes(s)
    expanded = 2 * act * q if q != kv else 0
    return (act * q + 4 * q + expanded + 2 * act * kv + 2 * res * d) * s.tokens


def recomputed_block_backward_bytes(a: ModelArgs, s: Setup) -> float:
    """The transient buffers of a block's backward when it recomputes its forward: `block_backward_bytes`, or
    with blocks compiled over a quantized base (QLoRA) the MLP's backward if larger. Inductor's backward graph of
    such a block holds 9 ffn-wide buffers at its peak (the recomputed base matmul outputs and adapter updates of
    gate and up, the SiLU product, and the gradients of both paths) and the two residual-stream gradients
    (benchmarks/results/memory_peak.md: 11 before the LoRA scaling moved to the r-wide product); `recompute_bytes`
    counts 3 of them. The other setups' MLP backward was not seen to set a peak, and is not modelled."""
    attention = block_backward_bytes(a, s)
    if s.quantize == "none" or s.compile == "none":
        return attention
    act = COMPUTE_BYTES[s.precision]
    res = residual_bytes(s)
    mlp_tokens = min(s.mlp_chunk_tokens, s.tokens) if s.mlp_chunk_tokens else s.tokens
    return max(attention, 6 * act * a.ffn_dim * mlp_tokens + 2 * res * a.dim * s.tokens)


def ring_attention_bytes(a: ModelArgs, s: Setup) -> float:
    """Context parallelism (`optrush.parallel.context`): one layer's ring attention holds, beside what a local
    attention would, an fp32 accumulator of its output (forward) or of dq (backward), the key/value block
    arriving from the next rank, and in backward the fp32 key/value gradients travelling with the block held and
    with the one arriving."""
    if s.context_degree == 1:
        return 0.0
    q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    act = COMPUTE_BYTES[s.precision]
    return (4 * q + 2 * act * kv + 2 * 2 * 4 * kv) * s.tokens


def head_bytes(a: ModelArgs, s: Setup) -> float:
    """The final RMSNorm's saved tensors and the output head's input (compiled with the model: only its input
    and the norm's rstd)."""
    act, res = COMPUTE_BYTES[s.precision], residual_bytes(s)
    head_input = 0 if s.fused_loss else act
    if s.compile == "model":
        return (res + head_input) * a.dim * s.tokens
    return (4 + res + head_input) * a.dim * s.tokens


def attention_mask_bytes(a: ModelArgs, s: Setup) -> float:
    """SDPA with packed documents builds a dense boolean (B, 1, T, T) mask; flex and varlen need almost nothing."""
    return s.micro_batch * s.seq_len**2 if s.attention == "sdpa" and s.document_mask else 0.0


def loss_bytes(a: ModelArgs, s: Setup) -> float:
    """Working memory of the loss at its peak.

    Plain loss (`layers.linear_cross_entropy`): the fp32 logits, log-softmax output and, in backward, the
    gradients of both: 3 fp32 (tokens x vocab) buffers (11.7 GiB at 8192 x 128256, kernels_h100.md). Under
    whole-model compile: the working-dtype logits kept plus fp32 and working-dtype gradients (not measured).
    Fused loss (`optrush.kernels.fused_loss`): an fp32 accumulator for the head's gradient (when trained), the
    hidden-state gradient, and per chunk the working-dtype logits and their gradient: on CUDA the chunk is
    compiled without an fp32 copy of the logits (the GPU test of the loss alone: 4.2-4.3 bytes per bf16 chunk
    element), which whole-model compile keeps to when it traces the loss (up to TRACED_CHUNKS chunks). With the
    chunk compiled on its own, the steps measured since
    came out between about 4.5 (8B QLoRA, qlora_h100_confirm2.md) and 6 bytes per element (the 1B step,
    train_speed_h100_loss_chunk_ab.md): modelled as 2 x the working dtype + 1. Before 5866a7b (2026-12-06) the
    chunk kept an fp32 copy: 3 bytes per element more (benchmarks/plan_accuracy.py checks those rows with it)."""
    n, v = s.tokens, a.vocab_size
    act = COMPUTE_BYTES[s.precision]
    if not s.fused_loss:
        return (2 * act + 4) * n * v if s.compile == "model" else 12 * n * v
    chunk = min(s.loss_chunk_tokens, n)
    head_grad = 4 * v * a.dim if s.peft == "none" else 0  # a frozen head needs no weight gradient
    hidden_grad = residual_bytes(s) * n * a.dim
    traced = s.compile == "model" and math.ceil(n / chunk) <= TRACED_CHUNKS  # else one compiled chunk at a time
    per_chunk = 2 * act if traced else 2 * act + 1
    return head_grad + hidden_grad + per_chunk * chunk * v


def dequantize_bytes(a: ModelArgs, s: Setup) -> float:
    """Quantized base (QLoRA): one block linear dequantized to the compute dtype at a time (the largest one)."""
    if s.quantize == "none":
        return 0.0
    return max(i * o for i, o in linear_shapes(a).values()) * COMPUTE_BYTES[s.precision]


# ---------------------------------------------------------------------------------------------------- total

def estimate_memory(a: ModelArgs, s: Setup) -> Memory:
    """Per-GPU allocated bytes of every term and of the two candidate peak moments of a training step."""
    weights, states, grads = weights_bytes(a, s), optimizer_bytes(a, s), gradient_bytes(a, s)
    if s.strategy == "ddp" and s.n_gpus > 1:
        grads *= 2  # DDP all-reduces through gradient buckets, a second copy of every gradient
    persistent = {"weights": weights + rope_bytes(a), "optimizer": states,
                  "fsdp_gathered": fsdp_gathered_bytes(a, s), "autocast_cache": autocast_cache_bytes(a, s),
                  "dequantize": dequantize_bytes(a, s)}
    at_loss = {**persistent, "gradients": grads if s.grad_accum > 1 else 0.0,
               "activations": activation_bytes(a, s), "head": head_bytes(a, s),
               "attention_mask": attention_mask_bytes(a, s), "loss": loss_bytes(a, s)}
    kept, recompute = kept_activation_bytes(a, s), recompute_bytes(a, s)
    backward = block_backward_bytes(a, s)
    recomputed_backward = recomputed_block_backward_bytes(a, s) if recompute else backward
    # The last block's backward: every saved activation still held, the block recomputed (unless kept whole), its
    # gradient buffers
    at_backward_start = {**persistent, "gradients": grads if s.grad_accum > 1 else 0.0,
                         "activations": activation_bytes(a, s), "recompute": 0.0 if kept else recompute,
                         "block_backward": backward if kept else recomputed_backward,
                         "ring_attention": ring_attention_bytes(a, s)}
    # The last checkpointed block's recompute, after the kept blocks' backward freed their activations
    at_first_recompute = {**at_backward_start, "activations": activation_bytes(a, s) - kept, "recompute": recompute,
                          "block_backward": recomputed_backward}
    # The first block's backward: the activations are gone, almost every gradient is there
    at_backward_end = {**persistent, "autocast_cache": 0.0, "gradients": grads, "recompute": recompute,
                       "block_backward": recomputed_backward, "ring_attention": ring_attention_bytes(a, s)}
    moments = {"loss": at_loss, "backward_start": at_backward_start, "first_recompute": at_first_recompute,
               "backward_end": at_backward_end}
    phases = {name: sum(terms.values()) for name, terms in moments.items()}
    return Memory(terms=moments[max(phases, key=phases.get)], phases=phases)
