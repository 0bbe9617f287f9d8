"""Throughput estimate of a training setup, calibrated from measured bench results.

    measured = load_measurements()                 # every committed GPU bench record under benchmarks/results
    calibration = calibrate(measured)
    speed = estimate_speed(args, setup, gpu, calibration)   # speed.tokens_per_s (all GPUs), speed.mfu, speed.basis

Time per token on one GPU = executed FLOPs / (peak FLOP/s x efficiency) + what each micro-batch and each optimizer
step cost whatever their tokens (weight reads per micro-batch, fitted; the update's traffic) / HBM bandwidth +
CPU-offload copies / PCIe bandwidth + NF4 dequantization traffic / HBM bandwidth; with several GPUs the FSDP/DDP
traffic overlaps compute (the step takes the longer of the two). Executed FLOPs are the MFU numerator (6 x params
+ 6 x layers x seq x dim, as `Transformer.flops_per_token`) minus the weight-gradient matmuls frozen weights skip (LoRA, QLoRA) plus the
forward re-run by full activation checkpointing. The efficiency is measured: for each family of
(compile mode, fused loss, checkpointing, matmul precision) that has bench rows, their executed FLOP/s over the
device peak; a setup from a family without rows takes the closest measured family's efficiency and says so in
`basis`. Attention's FLOPs run at their backend's own measured efficiency (`fit_attention`, from the rows where
attention is most of the work), so long rows are not priced at the matmuls' rate. Rows come from H100s and
H200s and a few model shapes; other GPUs and shapes are extrapolations (same efficiency, that GPU's peak).
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from optrush.config import Config, ConfigError, load_config
from optrush.config.schema import FLOAT8_MODES
from optrush.models.llama import ModelArgs
from optrush.plan.gpus import GPU, gpu_from_device_name
from optrush.plan.memory import (
    COMPUTE_BYTES,
    PARAM_BYTES,
    base_linear_bytes,
    block_activation_bytes,
    block_linear_params,
    count_params,
    handled_blocks,
    host_embedding,
    layer_policies,
    total_params,
    trainable_shapes,
)
from optrush.plan.setup import Setup, setup_from_config

RESULTS_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
PCIE_BYTES_PER_S = 25e9
"""Host<->GPU copy bandwidth when no measured offload row calibrates it (PCIe 4.0 x16, pinned memory)."""
NCCL_BUS_EFFICIENCY = 0.7
"""Fraction of the link bandwidth NCCL collectives reach (an assumption: no multi-GPU rows are committed yet)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Measured:
    """One measured GPU training configuration (a bench record)."""
    name: str
    source: str
    cfg: Config
    args: ModelArgs
    setup: Setup
    gpu: GPU
    tokens_per_s: float
    peak_gib: float


@dataclass(frozen=True, kw_only=True, slots=True)
class Calibration:
    efficiency: dict[tuple, float]
    """Executed FLOP/s over peak, per `family`."""
    pcie_bytes_per_s: float
    rows: int
    micro_batch_passes: float = 0.0
    """Reads of the model's weights that a micro-batch costs beyond its FLOPs, whatever its token count (fitted
    from rows that differ only in tokens per micro-batch; 0 without such rows)."""
    attention_efficiency: dict[str, float] = field(default_factory=dict)
    """Attention's executed FLOP/s over peak, per model.attention backend with long rows measured (see
    `fit_attention`); a backend without them runs at its family's efficiency."""
    float8_speedup: dict[tuple[str, int], float] = field(default_factory=dict)
    """(float8 precision.mode, model width) -> its efficiency over bf16_pure's in rows measured side by side (see
    `fit_float8_speedup`)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Speed:
    tokens_per_s: float
    """All GPUs together."""
    mfu: float
    basis: str
    """`measured` (the setup's family has bench rows), `measured full-FT family` (PEFT on a measured family),
    `nearest: <families>` (compile/fused loss/checkpointing/matmul precision of the rows it borrows from), or for a
    float8 setup `bf16_pure <one of those> x <its speed-up> (<mode>, width <where measured>)`."""


# -------------------------------------------------------------------------------------------- measurements

def load_measurements(paths: list[Path] | None = None) -> list[Measured]:
    """Every GPU bench record (a dict with config, tokens_per_s, peak_mem_gib and a CUDA device) in `paths`
    (default: all JSON files under benchmarks/results), whose model shape can be rebuilt from its config. A file
    whose `meta` names a `reverted` commit measured code that no longer exists and is left out."""
    paths = sorted(RESULTS_DIR.rglob("*.json")) if paths is None else paths
    out = []
    for path in map(Path, paths):
        source = (path.relative_to(RESULTS_DIR) if path.is_relative_to(RESULTS_DIR) else path).as_posix()
        document = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(document, dict) and isinstance(document.get("meta"), dict) and document["meta"].get("reverted"):
            continue
        for record in bench_records(document):
            measured = measured_from_record(record, source=source)
            if measured is not None:
                out.append(measured)
    return out


def bench_records(tree) -> list[dict]:
    """Bench result dicts anywhere inside a JSON document (lists, or lists under keys as in train_speed_h100)."""
    if isinstance(tree, list):
        return [r for item in tree for r in bench_records(item)]
    if not isinstance(tree, dict):
        return []
    if {"config", "tokens_per_s", "peak_mem_gib", "device"} <= tree.keys():
        return [tree] if tree.get("status", "ok") == "ok" else []  # skipped or failed runs measured nothing
    return [r for value in tree.values() for r in bench_records(value)]


PLANNED_OBJECTIVES = ("causal_lm", "sft")
"""The objectives whose step the planner models: a language model's forward and backward. A DPO step adds its
reference's forward, a reward model has no vocabulary-wide head: their rows would skew the families' speed."""


def measured_from_record(record: dict, *, source: str) -> Measured | None:
    """The record as a `Measured` row, or None when it ran on CPU or a GPU outside the table, trained an objective
    outside `PLANNED_OBJECTIVES`, or when its configuration cannot be rebuilt (see `record_setup`)."""
    gpu = gpu_from_device_name(record["device"])
    rebuilt = record_setup(record) if gpu is not None else None
    if rebuilt is None or rebuilt[0].objective not in PLANNED_OBJECTIVES:
        return None
    cfg, args, setup = rebuilt
    return Measured(name=record.get("name", "?"), source=source, cfg=cfg, args=args, setup=setup, gpu=gpu,
                    tokens_per_s=record["tokens_per_s"], peak_gib=record["peak_mem_gib"])


def record_setup(record: dict) -> tuple[Config, ModelArgs, Setup] | None:
    """(config, model shape, Setup) a bench record ran, or None for a config of an older schema, a model
    directory not on this machine, or a multi-GPU row that does not say over how many GPUs it ran (its per-GPU
    memory depends on it: bench records carry `world_size`)."""
    from optrush.plan.search import model_args  # search imports this module

    try:
        cfg = load_config(None, flatten(record["config"]), synthetic_data=True)
        args = model_args(cfg.model.preset or cfg.model.path)
    except (ConfigError, FileNotFoundError, ValueError):
        return None
    world_size = record.get("world_size", 1 if cfg.parallel.strategy == "none" else None)
    if world_size is None:
        return None
    setup = setup_from_config(cfg, n_gpus=world_size,
                              document_mask=not record.get("synthetic", False) and cfg.data.packing == "bfd")
    return cfg, args, setup


def flatten(tree: dict, prefix: str = "") -> list[str]:
    """A nested config dict as dotted `key=value` overrides (JSON values are valid YAML scalars)."""
    out = []
    for key, value in tree.items():
        if isinstance(value, dict) and key not in ("rope_scaling",):
            out += flatten(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={json.dumps(value)}")
    return out


# ------------------------------------------------------------------------------------------------- model

def model_flops_per_token(a: ModelArgs, s: Setup) -> float:
    """The MFU numerator, `Transformer.flops_per_token`: 6 x params + 6 x layers x seq x dim."""
    return 6 * total_params(a) + 6 * a.n_layers * s.seq_len * a.dim


def executed_flops_per_token(a: ModelArgs, s: Setup) -> float:
    """FLOPs the GPU actually runs per token: frozen weights skip their weight-gradient matmul (2 x params),
    adapters add theirs (6 x params), full checkpointing re-runs the forward (2 x block params + attention) of
    every checkpointed block, chunked MLPs re-run their three matmuls. Selective checkpointing re-runs only
    pointwise ops (no matmul FLOPs)."""
    flops = model_flops_per_token(a, s)
    if s.peft != "none":
        flops += -2 * total_params(a) + 6 * count_params(trainable_shapes(a, s))
    if s.checkpointing == "full":
        checkpointed = layer_policies(a, s).count("full")
        flops += checkpointed * (2 * block_linear_params(a) + 2 * s.seq_len * a.dim)
    if s.mlp_chunk_tokens and s.tokens > s.mlp_chunk_tokens:
        flops += a.n_layers * 2 * 3 * a.dim * a.ffn_dim
    return flops


def attention_flops_per_token(a: ModelArgs, s: Setup) -> float:
    """The part of `executed_flops_per_token` that attention runs: the MFU formula's 6 x layers x seq x dim, plus
    the forward that full checkpointing re-runs."""
    checkpointed = layer_policies(a, s).count("full") if s.checkpointing == "full" else 0
    return (6 * a.n_layers + 2 * checkpointed) * s.seq_len * a.dim


def own_attention_efficiency(s: Setup, attention_efficiency: dict[str, float]) -> float | None:
    """The efficiency `s`'s attention runs at, from `fit_attention`'s (measured on rows of one document), or None
    to count it at its family's. Ring attention (context parallelism) has none: its exchanges between GPUs are
    not the kernel's time. SDPA with a dense document mask leaves its causal kernels (7.35 ms against varlen's
    1.31 at 8,192 tokens of 4 documents, kernels_h100.md) and no training row measures it, so it counts as no
    faster than the slowest measured backend."""
    if s.context_degree > 1 or s.attention not in attention_efficiency:
        return None
    if s.attention == "sdpa" and s.document_mask:
        return min(attention_efficiency.values())
    return attention_efficiency[s.attention]


def flops_seconds_per_token(a: ModelArgs, s: Setup, gpu: GPU, efficiency: float,
                            attention_efficiency: dict[str, float]) -> float:
    """Executed FLOPs over the peak: attention's at its own efficiency where there is one
    (`own_attention_efficiency`), the rest (or all, without one) at the family's `efficiency`."""
    peak = peak_flops(gpu, s)
    own = own_attention_efficiency(s, attention_efficiency)
    if own is None:
        return executed_flops_per_token(a, s) / (peak * efficiency)
    attention = attention_flops_per_token(a, s)
    return (executed_flops_per_token(a, s) - attention) / (peak * efficiency) + attention / (peak * own)


def attention_share(m: Measured) -> float:
    return attention_flops_per_token(m.args, m.setup) / executed_flops_per_token(m.args, m.setup)


def offload_bytes_per_token(a: ModelArgs, s: Setup) -> float:
    """Host<->GPU copies: saved activations to the host in forward and back in backward (activations.offload);
    gradients to the host and updated weights back once per optimizer step (optim.offload); each token's
    embedding row read from host memory (peft.embedding_on_host)."""
    offloaded = layer_policies(a, s)[:handled_blocks(a, s)]
    activations = 2 * sum(block_activation_bytes(a, s, policy=p) for p in offloaded) if s.offload else 0
    trainable = count_params(trainable_shapes(a, s))
    optimizer = 2 * trainable * PARAM_BYTES[s.precision] / (s.tokens * s.grad_accum) if s.optimizer_offload else 0
    embedding = a.dim * PARAM_BYTES[s.precision] if host_embedding(a, s) else 0
    return activations + optimizer + embedding


def dequantize_bytes_per_token(a: ModelArgs, s: Setup) -> float:
    """A quantized base (QLoRA) reads every stored block weight and writes its compute-dtype copy in forward, in
    backward and again in a checkpointed forward, once per micro-batch."""
    if s.quantize == "none":
        return 0.0
    passes = 3 if s.checkpointing == "full" else 2
    per_param = base_linear_bytes(s) + COMPUTE_BYTES[s.precision]
    return passes * a.n_layers * block_linear_params(a) * per_param / s.tokens


UPDATE_BYTES = {"fp32": 28, "bf16_mixed": 28, "bf16_pure": 14, "fp8": 28, "fp8_pure": 14}
"""HBM bytes an AdamW update moves per trainable parameter: the weight read and written, its gradient read, two
moments read and written, each in the precision's storage dtype (fp32 master weights and states, or bf16). Every
optimizer is counted so: the 8-bit ones move fewer bytes but measured slower (train_speed_h100_accum.md)."""


def step_overhead_seconds_per_token(a: ModelArgs, s: Setup, gpu: GPU, micro_batch_passes: float) -> float:
    """Time per token of what a micro-batch and an optimizer step cost whatever their token counts, so that fewer
    tokens a micro-batch run slower: `micro_batch_passes` reads of the weights per micro-batch (launches, weight
    and gradient traffic that no matmul hides; calibrated) and the optimizer's update traffic once per step (not
    when it runs on the host, `optim.offload`)."""
    micro_batch = micro_batch_passes * total_params(a) * COMPUTE_BYTES[s.precision] / s.tokens
    shards = s.n_gpus if s.strategy in ("fsdp", "hsdp") else 1  # each GPU updates its shard
    trainable = count_params(trainable_shapes(a, s)) / shards
    update = 0 if s.optimizer_offload else trainable * UPDATE_BYTES[s.precision] / (s.tokens * s.grad_accum)
    return (micro_batch + update) / gpu.hbm_bytes_per_s


def communication_bytes_per_token(a: ModelArgs, s: Setup) -> float:
    """Bytes each GPU sends per token: FSDP all-gathers the weights for forward (and again for backward when
    resharded) and reduce-scatters fp32 gradients every micro-batch; DDP all-reduces the gradients (2x their
    size on a ring) once per optimizer step."""
    if s.n_gpus == 1 or s.strategy == "none":
        return 0.0
    ring = (s.n_gpus - 1) / s.n_gpus
    trainable = count_params(trainable_shapes(a, s))
    if s.strategy == "ddp":
        return 2 * trainable * PARAM_BYTES[s.precision] * ring / (s.tokens * s.grad_accum)
    gathers = 2 if s.reshard_after_forward else 1
    weights = total_params(a) * COMPUTE_BYTES[s.precision]
    return (gathers * weights + trainable * 4) * ring / s.tokens


def family(s: Setup, a: ModelArgs) -> tuple:
    """Setups expected to run at one efficiency: (compile, fused loss, checkpointing, matmul precision, model
    width, compile memory budget). bf16_mixed is its own: its fp32 master weights are cast to bf16 at every use
    (measured on the 1B ladder: about 15% below bf16_pure's efficiency); fp8 and fp8_pure are apart for the same
    reason (`setup_efficiency` prices them where unmeasured). The width, because wider matmuls run closer to the
    peak and the memory-bound work per FLOP shrinks: the 8B rows' efficiency is not the 1B rows' (keyed by width, the
    left-out speed predictions within 10% went from 57 to 90 of 146 rows, plan_accuracy.md). Last, the compiled
    graph's memory budget: what it recomputes is not counted in the executed FLOPs, so it shows as efficiency (a
    budget without rows borrows the full budget's, an optimistic guess its basis names)."""
    matmuls = {"fp32": "tf32", "bf16_pure": "bf16"}.get(s.precision, s.precision)
    return (s.compile, s.fused_loss, s.checkpointing, matmuls, a.dim, s.memory_budget)


def peak_flops(gpu: GPU, s: Setup) -> float:
    """The peak efficiencies are fitted against: TF32 for fp32, bf16 otherwise (also fp8, so that a measured FP8
    speed-up shows as a higher efficiency rather than vanishing into a doubled peak)."""
    return gpu.tf32_flops if s.precision == "fp32" else gpu.bf16_flops


def reported_peak_flops(gpu: GPU, s: Setup) -> float:
    """The MFU column's peak: the FP8 peak for float8 modes, as training logs and bench report it
    (`optrush.train.metrics.matmul_peak_flops`, issue #5's definition)."""
    return (gpu.fp8_flops or gpu.bf16_flops) if s.precision in FLOAT8_MODES else peak_flops(gpu, s)


LONG_ROW_ATTENTION_SHARE = 0.3
"""Rows whose attention is at least this share of their executed FLOPs calibrate attention's own efficiency (the
1B model's: 32,768 tokens and up; at 2,048 its share is 5%)."""


def calibrate(measured: list[Measured]) -> Calibration:
    """Efficiency per family from the `plannable` rows without offload, their time net of the per-micro-batch and
    optimizer-step overheads (`step_overhead_seconds_per_token`, its weight passes fitted first) and, once it is
    known, of attention's time at its own efficiency (`fit_attention`, from the long rows; families and attention
    are fitted in turn, three rounds); then the PCIe bandwidth that explains the offload rows' extra time (their
    compute time subtracted)."""
    measured = [m for m in measured if plannable(m)]
    plain = [m for m in measured if not m.setup.offload]
    passes = fit_micro_batch_passes(plain)
    attention: dict[str, float] = {}
    for _ in range(3):
        efficiency = fit_families(plain, passes, attention)
        attention = fit_attention(plain, efficiency, passes)
    efficiency = fit_families(plain, passes, attention)
    bandwidths = []
    for m in measured:
        if m.setup.offload and efficiency:
            compute_s = flops_seconds_per_token(m.args, m.setup, m.gpu,
                                                lookup_efficiency(efficiency, m.setup, m.args)[0], attention)
            compute_s += step_overhead_seconds_per_token(m.args, m.setup, m.gpu, passes)
            extra_s = m.setup.n_gpus / m.tokens_per_s - compute_s
            if extra_s > 0:
                bandwidths.append(offload_bytes_per_token(m.args, m.setup) / extra_s)
    pcie = statistics.mean(bandwidths) if bandwidths else PCIE_BYTES_PER_S
    return Calibration(efficiency=efficiency, pcie_bytes_per_s=pcie, rows=len(measured), micro_batch_passes=passes,
                       attention_efficiency=attention, float8_speedup=fit_float8_speedup(plain, passes, attention))


def net_seconds_per_token(m: Measured, passes: float) -> float:
    """A row's time per token on one GPU less its per-micro-batch and optimizer-step overheads."""
    return m.setup.n_gpus / m.tokens_per_s - step_overhead_seconds_per_token(m.args, m.setup, m.gpu, passes)


def fit_families(rows: list[Measured], passes: float, attention: dict[str, float]) -> dict[tuple, float]:
    """Mean efficiency per `family`: FLOPs over peak x time, attention's FLOPs and time left out where its
    backend has its own efficiency. A family with rows where attention is under `LONG_ROW_ATTENTION_SHARE` of the
    FLOPs is fitted on those alone (its long rows calibrate attention)."""
    short = [m for m in rows if attention_share(m) < LONG_ROW_ATTENTION_SHARE]
    covered = {family(m.setup, m.args) for m in short}
    by_family: dict[tuple, list[float]] = {}
    for m in short + [m for m in rows if family(m.setup, m.args) not in covered]:
        if (value := row_efficiency(m, passes, attention)) is not None:
            by_family.setdefault(family(m.setup, m.args), []).append(value)
    return {key: statistics.mean(values) for key, values in by_family.items()}


def row_efficiency(m: Measured, passes: float, attention: dict[str, float]) -> float | None:
    """One row's executed FLOP/s over peak, net of the step overheads and of attention where its backend has its
    own efficiency; None when the overheads explain all of its time."""
    flops, net_s = executed_flops_per_token(m.args, m.setup), net_seconds_per_token(m, passes)
    own = own_attention_efficiency(m.setup, attention)
    if own is not None:
        share = attention_flops_per_token(m.args, m.setup)
        net_s -= share / (peak_flops(m.gpu, m.setup) * own)
        flops -= share
    return flops / (peak_flops(m.gpu, m.setup) * net_s) if net_s > 0 else None


def fit_float8_speedup(rows: list[Measured], passes: float,
                       attention: dict[str, float]) -> dict[tuple[str, int], float]:
    """(float8 mode, model width) -> mean efficiency ratio over bf16_pure, from rows of one results file (one
    command, one machine) alike but for the precision. Only side-by-side pairs: family means mix machines and
    dates, and put fp8 (fp32 master weights) 1.41x over bf16_pure where the same command measured it 1.00x."""
    by_setup = {(m.source, m.gpu.name, repr(m.args), m.setup): m for m in rows if m.setup.precision == "bf16_pure"}
    ratios: dict[tuple[str, int], list[float]] = {}
    for m in rows:
        if m.setup.precision not in FLOAT8_MODES:
            continue
        twin = by_setup.get((m.source, m.gpu.name, repr(m.args), m.setup.replace(precision="bf16_pure")))
        if twin is not None and None not in (pair := (row_efficiency(m, passes, attention),
                                                     row_efficiency(twin, passes, attention))):
            ratios.setdefault((m.setup.precision, m.args.dim), []).append(pair[0] / pair[1])
    return {key: statistics.mean(values) for key, values in ratios.items()}


def fit_attention(rows: list[Measured], efficiency: dict[tuple, float], passes: float) -> dict[str, float]:
    """Attention's efficiency per backend from the rows where it is at least `LONG_ROW_ATTENTION_SHARE` of the
    FLOPs: what their time leaves after the rest of their FLOPs at the family's efficiency. Measured on one H100
    (plan_picks_h100.md): the 1B model's MFU falls from 0.55 at 2,048 tokens to 0.29-0.40 at 131,072, where
    attention is 78% of the FLOPs; priced at the short rows' efficiency, those rows were predicted 22-78% fast."""
    by_backend: dict[str, list[float]] = {}
    for m in rows:
        if attention_share(m) < LONG_ROW_ATTENTION_SHARE or m.setup.context_degree > 1 or m.setup.document_mask:
            continue
        attention = attention_flops_per_token(m.args, m.setup)
        rest = executed_flops_per_token(m.args, m.setup) - attention
        peak = peak_flops(m.gpu, m.setup)
        attention_s = net_seconds_per_token(m, passes) - rest / (
            peak * lookup_efficiency(efficiency, m.setup, m.args)[0])
        if attention_s > 0:
            by_backend.setdefault(m.setup.attention, []).append(attention / (peak * attention_s))
    return {backend: statistics.mean(values) for backend, values in by_backend.items()}


def fit_micro_batch_passes(measured: list[Measured]) -> float:
    """Weight reads per micro-batch that explain how time per token grows as a micro-batch holds fewer tokens:
    among rows alike but for their rows per micro-batch (and accumulation), time per token = c + b / tokens per
    micro-batch, fitted by least squares per group; b in weight reads, averaged over the groups. 0 without such
    rows. Full fine-tuning rows only: an adapter run's per-micro-batch cost is its base's dequantization, which
    `dequantize_bytes_per_token` models."""
    groups: dict[tuple, list[Measured]] = {}
    for m in measured:
        if m.setup.peft != "none":
            continue
        alike = m.setup.replace(micro_batch=1, grad_accum=1)
        groups.setdefault((alike, repr(m.args), m.gpu.name, m.cfg.optim.name), []).append(m)
    fitted = []
    for rows in groups.values():
        if len({m.setup.tokens for m in rows}) < 2:
            continue
        x = [1 / m.setup.tokens for m in rows]
        y = [m.setup.n_gpus / m.tokens_per_s - step_overhead_seconds_per_token(m.args, m.setup, m.gpu, 0.0)
             for m in rows]
        mean_x, mean_y = statistics.mean(x), statistics.mean(y)
        slope = (sum((xi - mean_x) * (yi - mean_y) for xi, yi in zip(x, y))
                 / sum((xi - mean_x) ** 2 for xi in x))
        m = rows[0]
        fitted.append(slope * m.gpu.hbm_bytes_per_s / (total_params(m.args) * COMPUTE_BYTES[m.setup.precision]))
    return max(statistics.mean(fitted), 0.0) if fitted else 0.0


def plannable(m: Measured) -> bool:
    """Whether the row calibrates the speed model: full rows of one shape, in kernels the planner emits. A real
    length mix (`data.batch_tokens`: padded or packed micro-batches of varying shape, each new shape compiled
    again) is predicted but does not calibrate: the padded rows of length_mix_h100 ran 20,104 tokens/s (9,326 of
    them real) with 6-12 s recompiles inside the timed steps, and had pulled the compiled-block family's
    efficiency 24% under the full rows it describes. The planner always dequantizes a compiled quantized base
    with one kernel (`config_overrides`), so rows without that (1.18x slower, measured) would calibrate its QLoRA
    families low."""
    s = m.setup
    fused_dequantize = s.quantize == "none" or s.compile == "none" or m.cfg.kernels.fused_dequantize
    return fused_dequantize and not m.cfg.data.batch_tokens


def lookup_efficiency(efficiency: dict[tuple, float], s: Setup, a: ModelArgs) -> tuple[float, str]:
    """(efficiency, basis): the setup's own family if measured, else the mean over the measured families, float8
    or not as the setup is (a bf16 setup never borrows FP8's speed), that share the longest prefix of (compile,
    fused loss, checkpointing), preferring the same matmul precision, then the nearest model width."""
    key = family(s, a)
    if not efficiency:  # e.g. an installed package without the repository's benchmarks/results
        return 1.0, "uncalibrated: no bench rows, peak FLOP/s"
    if key in efficiency:
        return efficiency[key], "measured"
    pool = [k for k in efficiency if is_float8(k) == is_float8(key)] or list(efficiency)
    length = max(n for n in range(5) if any(k[:n] == key[:n] for k in pool))  # n = 0 matches every family
    same = [k for k in pool if k[:length] == key[:length]]
    same = [k for k in same if k[3] == key[3]] or same
    width_distance = {k: abs(math.log(k[4] / key[4])) for k in same}
    same = [k for k in same if width_distance[k] == min(width_distance.values())]
    same = [k for k in same if k[5] == key[5]] or [k for k in same if k[5] == 1.0] or same  # the same budget
    names = ", ".join("/".join(str(x) for x in k) for k in same[:2]) + (f" (+{len(same) - 2})" if len(same) > 2 else "")
    return statistics.mean(efficiency[k] for k in same), f"nearest: {names}"


def is_float8(key: tuple) -> bool:
    return key[3] in FLOAT8_MODES


def setup_efficiency(calibration: Calibration, s: Setup, a: ModelArgs) -> tuple[float, str]:
    """(efficiency, basis) for `s`: `lookup_efficiency`, except that a float8 setup whose family has no rows is
    the same setup in bf16_pure times the float8 mode's side-by-side speed-up nearest in model width
    (`fit_float8_speedup`). FP8's gain follows the matmul shapes more than compile or checkpointing (fp8_pure over
    bf16_pure: 1.14x on the 1B step, 1.23x on the 8B, fp8_pure_h100.md); the nearest float8 family of another
    width had put the 8B fp8_pure row 30% under."""
    speedups = {dim: ratio for (mode, dim), ratio in calibration.float8_speedup.items() if mode == s.precision}
    if family(s, a) in calibration.efficiency or not speedups:
        return lookup_efficiency(calibration.efficiency, s, a)
    dim = min(speedups, key=lambda d: abs(math.log(d / a.dim)))
    efficiency, basis = lookup_efficiency(calibration.efficiency, s.replace(precision="bf16_pure"), a)
    return efficiency * speedups[dim], f"bf16_pure {basis} x {speedups[dim]:.2f} ({s.precision}, width {dim})"


def extrapolation_warning(calibration: Calibration, a: ModelArgs) -> str | None:
    """Why the tokens/s are a guess when the model is over 2x narrower or wider than every measured one."""
    widths = sorted({key[4] for key in calibration.efficiency})
    if not widths or widths[0] / 2 <= a.dim <= widths[-1] * 2:
        return None
    return (f"tokens/s are extrapolated: the speed measurements cover models {widths[0]} to {widths[-1]} wide, "
            f"this one is {a.dim} wide; trust the memory column and the order, not the numbers (--measure times "
            "the top candidates on this machine)")


def estimate_speed(a: ModelArgs, s: Setup, gpu: GPU, calibration: Calibration) -> Speed:
    efficiency, basis = setup_efficiency(calibration, s, a)
    if s.peft != "none" and basis == "measured":
        basis = "measured full-FT family"
    compute_s = flops_seconds_per_token(a, s, gpu, efficiency, calibration.attention_efficiency)
    compute_s += step_overhead_seconds_per_token(a, s, gpu, calibration.micro_batch_passes)
    compute_s += offload_bytes_per_token(a, s) / calibration.pcie_bytes_per_s
    compute_s += dequantize_bytes_per_token(a, s) / gpu.hbm_bytes_per_s
    comm_s = communication_bytes_per_token(a, s) / (gpu.link_bytes_per_s * NCCL_BUS_EFFICIENCY)
    per_gpu = 1 / max(compute_s, comm_s)
    mfu = per_gpu * model_flops_per_token(a, s) / reported_peak_flops(gpu, s)
    return Speed(tokens_per_s=per_gpu * s.n_gpus, mfu=mfu, basis=basis)
