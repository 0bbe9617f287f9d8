"""The one training loop, for every objective.

    from optrush.config import load_config
    from optrush.train import train
    summary = train(load_config("optrush/recipes/demo.yaml", ["train.max_steps=50"]))

Read top to bottom: set up (device, process group, seed, tokenizer, data, model, optimizations, optimizer), maybe
resume, then repeat: take `grad_accum` micro-batches, count the step's trained units, accumulate gradients of the
summed loss divided by that count, clip, step, log, evaluate, checkpoint. Dividing by the *step's* count (not a
per-micro-batch mean) makes accumulation exactly equal to one large batch whatever the lengths and padding.

Data parallelism (parallel.strategy ddp/fsdp/hsdp, one process per device under torchrun): every rank runs this
same loop on its share of each step's micro-batches. The step's count is summed over all ranks, so N ranks with
grad_accum g train exactly what one process with grad_accum N*g would (same loss, same gradients); only rank 0
logs, prints and writes shared files.
"""
from __future__ import annotations

import contextlib
import math
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from optrush.bench.provenance import provenance
from optrush.config import Config, ConfigError, to_dict
from optrush.data.dataset import build_datasets
from optrush.data.loader import BatchLoader
from optrush.data.tokenizer import load_config_tokenizer
from optrush.models.io import adopt_token_ids, build_model, load_model, save_model
from optrush.models.presets import get_preset
from optrush.data.preference import PairLoader, build_preference_datasets
from optrush.objectives import PAIRWISE, UNITS, build_objective
from optrush.objectives.causal_lm import CausalLM
from optrush.objectives.grpo import import_rewards
from optrush.generate.evaluate import sample_during_training
from optrush.optim import EMA, build_optimizer, eval_weights
from optrush.peft import has_adapters, holds_preset_base, preset_base_fingerprint, save_adapter, save_merged, \
    save_preset_base
from optrush.peft.export import absolute
from optrush.optim.schedule import build_scheduler
from optrush.parallel.distributed import Distributed, all_reduce_sum, barrier, init_distributed, is_main, \
    sum_over_ranks, teardown, world_size
from optrush.parallel.context import apply_context_extension, data_parallel_position, setup_context_parallel
from optrush.parallel.fsdp import gather_full_model, meta_copy
from optrush.train.checkpoint import CheckpointManager
from optrush.train.float8 import require_float8
from optrush.train.metrics import LogWindow, MetricsLogger, Throughput, matmul_peak_flops, mfu, model_params, \
    peak_memory_gib, trainable_params, training_flops_per_token
from optrush.train.optimizations import apply_optimizations, apply_peft
from optrush.train.resume import check_resume, maybe_resume, report_interrupt


def train(cfg: Config) -> dict:
    """Train as configured; returns the run summary (also written to `<output_dir>/summary.json`). Under torchrun
    with a parallel.strategy, every rank calls it (the summary is rank 0's)."""
    if cfg.data.path is None:
        raise ConfigError("data.path is not set: give the training data (a JSONL file), e.g. data.path=train.jsonl")
    parallel = init_distributed(cfg.parallel, device=resolve_device(cfg.train.device))
    try:
        with backend_flags(cfg):
            return run(cfg, parallel)
    except torch.OutOfMemoryError:
        from optrush.plan import oom_advice  # the planner knows which switch frees the most memory

        print(oom_advice(cfg), file=sys.stderr, flush=True)
        raise
    finally:
        teardown()


def prepare_output_dir(path: str) -> Path:
    """Create `path` (with parents) and prove a file can be written in it: a read-only directory fails here, at
    start-up, not at the first checkpoint."""
    output_dir = Path(path)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as err:
        what = "cannot write to the directory" if output_dir.is_dir() else "cannot create the directory"
        raise ConfigError(f"output_dir={path}: {what} ({err.strerror}: {err.filename}): set output_dir to a "
                          "directory you can write to") from None
    return output_dir


def check_before_start(cfg: Config) -> Path:
    """The start-up checks that need no device: the output directory (created, writable; returned), the resume
    checkpoint and GRPO's reward functions. `train --nproc` runs them before it starts any process, so their error
    is printed once; each process runs them again (a multi-node rank has only its own machine's view)."""
    output_dir = prepare_output_dir(cfg.output_dir)
    check_resume(cfg)
    if cfg.objective == "grpo":
        import_rewards(cfg.grpo.rewards)
    return output_dir


def run(cfg: Config, parallel: Distributed) -> dict:
    # before any data work: a missing float8 kernel, resume checkpoint or reward function fails in seconds, not after
    # tokenizing
    output_dir = check_before_start(cfg)
    device = parallel.device
    if cfg.precision.float8:
        require_float8(device, cfg.precision.mode)
    if cfg.train.verify:
        verify(cfg, output_dir)
    seed_everything(cfg.train.seed)

    tokenizer = load_config_tokenizer(cfg)
    train_examples, eval_examples, data_report = read_data(cfg, tokenizer)
    if is_main():
        print(data_report.format(), flush=True)
        if cfg.objective == "grpo":
            print(f"  objective=grpo uses the prompts only: it samples grpo.group_size={cfg.grpo.group_size} "
                  "completions of each and trains on those, not on the data's completions", flush=True)

    model = build(cfg, vocab_size=len(tokenizer), device=device)
    adopt_token_ids(model, tokenizer)  # config.json names the tokenizer's bos/eos/pad (a preset knows none)
    objective = starting_objective(cfg, model, tokenizer, train_examples, eval_examples)
    # sharding leaves no plain model to save (final/, a preset's base/): keep its structure (on the meta device, no
    # memory), before ring attention binds the model to a process group (which cannot be copied)
    plain = meta_copy(model) if cfg.parallel.strategy in ("fsdp", "hsdp") else None
    # context parallelism: each rank of a group holds a share of every row and attends around a ring
    model, shard = setup_context_parallel(model, cfg, pad_id=tokenizer.pad_token_id)
    model = apply_optimizations(model, cfg)
    if is_main():
        print(params_line(model), flush=True)
    optimizer = build_optimizer(model, cfg.optim, lr=cfg.train.lr, device_type=device.type,
                                lora_plus_ratio=cfg.peft.lora_plus_ratio)
    scheduler = build_scheduler(optimizer, cfg.train)
    ema = EMA(model, decay=cfg.train.ema_decay) if cfg.train.ema_decay else None
    # further state a resume must restore exactly: GRPO's stored rollouts and sampling RNG, the EMA weights
    extras = {"objective": objective, **({"ema": ema} if ema is not None else {})}
    data_rank, data_world = data_parallel_position(cfg.context.degree)
    loader = make_loader(train_examples, cfg, tokenizer.pad_token_id, shuffle=cfg.data.shuffle,
                         pin_memory=device.type == "cuda", prefetch=cfg.data.prefetch, rank=data_rank,
                         world_size=data_world)
    batches_left_out, examples_left_out = loader.left_out
    if batches_left_out and is_main():
        print(f"data parallel: every one of the {data_world} replicas takes the same number of micro-batches, so "
              f"the plan's last {batches_left_out} are left out of epoch 0 ({examples_left_out} examples; each "
              "epoch reshuffles, so other examples fall there next time)", flush=True)

    base_model_path = cfg.model.path  # what the adapters saved below name as their base
    if cfg.model.preset is not None and has_adapters(model):
        # a preset's random base exists nowhere else: written at the first start, compared at every later one (each
        # rank reads base/, so all of them refuse another base)
        base_dir = base_model_path = output_dir / "base"
        fingerprint = preset_base_fingerprint(model, preset=cfg.model.preset, seed=cfg.train.seed,
                                              quantize=cfg.peft.quantize)
        if not holds_preset_base(base_dir, fingerprint):
            barrier()  # every rank has looked before rank 0 writes
            # collective under fsdp/hsdp: rank 0 gathers the full weights into a copy of the plain structure
            base = model if plain is None else gather_full_model(model, like=with_adapters(meta_copy(plain), cfg))
            if is_main():
                save_preset_base(base, base_dir, tokenizer, fingerprint=fingerprint)
    checkpoints = CheckpointManager(output_dir / "checkpoints", keep_last=cfg.checkpoint.keep_last,
                                    base_model_path=base_model_path, tokenizer=tokenizer)
    state = maybe_resume(cfg, checkpoints, model=model, optimizer=optimizer, scheduler=scheduler, loader=loader,
                         extras=extras)

    autocast = precision_context(cfg, device)
    flops_per_token = training_flops_per_token(model, cfg.data.max_length)
    peak_flops = matmul_peak_flops(device, cfg.precision.mode)
    peak_flops = peak_flops * parallel.world_size if peak_flops else None  # MFU of all devices together
    throughput = Throughput()
    window = LogWindow(UNITS[cfg.objective])
    final_eval, eval_step = {}, None
    model.train()
    with (MetricsLogger(output_dir=output_dir, cfg=cfg.logging, total_steps=cfg.train.max_steps,
                        start_step=state.step, sample_prompts=cfg.train.sample_prompts, enabled=is_main()) as metrics,
          report_interrupt(state, checkpoints, every=cfg.checkpoint.every)):
        while state.step < cfg.train.max_steps:
            started = time.perf_counter()
            micro_batches = [shard(next(loader)) for _ in range(cfg.train.grad_accum)]
            step_loss, units = accumulate_gradients(model, objective, micro_batches, device=device,
                                                    autocast=autocast)
            grad_norm = clip_gradients(model, cfg.train.max_grad_norm, optimizer)
            optimizer.step()
            lr = scheduler.get_last_lr()[0]  # the lr this step used: scheduler.step() sets the next step's
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model)

            state.step += 1
            loss = float(step_loss) / max(units, 1)  # the first wait for the GPU in this step
            norm = float(grad_norm)  # computed before the step: read without a further wait
            state.losses.append(loss)
            tokens = sum(b.input_ids.numel() for b in micro_batches)
            padding = sum(b.num_padding for b in micro_batches)
            tokens, real_tokens = (int(n) for n in all_reduce_sum([tokens, tokens - padding], device=device))
            state.tokens_seen += real_tokens
            if device.type == "cuda":
                torch.cuda.synchronize()
            throughput.update(tokens=tokens, real_tokens=real_tokens, seconds=time.perf_counter() - started)
            window.add(loss=loss, grad_norm=norm, units=units)
            evaluating = bool(eval_examples) and cfg.train.eval_every > 0 and state.step % cfg.train.eval_every == 0
            # an evaluation ends the window too: its batches add to the objective's metrics, which must not mix
            # with training's
            if state.step % cfg.logging.every == 0 or state.step == cfg.train.max_steps or evaluating:
                metrics.log(state.step, {
                    **window.pop(), "lr": lr,
                    "tokens_per_s": throughput.tokens_per_s, "real_tokens_per_s": throughput.real_tokens_per_s,
                    "mfu": mfu(throughput.tokens_per_s, flops_per_token, peak_flops),
                    "peak_mem_gib": peak_memory_gib(device),
                    **objective.pop_metrics(partial(sum_over_ranks, device=device))})
            require_finite(state.step, loss=loss, grad_norm=norm)  # before sampling from broken weights
            if samples := sample_during_training(model, tokenizer, cfg, state.step):
                metrics.log(state.step, samples)
            if evaluating:
                with eval_weights(model, optimizer, ema):  # schedule-free's average / the EMA weights
                    final_eval, eval_step = evaluate(model, objective, eval_examples, cfg, tokenizer, device,
                                                     autocast, shard=shard), state.step
                metrics.log(state.step, final_eval)
                require_finite(state.step, eval_loss=final_eval["eval_loss"])
            if cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0:
                saved = checkpoints.save(model=model, optimizer=optimizer, scheduler=scheduler, loader=loader,
                                         state=state, extras=extras)
                metrics.note(f"step {state.step}: checkpoint saved to {saved}")

        loader.close()  # stops its prefetch thread
        if eval_examples and eval_step != state.step:  # always end with an evaluation of the final weights
            with eval_weights(model, optimizer, ema):
                final_eval = evaluate(model, objective, eval_examples, cfg, tokenizer, device, autocast,
                                      shard=shard)
            metrics.log(state.step, final_eval)
            require_finite(state.step, eval_loss=final_eval["eval_loss"])  # final/ holds these weights
        if cfg.checkpoint.save_final:
            final_dir = output_dir / "final"
            # collective under fsdp/hsdp: rank 0 gathers the full weights into the plain structure kept above
            with eval_weights(model, optimizer, ema):
                final = model if plain is None else gather_full_model(model, like=with_adapters(plain, cfg))
                if is_main():
                    save_final(final, final_dir, cfg, base_model_path=base_model_path)
                    tokenizer.save_pretrained(final_dir)
                    metrics.note(f"final model saved to {final_dir}")
            barrier()
        # both over the steps' own losses (`losses`), which a resume restores: the last step's and the lowest
        summary = {"steps": state.step, "final_loss": state.losses[-1] if state.losses else None,
                   "min_loss": min(state.losses, default=None), "losses": state.losses,
                   "tokens_seen": state.tokens_seen, **final_eval,
                   "tokens_per_s": throughput.tokens_per_s, "real_tokens_per_s": throughput.real_tokens_per_s,
                   "peak_mem_gib": peak_memory_gib(device), "params": model_params(model),
                   "trainable_params": trainable_params(model),
                   # absolute: the recorded model.path is relative to where training ran, and `optrush eval`
                   # reads its DPO reference from here, wherever it runs
                   "starting_model": absolute(base_model_path),
                   "data": data_report.as_dict(), "config": to_dict(cfg), "provenance": provenance()}
        metrics.summary(summary)
    return summary


class TrainingDiverged(FloatingPointError, ValueError):
    """A loss or gradient norm became inf or NaN. A ValueError too: the fix is a setting (the message says which),
    so the CLI prints the message, as for other bad input, not a stack."""


def require_finite(step: int, **values: float) -> None:
    """Stop the run when a loss or grad norm of `step` is not finite: the weights are broken (a non-finite grad norm
    has just been applied), and no checkpoint or final/ may be written from them."""
    broken = [f"{name} became {value}" for name, value in values.items() if not math.isfinite(value)]
    if broken:
        raise TrainingDiverged(f"{' and '.join(broken)} at step {step}, so the run stops without saving these "
                               "weights: lower train.lr, keep gradient clipping on (train.max_grad_norm > 0), or "
                               "use precision.mode=fp32 to find the cause")


def params_line(model: torch.nn.Module) -> str:
    """The start-up line saying how many of the model's parameters train (few under PEFT)."""
    total, trained = model_params(model), trainable_params(model)
    return f"params: {trained:,} trainable of {total:,} ({100 * trained / max(total, 1):.3g}%)"


def save_final(model, final_dir: Path, cfg: Config, *, base_model_path: str | Path | None) -> None:
    """The trained model in HF format; with adapters, per peft.save the merged model and/or the PEFT adapter
    (in `final/adapter`, naming `base_model_path`)."""
    if not has_adapters(model):
        save_model(model, final_dir)
        return
    if cfg.peft.save in ("merged", "both"):
        save_merged(model, final_dir)
    if cfg.peft.save in ("adapter", "both"):
        save_adapter(model, final_dir / "adapter", base_model_path=base_model_path)


def with_adapters(plain: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    """The meta structure kept before the transforms, given the parameters the peft transform adds."""
    return apply_peft(plain, cfg) if cfg.peft.method != "none" else plain


def accumulate_gradients(model, objective, micro_batches, *, device, autocast) -> tuple[torch.Tensor, int]:
    """Backward over this rank's micro-batches of one optimizer step, each summed loss divided by the step's total
    units over all ranks, times the world size because ddp/fsdp average the ranks' gradients (so the result is the
    gradient of the global batch's mean loss). Returns (summed loss, units), both over all ranks; the loss stays a
    device tensor, so that the optimizer step is queued before anything waits for the GPU (`float()` it after)."""
    units = int(all_reduce_sum([sum(objective.units(b) for b in micro_batches)], device=device)[0])
    ranks = world_size()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for batch in micro_batches:
        with autocast:
            loss_sum, _ = objective(model, batch.to(device, non_blocking=True))
        (loss_sum / max(units, 1) * ranks).backward()
        total += loss_sum.detach()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    return total, units


def verify(cfg: Config, output_dir: Path) -> None:
    """`train.verify=true`: the fast subset of `optrush check` on this very config, before any training."""
    from optrush.check import run_fast_checks  # optrush.check builds on this module

    report = run_fast_checks(cfg)
    report.print()
    report.write(output_dir / "check.json")
    if not report.passed:
        raise ConfigError(f"train.verify: {len(report.failures)} check(s) failed (see {output_dir / 'check.json'}); "
                          "turn off the switch each failed row names, or set train.verify=false to train anyway")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def backend_flags(cfg: Config):
    """TF32 matmuls (`precision.tf32`) and deterministic algorithms (`train.deterministic`) while the block runs.
    The flags are process-wide: they are put back after it, so a caller's own fp32 work after `train()` (or a
    test's reference) runs as before."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.precision.tf32
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


def param_dtype(cfg: Config) -> torch.dtype:
    """The weights' storage dtype: bf16 for bf16_pure and fp8_pure, fp32 for every other precision.mode."""
    return torch.bfloat16 if cfg.precision.bf16_weights else torch.float32


def build(cfg: Config, *, vocab_size: int, device: torch.device) -> torch.nn.Module:
    """The model named by the config: loaded from an HF directory, or a fresh preset sized to the tokenizer."""
    dtype = param_dtype(cfg)
    if cfg.model.path is not None:
        model = load_model(cfg.model.path, dtype=dtype, device=device, quantize=cfg.peft.quantize)
        if model.vocab_size < vocab_size:
            raise ConfigError(f"the tokenizer has {vocab_size} tokens but the model at {cfg.model.path} only "
                              f"{model.vocab_size} embeddings; use the model's own tokenizer")
        return apply_context_extension(model, cfg)
    args = get_preset(cfg.model.preset, vocab_size=vocab_size)
    # quantize=: each block is quantized as soon as it is initialised (apply_quantize later leaves it as it is)
    model = build_model(args, dtype=dtype, device=device, seed=cfg.train.seed, quantize=cfg.peft.quantize)
    return apply_context_extension(model, cfg)


def read_data(cfg: Config, tokenizer) -> tuple:
    """(train, eval, report) of the configured data: preference pairs for the pairwise objectives, else
    tokenized examples."""
    read = build_preference_datasets if cfg.objective in PAIRWISE else build_datasets
    return read(cfg.data, tokenizer, seed=cfg.train.seed)


def starting_objective(cfg: Config, model: torch.nn.Module, tokenizer, train_examples, eval_examples=()):
    """The objective of `cfg`, built from the starting model: call it before the optimizations, as an objective
    may add a head (reward) or keep a frozen copy of the model or its log-probs of every pair, train and eval
    (DPO)."""
    return build_objective(cfg.objective, cfg=cfg, model=model, tokenizer=tokenizer,
                           examples=list(train_examples) + list(eval_examples) if cfg.objective in PAIRWISE else ())


def make_loader(examples, cfg: Config, pad_id: int, *, shuffle: bool, pin_memory: bool = False,
                prefetch: int = 0, rank: int = 0, world_size: int = 1) -> BatchLoader:
    if cfg.objective in PAIRWISE:
        return PairLoader(examples, strategy=cfg.data.packing, rows=cfg.train.micro_batch_size,
                          max_length=cfg.data.max_length, pad_id=pad_id, seed=cfg.train.seed, shuffle=shuffle,
                          shared_prompt=cfg.data.shared_prompt, rank=rank, world_size=world_size,
                          batch_tokens=cfg.data.batch_tokens)
    return BatchLoader(examples, strategy=cfg.data.packing, rows=cfg.train.micro_batch_size,
                       max_length=cfg.data.max_length, pad_id=pad_id, seed=cfg.train.seed, shuffle=shuffle,
                       pin_memory=pin_memory, prefetch=prefetch, rank=rank, world_size=world_size,
                       batch_tokens=cfg.data.batch_tokens)


def precision_context(cfg: Config, device: torch.device):
    if cfg.precision.autocast:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def clip_gradients(model: torch.nn.Module, max_norm: float, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """Clip to global norm `max_norm` (0: only measure); returns the norm before clipping, a device tensor (reading
    it waits for the GPU: do that after the optimizer step is queued). Under fsdp/hsdp the gradients are DTensor
    shards and the norm is reduced over the mesh.

    torch's fused AdamW clips inside its step instead: its kernel divides every gradient by the optimizer's
    `grad_scale` tensor (the hook AMP's GradScaler unscales through) instead of a separate multiply pass over every
    gradient. The kernel writes the divided gradient back, so only part of that pass is saved: +0.3% tokens/s on
    the 1B step (H100, benchmarks/results/train_speed_h100_clip_ab.md). Same result up to rounding: the gradient
    is divided in fp32 inside the kernel instead of multiplied in its own dtype."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0 and clips_in_step(optimizer, params):
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        # clip_grad_norm_'s factor min(1, max_norm / (norm + 1e-6)), as a divisor
        optimizer.grad_scale = torch.clamp((norm.float() + 1e-6) / max_norm, min=1.0)
        return norm
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def clips_in_step(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> bool:
    """Whether `optimizer` is torch's fused AdamW over plain tensors (DTensor shards need the mesh-reduced norm
    as a DTensor, which the fused kernel's scale argument does not take)."""
    return (type(optimizer) is torch.optim.AdamW and all(g["fused"] for g in optimizer.param_groups)
            and not any(isinstance(p, DTensor) for p in params))


@torch.no_grad()
def evaluate(model, objective, examples, cfg: Config, tokenizer, device, autocast,
             shard=lambda batch: batch) -> dict[str, float]:
    """Mean loss per trained unit over up to `train.eval_batches` micro-batches (same order every time), split
    over the data-parallel replicas of a distributed run (each evaluates eval_batches / replicas of them: the same
    count on every rank, as each forward of a sharded model is a collective); `shard` takes a context-parallel
    rank's part of a batch."""
    data_rank, data_world = data_parallel_position(cfg.context.degree)
    loader = make_loader(examples, cfg, tokenizer.pad_token_id, shuffle=False, rank=data_rank, world_size=data_world)
    model.eval()
    total, units = 0.0, 0
    for _ in range(min(max(cfg.train.eval_batches // data_world, 1), loader.batches_per_epoch)):
        batch = shard(next(loader))
        units += objective.units(batch)
        with autocast:
            loss_sum, _ = objective(model, batch.to(device))
        total += loss_sum.item()
    model.train()
    total, units = all_reduce_sum([total, units], device=device)
    loss = total / max(units, 1)
    # the loop logged the training steps' metrics before evaluating: these are the evaluation batches' only
    extra = {f"eval_{name}": value
             for name, value in objective.pop_metrics(partial(sum_over_ranks, device=device)).items()}
    if not isinstance(objective, CausalLM):  # exp(a reward, DPO or GRPO loss) is no perplexity
        return {"eval_loss": loss, **extra}
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), **extra}
