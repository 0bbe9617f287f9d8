"""`optrush bench`: time a config, or a ladder of configs side by side with peer stacks.

    optrush bench CONFIG [key=value ...] [--synthetic] [--warmup N] [--steps M]
        one config in this process: <output_dir>/bench.json and bench.md
    optrush bench CONFIG [key=value ...] --ladder default|FILE [--peers [NAMES]] [--out DIR] [--repeats R] [--resume]
        every rung (and peer) in its own process: <out>/ladder.json, ladder.md, ladder_*.png
    optrush bench CONFIG [key=value ...] --peers
        the config as the only rung, against the peers
    optrush bench CONFIG [key=value ...] --max-context [LIMIT]
        the largest data.max_length that trains: <out>/max_context.json and .md (optrush.bench.max_context)
"""
from __future__ import annotations

import argparse
from pathlib import Path

from optrush.cli.args import add_config_arguments, config_and_overrides, config_from_args
from optrush.config import ConfigError


def cmd_bench(args: argparse.Namespace) -> int:
    check_step_counts(args)
    if args.json_out:
        return bench_child(args)
    if args.ladder or args.peers:
        return bench_ladder(args)
    if args.max_context is not None:
        return bench_max_context(args)
    from optrush.bench.run import bench, markdown_table, write_report

    cfg = config_from_args(args, synthetic_data=args.synthetic)
    result = bench(cfg, synthetic=args.synthetic, warmup=args.warmup, steps=args.steps, name=run_name(args))
    json_path, md_path = write_report([result], cfg.output_dir)
    print(markdown_table([result]))
    print(f"wrote {json_path} and {md_path}")
    return 0


def check_step_counts(args: argparse.Namespace) -> None:
    """--warmup, --steps and --repeats are checked before any config loads. A ladder compares processes that each
    compile on their first step, so it needs a warm-up step to keep compilation out of the timings."""
    fewest_warmup = 1 if args.ladder or args.peers else 0
    if args.warmup < fewest_warmup:
        raise ConfigError(f"--warmup {args.warmup}: " + (
            "--ladder and --peers need at least 1 warm-up step (each rung's process compiles on its first step); "
            "use --warmup 1 or more" if fewest_warmup else "use 0 (time every step) or more"))
    for flag, value in (("--steps", args.steps), ("--repeats", args.repeats)):
        if value < 1:
            raise ConfigError(f"{flag} {value}: use 1 or more")


def bench_ladder(args: argparse.Namespace) -> int:
    from optrush.bench.ladder import Ladder, Rung, load_ladder, run_ladder
    from optrush.bench.peers import FULL_FINETUNE_PEERS
    from optrush.bench.report import write_ladder_report
    from optrush.bench.run import check_objective

    config_path, overrides = config_and_overrides(args)
    cfg = config_from_args(args, synthetic_data=args.synthetic)  # a bad base config stops here, before any process
    check_objective(cfg)
    if args.peers and cfg.objective not in ("causal_lm", "sft"):
        raise ConfigError(f"--peers with objective={cfg.objective}: the peer stacks (HF Trainer, TRL SFTTrainer) "
                          "train language modelling only, so they would time other work; drop --peers (the ladder's "
                          "rungs measure this objective), or compare peers with objective=sft")
    name = run_name(args)
    ladder = load_ladder(args.ladder) if args.ladder else Ladder(rungs=(Rung(name, ()),), reference=name)
    peers = [] if not args.peers else list(FULL_FINETUNE_PEERS) if args.peers == "all" else args.peers.split(",")
    out = Path(args.out or cfg.output_dir)
    record = run_ladder(config_path, overrides, ladder=ladder, synthetic=args.synthetic, warmup=args.warmup,
                        steps=args.steps, out_dir=out, peers=peers, repeats=args.repeats, resume=args.resume)
    paths = write_ladder_report(record, out)
    print(paths["markdown"].read_text(encoding="utf-8"))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def bench_max_context(args: argparse.Namespace) -> int:
    from optrush.bench.max_context import find_max_context, markdown, write_max_context_report
    from optrush.bench.run import check_objective

    cfg = config_from_args(args, synthetic_data=True)
    check_objective(cfg)
    if args.max_context < cfg.data.max_length:
        raise ConfigError(f"--max-context {args.max_context}: the search starts at data.max_length="
                          f"{cfg.data.max_length} and doubles up to LIMIT; give a LIMIT of at least that, or a "
                          "smaller data.max_length")
    result = find_max_context(cfg, start=cfg.data.max_length, limit=args.max_context, warmup=args.warmup,
                              steps=args.steps)
    paths = write_max_context_report(result, args.out or cfg.output_dir)
    print(markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def bench_child(args: argparse.Namespace) -> int:
    """One measurement written as JSON to --json-out, a failure included: what each ladder rung runs."""
    from optrush.bench.ladder import measure_rung, write_child_result

    result = measure_rung(*config_and_overrides(args), name=run_name(args), synthetic=args.synthetic,
                          warmup=args.warmup, steps=args.steps)
    write_child_result(result, args.json_out)
    return 0 if result["status"] == "ok" else 1


def run_name(args: argparse.Namespace) -> str:
    config_path, _ = config_and_overrides(args)
    return args.name or (Path(config_path).stem if config_path else "config")


def add_commands(commands) -> None:
    p = add_config_arguments(commands.add_parser(
        "bench", help="time training steps of a config or a ladder of them: tokens/s, MFU, peak memory, loss"))
    p.add_argument("--synthetic", action="store_true",
                   help="random full rows of data.max_length tokens instead of the config's data (no data needed)")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed steps first; the first compiles (default: 3; 0 times every step, compilation "
                        "included; --ladder and --peers need at least 1)")
    p.add_argument("--steps", type=int, default=8, help="timed steps (default: 8)")
    p.add_argument("--ladder", default=None, metavar="default|FILE",
                   help="run the built-in optimization ladder or one from a YAML file, each rung in its own process")
    p.add_argument("--peers", nargs="?", const="all", default=None, metavar="NAMES",
                   help="also run peer stacks on the same model and data: all (the first four), or a "
                        "comma-separated list of hf_default, hf_compile, hf_liger, trl_sft_packed, hf_peft_qlora "
                        "(not installed: skipped)")
    p.add_argument("--out", default=None, help="ladder output directory (default: the config's output_dir)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each rung and peer; the median is shown")
    p.add_argument("--resume", action="store_true",
                   help="ladder: keep the rungs and peers an earlier run into --out finished (<out>/finished.jsonl)")
    p.add_argument("--name", default=None, help="name of the config in the report (default: the file's stem)")
    p.add_argument("--max-context", nargs="?", type=int, const=1_048_576, default=None, metavar="LIMIT",
                   help="search the largest data.max_length that trains (batch 1, synthetic, each try in its own "
                        "process), doubling from data.max_length up to LIMIT (default 1048576), then bisecting")
    p.add_argument("--json-out", default=None, metavar="FILE",
                   help="measure the config and write its result (or why it failed) as JSON to FILE; exit 1 if "
                        "it did not run (what each ladder rung's process does)")
    p.set_defaults(run=cmd_bench)
