"""`optrush bench`: time the real training step on one config and report speed, MFU, memory and loss.

    optrush bench optrush/recipes/demo.yaml model.preset=llama3.2-1b --synthetic --warmup 3 --steps 8
    result = bench(load_config(path, overrides, synthetic_data=True), synthetic=True, warmup=3, steps=8)
    write_report([result], "runs/bench")            # bench.json + bench.md

The step is the training loop's own (`optrush.train.loop`: build, `apply_optimizations`, objective, optimizer,
`accumulate_gradients`, clipping, scheduler), so what is measured is what `optrush train` runs. `warmup` steps
run first (the first one includes compilation: reported as `time_to_first_step_s`), then `steps` timed steps
whose total wall time (each step ends with a device sync) gives tokens/s. Data: the config's own (tokenized,
packed or padded, as `train` would) or, with `synthetic`, rows of `data.max_length` uniformly random tokens of the
model's vocabulary, every position trained and no padding, drawn from `train.seed` (no data or tokenizer needed).
With context parallelism (`context.degree` > 1, ring attention) the ranks of a context group read the same rows
and each keeps its share of every row, as in training; tokens/s counts each token of a row once.

MFU = tokens/s x (6 x params + 6 x layers x seq x dim) / peak FLOP/s of the device for the matmul precision (bf16
peak for bf16 modes, twice that for fp8, TF32 for fp32), the formula of `../shared/gpu/baseline-hf.py` (issue #5).
Peak memory is what PyTorch allocated on the GPU (weights, gradients, optimizer states and activations) since the
model was built; on CPU it is the process's peak resident memory (`peak_mem_kind` says which).

Objectives: causal_lm and sft, and the pairwise `reward` and `dpo`, whose step is the loop's own on preference
pairs (`build_preference_datasets`, the loop's pair loader, the objective built from the starting model as the
loop builds it: the reward head, DPO's frozen reference copy or its precomputed log-probs, cached in
`<output_dir>`). Their synthetic data is one random pair per row (`synthetic_pairs`). tokens/s counts every
position of the batches run, chosen and rejected sides both; MFU counts the policy's forward and backward only
(the formula above): DPO's reference forward (`dpo.reference=copy` or `lora_disabled`, about a third more
FLOPs) is work done but not counted. GRPO is refused (`check_objective`): its step samples completions first.

`optrush bench --ladder` (optrush.bench.ladder) runs many configs, each through this function in its own process.
`prepare` (everything built, as `train` builds it) and `train_step` (one optimizer step) are the pieces, for tools
that time or profile the very same step (`benchmarks/profile_step.py`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import torch

from optrush.bench.provenance import provenance
from optrush.bench.report import MEMORY_KINDS
from optrush.config import Config, ConfigError, to_dict
from optrush.data.batch import Batch
from optrush.data.preference import PairBatch, PreferencePair, encode_sequence
from optrush.data.tokenizer import load_config_tokenizer
from optrush.models.presets import get_preset
from optrush.objectives import PAIRWISE
from optrush.optim.optimizer import build_optimizer
from optrush.optim.schedule import build_scheduler
from optrush.parallel.context import data_parallel_position, setup_context_parallel
from optrush.parallel.distributed import Distributed, all_reduce_sum, init_distributed, teardown
from optrush.train.float8 import require_float8
from optrush.train.loop import (accumulate_gradients, backend_flags, build, clip_gradients, make_loader,
                                precision_context, read_data, resolve_device, seed_everything, starting_objective)
from optrush.train.metrics import matmul_peak_flops, mfu, model_params, peak_memory_gib, training_flops_per_token
from optrush.train.optimizations import apply_optimizations


def bench(cfg: Config, *, synthetic: bool, warmup: int = 3, steps: int = 8, name: str = "bench") -> dict:
    """Run `warmup` + `steps` optimizer steps of `cfg` and return the measurements (JSON-serialisable). Under
    torchrun with a parallel.strategy every rank calls it; tokens/s and losses are over all ranks, peak memory
    is this rank's. `warmup=0` times the first step too, compilation and allocator warm-up included: for steps so
    long (hundreds of thousands of tokens) that a second one would not fit the time."""
    if warmup < 0 or steps < 1:
        raise ValueError(f"bench needs warmup >= 0 and steps >= 1; got {warmup}, {steps}")
    check_objective(cfg)
    owns_group = not torch.distributed.is_initialized()  # a caller's own process group is left to the caller
    parallel = init_distributed(cfg.parallel, device=resolve_device(cfg.train.device))
    try:
        with backend_flags(cfg):
            return measure(cfg, parallel, synthetic=synthetic, warmup=warmup, steps=steps, name=name)
    finally:
        if owns_group:
            teardown()


MEASURED_OBJECTIVES = ("causal_lm", "sft", *PAIRWISE)


def check_objective(cfg: Config) -> None:
    """Refuse, before anything is built, an objective whose step `bench` does not time: GRPO's step first samples
    completions (as many tokens as the model generates, not a fixed batch), and its loader holds only prompts."""
    if cfg.objective not in MEASURED_OBJECTIVES:
        raise ConfigError(
            f"objective={cfg.objective}: optrush bench times the training step of objective="
            f"{', '.join(MEASURED_OBJECTIVES)}, not GRPO's, which samples completions before its update. Time GRPO "
            "with a short `optrush train` run instead (e.g. train.max_steps=10): its log shows tok/s from the "
            "second step on (prompt tokens only, not the sampled completions) and metrics.jsonl each step's "
            "elapsed_s",
            key="objective")


def measure(cfg: Config, parallel: Distributed, *, synthetic: bool, warmup: int, steps: int, name: str) -> dict:
    device = parallel.device
    started = time.perf_counter()
    run = prepare(cfg, parallel, synthetic=synthetic, n_steps=warmup + steps)
    model, batches = run.model, run.batches
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    setup_s = time.perf_counter() - started

    losses, seconds, step_units = [], [], []
    for micro_batches in batches:
        step_started = time.perf_counter()
        loss_sum, units = train_step(run, micro_batches, max_grad_norm=cfg.train.max_grad_norm)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - step_started)
        losses.append(float(loss_sum) / max(units, 1))
        step_units.append(units)

    timed = batches[warmup:]
    timed_s = sum(seconds[warmup:])
    # each rank counts the tokens it holds: under context parallelism a row's shares, so every token once
    tokens, padding = all_reduce_sum([sum(b.input_ids.numel() for step in timed for b in step),
                                      sum(b.num_padding for step in timed for b in step)], device=device)
    real_tokens = tokens - padding
    flops_per_token = training_flops_per_token(model, cfg.data.max_length)
    peak_flops = matmul_peak_flops(device, cfg.precision.mode)
    return {
        "name": name,
        "tokens_per_s": tokens / timed_s,
        "real_tokens_per_s": real_tokens / timed_s,
        "mfu": mfu(tokens / timed_s / parallel.world_size, flops_per_token, peak_flops),  # per device
        "peak_mem_gib": peak_memory_gib(device),
        "peak_mem_kind": "cuda_allocated" if device.type == "cuda" else "cpu_peak_rss",
        "time_to_first_step_s": seconds[0],
        "step_s": timed_s / steps,
        "step_seconds": seconds,  # every step, warm-up included: a recompilation shows as a slow step
        "setup_s": setup_s,
        "loss": losses[-1],
        "losses": losses,
        "step_units": step_units,  # trained units (tokens, pairs) per step: weights for a mean loss over steps
        "padding_fraction": 1 - real_tokens / tokens,
        "warmup": warmup,
        "steps": steps,
        "synthetic": synthetic,
        "rows": cfg.train.micro_batch_size,
        "seq_len": cfg.data.max_length,
        "grad_accum": cfg.train.grad_accum,
        "world_size": parallel.world_size,
        "params": model_params(model),
        "flops_per_token": flops_per_token,
        "peak_flops": peak_flops,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "config": to_dict(cfg),
        "provenance": provenance(),
    }


class Prepared(NamedTuple):
    """What one benchmarked training step needs, built as `optrush train` builds it."""
    model: torch.nn.Module
    batches: list[list[Batch | PairBatch]]
    objective: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    autocast: object
    device: torch.device


def prepare(cfg: Config, parallel: Distributed, *, synthetic: bool, n_steps: int) -> Prepared:
    """The model (every optimization applied), `n_steps` steps of this rank's micro-batches, objective,
    optimizer, scheduler and precision context of `cfg`; the model is left in train mode."""
    device = parallel.device
    if cfg.precision.float8:
        require_float8(device, cfg.precision.mode)
    seed_everything(cfg.train.seed)
    # the ranks of one context-parallel group read the same rows and each keeps its share of every row
    data_rank, data_world = data_parallel_position(cfg.context.degree)
    start = synthetic_start if synthetic else data_start
    model, objective, batches = start(cfg, device, n_steps=n_steps, rank=data_rank, world_size=data_world)
    model, shard = setup_context_parallel(model, cfg, pad_id=0)  # pad ids are never trained (IGNORE_INDEX labels)
    batches = [[shard(b) for b in step] for step in batches]
    model = apply_optimizations(model, cfg)
    optimizer = build_optimizer(model, cfg.optim, lr=cfg.train.lr, device_type=device.type,
                                lora_plus_ratio=cfg.peft.lora_plus_ratio)
    model.train()
    return Prepared(model, batches, objective, optimizer, build_scheduler(optimizer, cfg.train),
                    precision_context(cfg, device), device)


def data_start(cfg: Config, device: torch.device, *, n_steps: int, rank: int = 0, world_size: int = 1) -> tuple:
    """(model, objective, this rank's first `n_steps` steps of micro-batches of the configured data), built in the
    training loop's order and by its own pieces: the same data, model, objective and first batches."""
    tokenizer = load_config_tokenizer(cfg)
    train_examples, eval_examples, _ = read_data(cfg, tokenizer)
    model = build(cfg, vocab_size=len(tokenizer), device=device)
    objective = starting_objective(cfg, model, tokenizer, train_examples, eval_examples)
    loader = make_loader(train_examples, cfg, tokenizer.pad_token_id, shuffle=cfg.data.shuffle, rank=rank,
                         world_size=world_size)
    return model, objective, take_steps(loader, cfg, n_steps)


def synthetic_start(cfg: Config, device: torch.device, *, n_steps: int, rank: int = 0,
                    world_size: int = 1) -> tuple:
    """(model, objective, this rank's first `n_steps` steps of synthetic micro-batches): random rows for the
    language-modelling objectives, random pairs through the training loader for the pairwise ones."""
    vocab_size = get_preset(cfg.model.preset).vocab_size if cfg.model.preset else 0
    model = build(cfg, vocab_size=vocab_size, device=device)
    if cfg.objective not in PAIRWISE:
        objective = starting_objective(cfg, model, SYNTHETIC_TOKENIZER, ())
        return model, objective, synthetic_batches(cfg, vocab_size=model.vocab_size, n_steps=n_steps, rank=rank)
    # enough pairs for every step of every rank: each row holds one, and the loader gives each rank its share
    count = cfg.train.micro_batch_size * cfg.train.grad_accum * n_steps * world_size
    pairs = synthetic_pairs(cfg, vocab_size=model.vocab_size, count=count)
    objective = starting_objective(cfg, model, SYNTHETIC_TOKENIZER, pairs)
    loader = make_loader(pairs, cfg, SYNTHETIC_TOKENIZER.pad_token_id, shuffle=False, rank=rank,
                         world_size=world_size)
    return model, objective, take_steps(loader, cfg, n_steps)


def take_steps(loader, cfg: Config, n_steps: int) -> list[list[Batch | PairBatch]]:
    """The loader's next `n_steps` steps of `train.grad_accum` micro-batches."""
    return [[next(loader) for _ in range(cfg.train.grad_accum)] for _ in range(n_steps)]


def train_step(run: Prepared, micro_batches: list[Batch | PairBatch], *,
               max_grad_norm: float) -> tuple[torch.Tensor, int]:
    """One optimizer step of the training loop over `micro_batches`: (summed loss on the device, trained units)."""
    loss_sum, units = accumulate_gradients(run.model, run.objective, micro_batches, device=run.device,
                                           autocast=run.autocast)
    clip_gradients(run.model, max_grad_norm, run.optimizer)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss_sum, units


def synthetic_batches(cfg: Config, *, vocab_size: int, n_steps: int, rank: int = 0) -> list[list[Batch]]:
    """`n_steps` x `grad_accum` micro-batches of full random rows (`micro_batch_size` x `data.max_length`);
    each data-parallel rank draws its own."""
    rows, length = cfg.train.micro_batch_size, cfg.data.max_length
    generator = torch.Generator().manual_seed(cfg.train.seed + 1_000_003 * rank)
    positions = torch.arange(length).expand(rows, length)
    steps = []
    for _ in range(n_steps):
        micro_batches = []
        for _ in range(cfg.train.grad_accum):
            tokens = torch.randint(0, vocab_size, (rows, length + 1), generator=generator)
            micro_batches.append(Batch(input_ids=tokens[:, :-1], labels=tokens[:, 1:], position_ids=positions))
        steps.append(micro_batches)
    return steps


SYNTHETIC_TOKENIZER = SimpleNamespace(pad_token_id=0)
"""What the objectives read of a tokenizer on synthetic data, which has none: the pad id (padding is never
trained: its labels are IGNORE_INDEX)."""


def synthetic_pairs(cfg: Config, *, vocab_size: int, count: int) -> list[PreferencePair]:
    """`count` preference pairs of random tokens drawn from `train.seed`, each filling a row of
    `data.max_length`: chosen and rejected sides of half of it each, encoded as real pairs are
    (`optrush.data.preference.encode_sequence`), on the same random prompt (the first half of each side) with
    different random completions, the last vocabulary id as EOS."""
    side = cfg.data.max_length // 2
    prompt_length = side // 2
    completion_length = side - prompt_length - 1  # the EOS ends every side
    generator = torch.Generator().manual_seed(cfg.train.seed)

    def random_ids(n: int) -> list[int]:
        return torch.randint(0, vocab_size, (n,), generator=generator).tolist()

    pairs = []
    for index in range(count):
        prompt = random_ids(prompt_length)
        chosen, rejected = (encode_sequence(prompt, random_ids(completion_length), bos_id=None,
                                            eos_id=vocab_size - 1) for _ in range(2))
        # shared: the leading positions whose target is still a prompt token (see PreferencePair.shared)
        pairs.append(PreferencePair(chosen=chosen, rejected=rejected, index=index, shared=prompt_length - 1))
    return pairs


# ------------------------------------------------------------------------------------------------------- reports

COLUMNS = (  # (header, result key, format)
    ("config", "name", str),
    ("tokens/s", "tokens_per_s", lambda v: f"{v:,.0f}"),
    ("non-pad tokens/s", "real_tokens_per_s", lambda v: f"{v:,.0f}"),
    ("MFU", "mfu", lambda v: f"{v:.3f}"),
    ("peak GiB", "peak_mem_gib", lambda v: f"{v:.1f}"),
    ("first step s", "time_to_first_step_s", lambda v: f"{v:.1f}"),
    ("loss", "loss", lambda v: f"{v:.4f}"),
)


def markdown_table(results: list[dict]) -> str:
    """One row per result; one that did not run (`status` skipped or failed) shows why instead of numbers."""
    lines = ["| " + " | ".join(header for header, _, _ in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for result in results:
        if result.get("status", "ok") != "ok":
            lines.append(f"| {result['name']} | {result['status']}: {result['reason'][:120]} |"
                         + " |" * (len(COLUMNS) - 2))
            continue
        cells = [("n/a" if result.get(key) is None else fmt(result[key])) for _, key, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_markdown(results: list[dict], *, title: str = "optrush bench") -> str:
    """A markdown report: the table, then where and how it was measured."""
    first = next((r for r in results if r.get("status", "ok") == "ok"), None)
    lines = [f"# {title}", "", markdown_table(results), ""]
    if first is not None:
        p = first["provenance"]
        lines += [f"- device: {first['device']}; torch {p['torch']}, CUDA {p['cuda']}, Python {p['python']}, "
                  f"optrush {p['git_sha'] or p['optrush'] or 'unknown'}{' (modified)' if p['git_dirty'] else ''}",
                  f"- batch: {first['rows']} rows x {first['seq_len']} tokens x {first['grad_accum']} micro-batches"
                  f"{' of synthetic random tokens' if first['synthetic'] else ''}; {first['warmup']} warm-up + "
                  f"{first['steps']} timed steps; {first['params']:,} parameters",
                  "- MFU = tokens/s x (6 x params + 6 x layers x seq x dim) / dense peak FLOP/s of the matmul "
                  f"precision ({fmt_flops(first['peak_flops'])})",
                  f"- peak GiB ({first['peak_mem_kind']}): {MEMORY_KINDS[first['peak_mem_kind']]}",
                  f"- measured {p['timestamp_utc']}"]
    return "\n".join(lines) + "\n"


def fmt_flops(value: float | None) -> str:
    return "unknown on this device" if value is None else f"{value / 1e12:.0f} TFLOP/s"


def write_report(results: list[dict], out_dir: str | Path, *, stem: str = "bench") -> tuple[Path, Path]:
    """Write `<out_dir>/<stem>.json` (every field) and `<stem>.md`; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    md_path.write_text(report_markdown(results), encoding="utf-8")
    return json_path, md_path
