"""`optrush data clean|stats|inspect`: look at and clean a config's training data before training on it.

    optrush data clean CONFIG [key=value ...] [--out DIR]   cleaned JSONL + report.md/json + token_lengths.png
    optrush data stats CONFIG [key=value ...]               padding and batches for every packing strategy
    optrush data inspect CONFIG [key=value ...] [--n 2]     examples with trained vs masked tokens marked
"""
from __future__ import annotations

import argparse
from pathlib import Path

from optrush.cli.args import add_config_arguments, config_from_args
from optrush.config import Config, ConfigError


def _tokenizer(cfg: Config):
    from optrush.data.tokenizer import load_tokenizer

    return load_tokenizer(cfg.data.tokenizer or cfg.model.path)


def cmd_data_clean(args: argparse.Namespace) -> int:
    from optrush.data.clean_report import clean_dataset

    cfg = config_from_args(args)
    out = args.out or str(Path(cfg.output_dir) / "data_clean")
    paths = clean_dataset(cfg.data, tokenizer=_tokenizer(cfg), out_dir=out)
    print(paths["markdown"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_data_stats(args: argparse.Namespace) -> int:
    from optrush.data.dataset import build_datasets
    from optrush.data.examples import lengths_of
    from optrush.data.stats import format_stats, packing_stats

    cfg = config_from_args(args)
    train, _, report = build_datasets(cfg.data, _tokenizer(cfg), seed=cfg.train.seed)
    print(report.format())
    size = (f"data.batch_tokens={cfg.data.batch_tokens}" if cfg.data.batch_tokens
            else f"train.micro_batch_size={cfg.train.micro_batch_size}")
    print(f"packing at data.max_length={cfg.data.max_length}, {size} (configured: data.packing={cfg.data.packing}):")
    print(format_stats(packing_stats(lengths_of(train), rows=cfg.train.micro_batch_size,
                                     max_length=cfg.data.max_length, seed=cfg.train.seed,
                                     batch_tokens=cfg.data.batch_tokens)))
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from rich.console import Console

    from optrush.data.dataset import build_datasets

    if args.n < 1:
        raise ConfigError(f"--n {args.n}: give the number of examples to show, at least 1")
    cfg = config_from_args(args)
    tokenizer = _tokenizer(cfg)
    train, _, _ = build_datasets(cfg.data, tokenizer, seed=cfg.train.seed)
    console = Console(highlight=False)
    marked = not console.is_terminal  # piped or redirected: no colours, so brackets mark the trained text
    if marked:
        console.print(f"{TRAINED_OPEN}...{TRAINED_CLOSE}: trained targets; the rest is masked (no loss)")
    else:
        console.print("[bold green]green: trained targets[/]   [dim]grey: masked (no loss)[/]   "
                      "[reverse] reverse [/]: special tokens")
    for index, example in enumerate(train[:args.n]):
        console.rule(f"example {index} ({len(example)} positions, {example.num_trained} trained)")
        console.print(styled_example(example, tokenizer, marked=marked))
    return 0


TRAINED_OPEN, TRAINED_CLOSE = "[[", "]]"


def styled_example(example, tokenizer, *, marked: bool = False):
    """The example's tokens as rich Text, trained targets green (and with `marked`, for output without colours,
    between TRAINED_OPEN and TRAINED_CLOSE): token k+1 is trained when labels[k] is not ignored (labels are
    shifted), the first token is never a target. A masked last token is not shown: an example keeps it nowhere."""
    from rich.text import Text

    from optrush.data.batch import IGNORE_INDEX

    sequence = example.input_ids + [example.labels[-1] if example.labels[-1] != IGNORE_INDEX else None]
    trained = [False] + [label != IGNORE_INDEX for label in example.labels]
    special = set(tokenizer.all_special_ids)
    text, in_run = Text(), False
    for token, is_trained in zip(sequence, trained):
        if token is None:
            continue
        if marked and is_trained != in_run:
            text.append(TRAINED_OPEN if is_trained else TRAINED_CLOSE)
            in_run = is_trained
        piece = tokenizer.decode([token])
        style = "bold green" if is_trained else "dim"
        text.append(piece, style=style + (" reverse" if token in special else ""))
    if in_run:
        text.append(TRAINED_CLOSE)
    return text


def add_commands(commands) -> None:
    data = commands.add_parser("data", help="clean, measure and inspect a config's training data")
    sub = data.add_subparsers(dest="data_command", required=True)
    p = sub.add_parser("clean", help="apply data.clean.* and write the cleaned data and a report")
    add_config_arguments(p)
    p.add_argument("--out", default=None, help="output directory (default: <output_dir>/data_clean)")
    p.set_defaults(run=cmd_data_clean)
    p = sub.add_parser("stats", help="padding fraction, tokens per batch, batches for every packing strategy")
    add_config_arguments(p)
    p.set_defaults(run=cmd_data_stats)
    p = sub.add_parser("inspect", help="show examples with trained and masked tokens marked")
    add_config_arguments(p)
    p.add_argument("--n", type=int, default=2, help="examples to show (default: 2)")
    p.set_defaults(run=cmd_data_inspect)
