"""`optrush plan`: the fastest training configurations that fit a model on given GPUs, as a ready config file.

    optrush plan --model llama3.1-8b --gpus 1xH100 --seq 4096 --objective sft --peft lora --out plan.yaml
    optrush plan --model /models/Llama-3.2-1B --gpus 2xH200 --seq 8192 --measure

Prints a table of the candidates that fit (predicted peak memory per GPU and tokens/s, fastest first), writes the
best as YAML with `--out` (loaded back through `optrush.config.load_config`, so it validates), and with `--measure`
runs the top candidates briefly on this machine's device and prints predicted vs measured.
"""
from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path

from optrush.config import ConfigError, DataConfig, OptimConfig, load_config

TABLE_COLUMNS = ("#", "precision", "peft", "compile", "attention", "fused loss", "checkpointing", "micro-batch",
                 "parallel", "peak GiB", "needs GiB", "tokens/s", "MFU", "speed basis")


def cmd_plan(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    from optrush.plan.gpus import parse_gpus
    from optrush.plan.search import check_pins, config_yaml, extend_context, model_args, plan
    from optrush.plan.speed import calibrate, extrapolation_warning, load_measurements

    check_numbers(args)
    check_pins(tuple(args.pin))
    try:
        gpu, n_gpus = parse_gpus(args.gpus)
        shape = model_args(args.model)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None
    if args.measure and n_gpus > 1:
        raise ConfigError("--measure runs candidates in this one process, on one device: plan for --gpus 1x... "
                          "or measure a multi-GPU config with `optrush bench CONFIG` under torchrun")
    if args.measure and args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--measure runs the candidates on --device cuda, but no CUDA device is visible: run it "
                          "on the GPU machine, or plan without --measure (--device cpu measures on this CPU)")
    native_length = shape.max_seq_len
    shape, extension = extend_context(shape, args.seq)
    base = base_overrides(args) + extension
    calibration = calibrate(load_measurements())
    candidates = plan(shape, gpu=gpu, n_gpus=n_gpus, seq_len=args.seq, peft=args.peft, optimizer=args.optim,
                      micro_batch=args.micro_batch, base_overrides=tuple(base), pins=tuple(args.pin),
                      margin=args.margin, calibration=calibration, document_mask=args.packing == "bfd")
    fitting = [c for c in candidates if c.fits]
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)  # full rows in logs
    console.print(f"{args.model} on {n_gpus}x{gpu.name} ({gpu.memory_gib:.0f} GiB each), {args.seq} tokens per row: "
                  f"{len(fitting)} of {len(candidates)} valid configurations fit (margin {args.margin:.0%})")
    shown = fitting[:args.top] if fitting else sorted(candidates, key=lambda c: c.required_gib)[:args.top]
    if not fitting:
        console.print("[bold red]nothing fits[/]: the least memory-hungry configurations are:")
    console.print(candidate_table(shown))
    if extension:
        console.print(f"[yellow]note[/]: rows of {args.seq} tokens are longer than the model's {native_length}: the "
                      f"configurations set model.max_seq_len={args.seq} (positions past {native_length} are "
                      "extrapolated unless you also set model.rope_scaling)")
    if args.packing != "bfd":
        console.print(f"[yellow]note[/]: tokens/s are for full rows of {args.seq} tokens; documents shorter than that "
                      f"leave padding in unpacked ({args.packing}) batches, which runs far slower (a real SFT length "
                      "mix on the 1B shape: 9,326 non-padding tokens/s padded against 60,132 packed, "
                      "benchmarks/results/length_mix_h100.md): --packing bfd packs them")
    if warning := extrapolation_warning(calibration, shape):
        console.print(f"[yellow]note[/]: {warning}")
    if fitting and args.out:
        # pins of keys the planner does not choose (train.lr=...) belong to the config too
        text = config_yaml(fitting[0], base_overrides=[*base, *args.pin], gpu=gpu, n_gpus=n_gpus, path=args.out)
        Path(args.out).write_text(text, encoding="utf-8")
        needs_tokenizer = base[0].startswith("model.preset=") and args.tokenizer is None
        load_config(args.out, synthetic_data=needs_tokenizer)  # fails here, not at train time, if it is invalid
        console.print(f"wrote the fastest configuration to {args.out}"
                      + (" (set data.tokenizer before training: a preset has none)" if needs_tokenizer else ""))
    if args.measure and fitting:
        from optrush.plan.measure import comparison_table, measure

        rows = measure(fitting[:args.measure_top], base_overrides=base, device=args.device, warmup=args.warmup,
                       steps=args.steps)
        console.print(comparison_table(rows))
        if args.measure_json:
            Path(args.measure_json).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
        if all("error" in row for row in rows):
            return 1
    return 0 if fitting else 1


def check_numbers(args: argparse.Namespace) -> None:
    """Counts and fractions out of range would otherwise leave no candidate, or rows of nonsense."""
    if args.seq < 1:
        raise ConfigError(f"--seq {args.seq}: give the tokens per row (data.max_length), at least 1")
    if args.micro_batch is not None and args.micro_batch < 1:
        raise ConfigError(f"--micro-batch {args.micro_batch}: give at least 1 row, or leave it out to search 1..64")
    if not 0 <= args.margin < 1:
        raise ConfigError(f"--margin {args.margin}: give the fraction of GPU memory kept free, in [0, 1)")
    if args.top < 1 or args.measure_top < 1:
        raise ConfigError(f"--top {args.top}, --measure-top {args.measure_top}: give at least 1 row")


def base_overrides(args: argparse.Namespace) -> list[str]:
    """Model, objective and data keys every candidate's config carries."""
    from optrush.plan.search import model_overrides

    out = [*model_overrides(args.model), f"objective={args.objective}", f"data.packing={args.packing}"]
    if args.objective == "sft":
        out.append("data.format=prompt_completion")
    out += [f"data.path={args.data}"] if args.data else []
    out += [f"data.tokenizer={args.tokenizer}"] if args.tokenizer else []
    return out


def candidate_table(candidates):
    from rich.table import Table

    table = Table()
    for column in TABLE_COLUMNS:
        table.add_column(column, justify="right" if column in ("peak GiB", "needs GiB", "tokens/s", "MFU") else "left")
    for rank, c in enumerate(candidates, 1):
        s = c.setup
        policy = "none" if s.checkpointing == "none" else s.checkpointing + (f" every {s.every}" if s.every > 1 else "")
        peft = s.peft + (f"+{s.quantize}" if s.quantize != "none" else "") + (
            ", embedding on host" if s.embedding_on_host else "")
        table.add_row(str(rank), s.precision, peft, s.compile, s.attention, "yes" if s.fused_loss else "no",
                      policy + (" + offload" if s.offload else "")
                      + (f", last {s.skip_last} kept" if s.skip_last else "")
                      + (f", MLP chunks {s.mlp_chunk_tokens}" if s.mlp_chunk_tokens else ""),
                      str(s.micro_batch),
                      s.strategy if s.strategy != "none" else "-", f"{c.memory.peak_gib:.1f}", f"{c.required_gib:.1f}",
                      f"{c.speed.tokens_per_s:,.0f}", f"{c.speed.mfu:.2f}", c.speed.basis)
    return table


def add_commands(commands) -> None:
    p = commands.add_parser("plan", help="the fastest training configurations that fit, as a ready config file")
    p.add_argument("--model", required=True, help="a preset name (e.g. llama3.1-8b) or an HF model directory")
    p.add_argument("--gpus", default="1xH100", help="COUNTxNAME, e.g. 1xH100, 2xH200, 1x4090 (default: 1xH100)")
    p.add_argument("--seq", type=int, default=2048, help="tokens per row, data.max_length (default: 2048)")
    p.add_argument("--objective", choices=("sft", "causal_lm"), default="sft")
    p.add_argument("--peft", choices=("none", "lora", "qlora", "any"), default="none",
                   help="none: full fine-tuning; lora / qlora: adapters only; any: all three (default: none)")
    p.add_argument("--optim", default="adamw", choices=typing.get_args(typing.get_type_hints(OptimConfig)["name"]),
                   help="optim.name (default: adamw)")
    p.add_argument("--micro-batch", type=int, default=None, help="rows per micro-batch (default: search 1..64)")
    p.add_argument("--packing", choices=typing.get_args(typing.get_type_hints(DataConfig)["packing"]), default="bfd",
                   help="data.packing: bfd packs documents into rows, whose attention then needs document masks "
                        "(varlen is searched); none / sorted keep one document a row, where sdpa's causal "
                        "kernel ran 1.05x (2k) to 1.37x (131k) varlen's speed (default: bfd)")
    p.add_argument("--pin", nargs="*", default=[], metavar="KEY=VALUE",
                   help="keep only candidates with these config values, e.g. compile.mode=none")
    p.add_argument("--margin", type=float, default=0.05, help="GPU memory kept free (fraction, default 0.05)")
    p.add_argument("--top", type=int, default=10, help="rows to show (default: 10)")
    p.add_argument("--out", default=None, help="write the fastest fitting configuration to this YAML file")
    p.add_argument("--data", default=None, help="data.path to put in the written config")
    p.add_argument("--tokenizer", default=None, help="data.tokenizer to put in the written config")
    p.add_argument("--measure", action="store_true", help="run the top candidates briefly and compare")
    p.add_argument("--measure-top", type=int, default=3, help="candidates to measure (default: 3)")
    p.add_argument("--measure-json", default=None, help="also write the comparison rows to this JSON file")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="where --measure runs (default: cuda)")
    p.add_argument("--warmup", type=int, default=2, help="--measure: untimed steps (default: 2)")
    p.add_argument("--steps", type=int, default=4, help="--measure: timed steps (default: 4)")
    p.set_defaults(run=cmd_plan)
