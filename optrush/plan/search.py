"""`optrush plan`: the fastest training configurations that fit, and advice after an out-of-memory error.

    args = model_args("llama3.1-8b")                      # a preset name or an HF model directory
    args, extension = extend_context(args, 4096)          # model.max_seq_len for rows longer than the model's
    gpu, n = parse_gpus("1xH100")
    candidates = plan(args, gpu=gpu, n_gpus=n, seq_len=4096, peft="lora")   # fitting ones first, fastest first
    text = config_yaml(candidates[0], base_overrides=["model.preset=llama3.1-8b", *extension], gpu=gpu, n_gpus=n)
    print(oom_advice(cfg))                                # what `train` prints on torch.OutOfMemoryError

A candidate is a `Setup` (precision, PEFT, compile, fused loss, checkpointing policy, micro-batch, data
parallelism) that `optrush.config.load_config` validates; it fits when the memory model's allocated peak plus
allocator slack and CUDA context stays under the GPU's memory less `margin`.

Rows longer than `LONG_ROW_TOKENS` also get the long-row levers (`long_row_choices`): MLP chunks of that many
tokens and, for packed rows (the planner assumes data.packing=bfd, whose document masks SDPA builds as a dense
(B, T, T) boolean mask: T² bytes per row, 256 GiB at 524,288 tokens), `model.attention=varlen`, which needs no
mask. The speed model cannot tell the attention backends apart (same FLOPs), so between an sdpa and a varlen
candidate of equal predicted speed the one needing less memory ranks first: varlen, wherever the rows have document
masks. Measured, varlen is the faster: on the 1B shape with packed 2,048-token rows 61,344 tokens/s vs sdpa's 54,458
in one command on an H200 (benchmarks/results/length_mix_h200.md), 58,728 vs 52,616 on an H100 (length_mix_varlen_h100
.md and length_mix_h100.md, consecutive commands on one machine), and on one 8,192-token row of 4 documents 1.31 ms
vs 7.35 ms for attention forward + backward (kernels_h100.md). Flex measured within 2% of varlen
on those rows, but it compiles its mask builder and kernel for each row length; one mask-free backend is enough for
a model that cannot rank them. Shorter packed rows try varlen too (no MLP chunks): measured faster there, as
above; on unpacked rows (one document a row) SDPA's cuDNN kernel was the faster, 64,216 vs 60,247 tokens/s on
the 1B shape at 4 x 2,048 tokens (benchmarks/results/train_speed_h100_varlen.md), so they keep sdpa.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from optrush.config import Config, ConfigError, load_config
from optrush.config.load import build, parse_override, set_dotted
from optrush.models.llama import ModelArgs
from optrush.models.presets import PRESETS, get_preset
from optrush.plan.gpus import GPU, gpu_from_device_name
from optrush.plan.memory import GIB, Memory, estimate_memory, required_gib
from optrush.plan.setup import Setup, config_overrides, setup_from_config
from optrush.plan.speed import Calibration, Speed, calibrate, estimate_speed, load_measurements

# --peft: the (peft.method, peft.quantize) pairs searched
PEFT_CHOICES = {"none": [("none", "none")], "lora": [("lora", "none")], "qlora": [("lora", "nf4")],
                "any": [("none", "none"), ("lora", "none"), ("lora", "nf4")]}
# (checkpointing, every, offload, skip_last), least memory last: the last blocks kept whole (no recomputation, no
# copies) spend memory that offload freed on speed
CHECKPOINTING = [("none", 1, False, 0), ("selective", 1, False, 0), ("full", 2, False, 0), ("full", 1, False, 0),
                 ("full", 1, True, 8), ("full", 1, True, 4), ("full", 1, True, 2), ("full", 1, True, 0)]
MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_MARGIN = 0.05
LONG_ROW_TOKENS = 8192
"""Rows longer than this are searched with the long-row levers too; also their MLP chunk, the one the long-context
runs measured (long_context_1b_h100.md: 524,288 tokens of the 1B shape in 45.9 GiB on one H100)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Candidate:
    setup: Setup
    memory: Memory
    required_gib: float
    speed: Speed
    fits: bool


def model_args(spec: str) -> ModelArgs:
    """ModelArgs of a preset name or of an HF model directory's config.json."""
    if spec in PRESETS:
        return get_preset(spec)
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(f"--model {spec!r}: neither a preset ({', '.join(PRESETS)}) nor a model directory")
    from optrush.models.hf import args_from_hf_config
    from optrush.models.io import read_config

    return args_from_hf_config(read_config(path))


def model_overrides(spec: str) -> list[str]:
    return [f"model.preset={spec}"] if spec in PRESETS else [f"model.path={spec}"]


def extend_context(args: ModelArgs, seq_len: int) -> tuple[ModelArgs, list[str]]:
    """The model shape and overrides for rows of `seq_len` tokens: the forward pass refuses rows longer than the
    model's RoPE tables, so a longer row raises `model.max_seq_len` to it (tables of that length are what the memory
    model then counts)."""
    if seq_len <= args.max_seq_len:
        return args, []
    return dataclasses.replace(args, max_seq_len=seq_len), [f"model.max_seq_len={seq_len}"]


def evaluate(args: ModelArgs, setup: Setup, *, gpu: GPU, calibration: Calibration,
             margin: float = DEFAULT_MARGIN) -> Candidate:
    memory = estimate_memory(args, setup)
    need = required_gib(memory, n_gpus=setup.n_gpus)
    return Candidate(setup=setup, memory=memory, required_gib=need,
                     speed=estimate_speed(args, setup, gpu, calibration), fits=need <= gpu.memory_gib * (1 - margin))


def candidate_setups(*, gpu: GPU, n_gpus: int, seq_len: int, peft: str = "none", optimizer: str = "adamw",
                     micro_batches: tuple[int, ...] = MICRO_BATCHES, document_mask: bool = True,
                     untied: bool = True) -> list[Setup]:
    """Every combination the planner considers (before validation and the memory check); `untied`: the model has
    an embedding table apart from its head, which a frozen-embedding setup may keep in host memory."""
    # validation drops fp8 + LoRA
    precisions = ["bf16_pure", "bf16_mixed"] + (["fp8_pure", "fp8"] if gpu.fp8_flops else [])
    strategies = ["none"] if n_gpus == 1 else ["fsdp", "ddp"]
    grid = itertools.product(precisions, PEFT_CHOICES[peft], ("none", "blocks", "model"), (False, True),
                             CHECKPOINTING, micro_batches, strategies, (False, True),
                             long_row_choices(seq_len, document_mask=document_mask))
    setups = []
    for precision, (method, quantize), compile_mode, fused, (policy, every, offload, skip_last), micro_batch, \
            strategy, host_embedding, (attention, mlp_chunk_tokens) in grid:
        if host_embedding and (method == "none" or not untied or strategy != "none"):
            continue  # a trained, tied or replicated table stays on the GPU
        setups.append(Setup(seq_len=seq_len, micro_batch=micro_batch, precision=precision, optimizer=optimizer,
                            peft=method, quantize=quantize, embedding_on_host=host_embedding, checkpointing=policy,
                            every=every, offload=offload, skip_last=skip_last, mlp_chunk_tokens=mlp_chunk_tokens,
                            compile=compile_mode, fused_loss=fused, attention=attention,
                            document_mask=document_mask, strategy=strategy, n_gpus=n_gpus))
    return setups


def long_row_choices(seq_len: int, *, document_mask: bool) -> list[tuple[str, int]]:
    """The (model.attention, activations.mlp_chunk_tokens) pairs searched: with document masks sdpa and varlen,
    without only sdpa (its causal kernel needs no mask, and beat varlen on whole 2,048-token rows:
    benchmarks/results/train_speed_h100_varlen.md); rows longer than `LONG_ROW_TOKENS` also chunk their MLPs."""
    attentions = ("sdpa", "varlen") if document_mask else ("sdpa",)
    if seq_len <= LONG_ROW_TOKENS:
        return [(attention, 0) for attention in attentions]
    return list(itertools.product(attentions, (0, LONG_ROW_TOKENS)))


def plan(args: ModelArgs, *, gpu: GPU, n_gpus: int = 1, seq_len: int, peft: str = "none", optimizer: str = "adamw",
         micro_batch: int | None = None, base_overrides: tuple[str, ...] = (), pins: tuple[str, ...] = (),
         margin: float = DEFAULT_MARGIN, calibration: Calibration | None = None,
         document_mask: bool = True) -> list[Candidate]:
    """Valid candidates, those that fit first, each group fastest first. `base_overrides` (model, objective, data)
    are part of every candidate's config; `pins` (e.g. "compile.mode=none") keep only candidates that agree;
    `document_mask`: rows packed from several documents (data.packing=bfd). No valid candidate at all raises
    ConfigError saying why (`no_candidate_message`)."""
    calibration = calibrate(load_measurements()) if calibration is None else calibration
    micro_batches = MICRO_BATCHES if micro_batch is None else (micro_batch,)
    setups = candidate_setups(gpu=gpu, n_gpus=n_gpus, seq_len=seq_len, peft=peft, optimizer=optimizer,
                              micro_batches=micro_batches, document_mask=document_mask,
                              untied=not args.tie_embeddings)
    pinned = dict(parse_override(p) for p in pins)
    if "compile.memory_budget" in pinned:  # not searched (no speed rows for it yet): a pin sets it for all
        setups = [s.replace(memory_budget=float(pinned["compile.memory_budget"])) for s in setups]
    out = [evaluate(args, s, gpu=gpu, calibration=calibration, margin=margin) for s in setups
           if agrees(s, pinned) and is_valid(s, base_overrides + pins)]
    if not out:
        raise ConfigError(no_candidate_message(setups, pins=pins, base_overrides=base_overrides))
    return sorted(out, key=lambda c: (not c.fits, -c.speed.tokens_per_s, c.memory.peak_bytes))


# the plan options that set a key the search varies, for messages about a pin that asks for another value
OPTION_OF_KEY = {"data.max_length": "--seq", "train.micro_batch_size": "--micro-batch", "optim.name": "--optim",
                 "peft.method": "--peft", "peft.quantize": "--peft", "parallel.strategy": "--gpus"}


def check_pins(pins: tuple[str, ...]) -> None:
    """Each pin names a config key and a value of its type: a ConfigError naming the pin otherwise (a typo would
    otherwise leave no candidate and read as "nothing fits")."""
    for pin in pins:
        tree: dict = {}
        set_dotted(tree, *parse_override(pin))
        try:
            build(Config, tree, prefix="")
        except ConfigError as err:
            raise ConfigError(f"--pin {pin}: {err}", key=err.key) from None


def no_candidate_message(setups: list[Setup], *, pins: tuple[str, ...], base_overrides: tuple[str, ...]) -> str:
    """Why the search kept no candidate: a pin whose value the search never tries (and the values it tries), or
    the validation error of a setup that agrees with every pin."""
    for pin in pins:
        key, value = parse_override(pin)
        tried = {str(chosen.get(key, value)): chosen.get(key, value)
                 for chosen in (dict(parse_override(o) for o in config_overrides(s)) for s in setups)}
        if value not in tried.values():
            option = f" (set it with {OPTION_OF_KEY[key]})" if key in OPTION_OF_KEY else ""
            return f"--pin {pin}: for this model and GPU the search tries only {key} = {', '.join(tried)}{option}"
    pinned = dict(parse_override(p) for p in pins)
    agreeing = next((s for s in setups if agrees(s, pinned)), None)
    if agreeing is None:
        return "no configuration agrees with all of --pin " + " ".join(pins)
    try:
        load_config(None, [*base_overrides, *config_overrides(agreeing), *pins], synthetic_data=True)
    except ConfigError as err:
        return f"no searched configuration validates with these settings{' and --pin' if pins else ''}: {err}"
    return "no searched configuration validates"


def agrees(setup: Setup, pinned: dict) -> bool:
    if not pinned:
        return True
    chosen = dict(parse_override(o) for o in config_overrides(setup))
    return all(chosen.get(key, value) == value for key, value in pinned.items())


def is_valid(setup: Setup, base_overrides: tuple[str, ...]) -> bool:
    """Whether the config validates (e.g. offload with whole-model compile, or a key this schema lacks, do not);
    the micro-batch never changes the answer, so it is left out of the cached call."""
    return config_validates(setup.replace(micro_batch=1), base_overrides)


@functools.cache
def config_validates(setup: Setup, base_overrides: tuple[str, ...]) -> bool:
    try:
        load_config(None, [*base_overrides, *config_overrides(setup)], synthetic_data=True)
    except ConfigError:
        return False
    return True


def describe(setup: Setup) -> str:
    """A short name: `bf16_pure lora compile=blocks fused_loss ac=full/2 mb=4 fsdp cp=2` (`offload mlp_chunk=8192
    attention=varlen` where chosen)."""
    parts = [setup.precision] + ([setup.peft] if setup.peft != "none" else [])
    parts += [setup.quantize] if setup.quantize != "none" else []
    parts += ["embedding-on-host"] if setup.embedding_on_host else []
    parts += [f"compile={setup.compile}"] if setup.compile != "none" else ["eager"]
    parts += ["fused_loss"] if setup.fused_loss else []
    if setup.checkpointing != "none":
        parts.append(f"ac={setup.checkpointing}" + (f"/{setup.every}" if setup.every > 1 else "")
                     + (f" skip_last={setup.skip_last}" if setup.skip_last else ""))
    parts += ["offload"] if setup.offload else []
    parts += [f"mlp_chunk={setup.mlp_chunk_tokens}"] if setup.mlp_chunk_tokens else []
    parts += [f"attention={setup.attention}"] if setup.attention != "sdpa" else []
    parts.append(f"mb={setup.micro_batch}")
    parts += [setup.strategy] if setup.strategy != "none" else []
    parts += [f"cp={setup.context_degree}"] if setup.context_degree > 1 else []
    return " ".join(parts)


def config_yaml(candidate: Candidate, *, base_overrides: list[str], gpu: GPU, n_gpus: int,
                path: str = "plan.yaml") -> str:
    """The candidate as the YAML config file `path` (the model, objective and data keys, and every key the planner
    chose), with a header giving the prediction and the command that runs it."""
    tree: dict = {}
    for item in [*base_overrides, *config_overrides(candidate.setup)]:
        set_dotted(tree, *parse_override(item))
    s, m = candidate.setup, candidate.memory
    launch = f"optrush train {path}" + (f" --nproc {n_gpus}" if n_gpus > 1 else "")
    header = [f"# optrush plan: {describe(s)} on {n_gpus}x{gpu.name}",
              (f"# predicted: {m.peak_gib:.1f} GiB allocated per GPU ({candidate.required_gib:.1f} GiB with CUDA "
               f"context and allocator slack, of {gpu.memory_gib:.0f}), {candidate.speed.tokens_per_s:,.0f} "
               f"tokens/s, MFU {candidate.speed.mfu:.2f} ({candidate.speed.basis})"),
              f"# run: {launch}   (set data.path, and data.tokenizer for a preset)"]
    return "\n".join(header) + "\n" + yaml.safe_dump(tree, sort_keys=False)


# ------------------------------------------------------------------------------------------------ OOM advice

def advice_changes(setup: Setup, *, untied: bool = True) -> list[tuple[str, Setup]]:
    """Single changes that lower memory. All but the last two keep the training math (halving the micro-batch
    doubles the accumulation, so the optimizer step sees the same tokens); bf16_pure weights and an 8-bit AdamW
    change the numerics a little. `untied`, as in `candidate_setups`: only an untied table may move to the host."""
    changes = []
    if setup.seq_len > LONG_ROW_TOKENS:  # the search's long-row levers (see the module docstring)
        if setup.attention == "sdpa" and setup.document_mask:
            changes.append(("model.attention=varlen", setup.replace(attention="varlen")))
        if not setup.mlp_chunk_tokens:
            changes.append((f"activations.mlp_chunk_tokens={LONG_ROW_TOKENS}",
                            setup.replace(mlp_chunk_tokens=LONG_ROW_TOKENS)))
    if not setup.fused_loss:
        changes.append(("kernels.fused_loss=true", setup.replace(fused_loss=True)))
    elif setup.loss_chunk_tokens > 1024:  # same speed on the 8B QLoRA step (qlora_h100_host_embedding.md)
        changes.append(("kernels.loss_chunk_tokens=1024", setup.replace(loss_chunk_tokens=1024)))
    for policy, every, offload, skip_last in CHECKPOINTING[1:]:
        if (policy, every, offload, skip_last) != (setup.checkpointing, setup.every, setup.offload, setup.skip_last):
            text = f"activations.checkpointing={policy} activations.every={every}" + (
                " activations.offload=true" if offload else "") + (
                f" activations.skip_last={skip_last}" if skip_last != setup.skip_last else "")
            compile_mode = "blocks" if offload and setup.compile == "model" else setup.compile  # offload hooks
            text += " compile.mode=blocks" if compile_mode != setup.compile else ""
            changes.append((text, setup.replace(checkpointing=policy, every=every, offload=offload,
                                                skip_last=skip_last, compile=compile_mode)))
    if setup.peft != "none" and untied and not setup.embedding_on_host:  # a tied table stays on the GPU
        changes.append(("peft.embedding_on_host=true", setup.replace(embedding_on_host=True)))
    if setup.micro_batch > 1:
        mb, accum = setup.micro_batch // 2, setup.grad_accum * 2
        changes.append((f"train.micro_batch_size={mb} train.grad_accum={accum}",
                        setup.replace(micro_batch=mb, grad_accum=accum)))
    if setup.n_gpus > 1 and setup.strategy != "fsdp":
        changes.append(("parallel.strategy=fsdp", setup.replace(strategy="fsdp")))
    # bf16 weights and optimizer state, keeping float8 matmuls where they ran
    lighter = {"fp32": "bf16_pure", "bf16_mixed": "bf16_pure", "fp8": "fp8_pure"}.get(setup.precision)
    if lighter:
        changes.append((f"precision.mode={lighter}", setup.replace(precision=lighter)))
    if setup.optimizer == "adamw" and setup.peft == "none":
        changes.append(("optim.name=adamw8bit", setup.replace(optimizer="adamw8bit")))
    return changes


def oom_advice(cfg: Config, *, gpu: GPU | None = None, n_gpus: int | None = None,
               calibration: Calibration | None = None) -> str:
    """What to change after `cfg` ran out of GPU memory: the planner's prediction for `cfg` and the fastest
    predicted single change, or pair of changes, that fits (on the current CUDA device unless `gpu` is given)."""
    gpu, n_gpus = current_gpu(gpu, n_gpus)
    if gpu is None:
        return "optrush plan: no known CUDA GPU to plan for; run `optrush plan --gpus 1xH100 ...` for advice"
    try:
        return advice(cfg, gpu=gpu, n_gpus=n_gpus,
                      calibration=calibrate(load_measurements()) if calibration is None else calibration)
    except (ValueError, FileNotFoundError) as err:  # printed while handling an OOM: never raise a second error
        return f"optrush plan: no advice, the planner cannot model this config: {err}"


def advice(cfg: Config, *, gpu: GPU, n_gpus: int, calibration: Calibration) -> str:
    args = model_args(cfg.model.preset or cfg.model.path)
    setup = setup_from_config(cfg, n_gpus=n_gpus)
    base = tuple(model_overrides(cfg.model.preset or cfg.model.path))
    now = evaluate(args, setup, gpu=gpu, calibration=calibration)
    options: dict[Setup, str] = {}
    untied = not args.tie_embeddings
    for text, changed in advice_changes(setup, untied=untied):
        options.setdefault(changed, text)
        for text2, changed2 in advice_changes(changed, untied=untied):
            if text2.split("=")[0] not in text:
                options.setdefault(changed2, f"{text} {text2}")
    fitting = [(text, c) for s, text in options.items()
               if (c := evaluate(args, s, gpu=gpu, calibration=calibration)).fits and is_valid(s, base)]
    lines = [(f"optrush plan: this config needs about {now.required_gib:.1f} GiB per GPU "
              f"({now.memory.peak_gib:.1f} GiB allocated at the peak: {format_terms(now.memory)}); "
              f"{gpu.name} has {gpu.memory_gib:.0f} GiB.")]
    if cfg.objective not in ("causal_lm", "sft"):
        lines.append(f"(objective={cfg.objective} is modelled as its policy's language-model step: a reference "
                     "model, paired rows or sampling are not counted, so the real need is higher.)")
    if not fitting:
        lines.append("No single or paired change fits; try `optrush plan --peft lora` (or qlora), more GPUs with "
                     "parallel.strategy=fsdp, or a shorter data.max_length.")
        return "\n".join(lines)
    # fastest (to 1%), then one that keeps the training math, then the leanest
    text, best = max(fitting, key=lambda item: (round(math.log(item[1].speed.tokens_per_s), 2),
                                                not any(k in item[0] for k in ("precision.mode", "optim.name")),
                                                -item[1].memory.peak_bytes))
    lines.append(f"Cheapest change that fits: {text} (predicted {best.required_gib:.1f} GiB, "
                 f"{best.speed.tokens_per_s:,.0f} tokens/s vs {now.speed.tokens_per_s:,.0f}).")
    return "\n".join(lines)


def format_terms(memory: Memory) -> str:
    return ", ".join(f"{name} {value / GIB:.1f}" for name, value in memory.terms.items() if value >= 0.05 * GIB)


def current_gpu(gpu: GPU | None, n_gpus: int | None) -> tuple[GPU | None, int]:
    """The given GPU, else the current CUDA device's table entry (with its actual memory); the GPU count defaults
    to the distributed world size."""
    import os

    n = n_gpus or int(os.environ.get("WORLD_SIZE", "1"))
    if gpu is not None:
        return gpu, n
    import dataclasses

    import torch

    if not torch.cuda.is_available():
        return None, n
    known = gpu_from_device_name(torch.cuda.get_device_name())
    if known is None:
        return None, n
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB
    return dataclasses.replace(known, memory_gib=total), n
