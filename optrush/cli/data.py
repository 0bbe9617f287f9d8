"""`optrush data clean|stats|inspect`: look at and clean a config's training data before training on it.

    optrush data clean CONFIG [key=value ...] [--out DIR]   cleaned JSONL + report.md/json + token_lengths.png
    optrush data stats CONFIG [key=value ...]               padding and batches for every packing strategy
    optrush data inspect CONFIG [key=value ...] [--n 2]     examples with trained vs masked tokens marked

Preference data (objective=reward or dpo) is read as training reads it, as pairs (`optrush.data.preference`):
stats plans pair batches as `PairLoader` does, inspect shows each pair's prompt once and both completions.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from optrush.cli.args import add_config_arguments, config_from_args
from optrush.config import Config, ConfigError


def _tokenizer(cfg: Config):
    from optrush.data.tokenizer import load_config_tokenizer

    return load_config_tokenizer(cfg)


def cmd_data_clean(args: argparse.Namespace) -> int:
    from optrush.data.clean_report import clean_dataset

    cfg = config_from_args(args)
    out = args.out or str(Path(cfg.output_dir) / "data_clean")
    paths = clean_dataset(cfg.data, tokenizer=_tokenizer(cfg), out_dir=out)
    print(paths["markdown"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def pairwise(cfg: Config) -> bool:
    """Whether training reads the data as preference pairs (as `optrush.train.loop` decides)."""
    from optrush.objectives import PAIRWISE

    return cfg.objective in PAIRWISE


def cmd_data_stats(args: argparse.Namespace) -> int:
    from optrush.data.stats import format_stats, packing_stats

    cfg = config_from_args(args)
    lengths, unit, layout = pair_stats_input(cfg) if pairwise(cfg) else example_stats_input(cfg)
    size = (f"data.batch_tokens={cfg.data.batch_tokens}" if cfg.data.batch_tokens
            else f"train.micro_batch_size={cfg.train.micro_batch_size}")
    print(f"packing {unit} at data.max_length={cfg.data.max_length}, {size} (configured: "
          f"data.packing={cfg.data.packing}{layout}):")
    print(format_stats(packing_stats(lengths, rows=cfg.train.micro_batch_size, max_length=cfg.data.max_length,
                                     seed=cfg.train.seed, batch_tokens=cfg.data.batch_tokens), unit=unit))
    return 0


def example_stats_input(cfg: Config) -> tuple:
    """(lengths the loader plans by, unit, layout note) of the training examples; prints the data report."""
    from optrush.data.dataset import build_datasets
    from optrush.data.examples import lengths_of

    train, _, report = build_datasets(cfg.data, _tokenizer(cfg), seed=cfg.train.seed)
    print(report.format())
    return lengths_of(train), "examples", ""


def pair_stats_input(cfg: Config) -> tuple:
    """(lengths `PairLoader` plans by, unit, layout note) of the training pairs; prints the data report. All three
    data.packing strategies plan pairs (a pair is never split)."""
    from optrush.data.preference import build_preference_datasets, pair_layout, pair_lengths

    train, _, report = build_preference_datasets(cfg.data, _tokenizer(cfg), seed=cfg.train.seed)
    print(report.format())
    shared = str(cfg.data.shared_prompt).lower()
    layout = f"; data.shared_prompt={shared}: a pair is {pair_layout(cfg.data)}, never split"
    return pair_lengths(train, shared_prompt=cfg.data.shared_prompt), "pairs", layout


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from rich.console import Console

    if args.n < 1:
        raise ConfigError(f"--n {args.n}: give the number of examples to show, at least 1")
    cfg = config_from_args(args)
    tokenizer = _tokenizer(cfg)
    console = Console(highlight=False)
    marked = not console.is_terminal  # piped or redirected: no colours, so brackets mark the trained text
    if marked:
        console.print(f"{TRAINED_OPEN}...{TRAINED_CLOSE}: trained targets; the rest is masked (no loss)")
    else:
        console.print("[bold green]green: trained targets[/]   [dim]grey: masked (no loss)[/]   "
                      "[reverse] reverse [/]: special tokens")
    if pairwise(cfg):
        show_pairs(console, cfg, tokenizer, n=args.n, marked=marked)
    else:
        show_examples(console, cfg, tokenizer, n=args.n, marked=marked)
    return 0


def show_examples(console, cfg: Config, tokenizer, *, n: int, marked: bool) -> None:
    from optrush.data.dataset import build_datasets

    train, _, _ = build_datasets(cfg.data, tokenizer, seed=cfg.train.seed)
    for index, example in enumerate(train[:n]):
        console.rule(f"example {index} ({len(example)} positions, {example.num_trained} trained)")
        console.print(styled_example(example, tokenizer, marked=marked))


def show_pairs(console, cfg: Config, tokenizer, *, n: int, marked: bool) -> None:
    from optrush.data.preference import build_preference_datasets

    train, _, _ = build_preference_datasets(cfg.data, tokenizer, seed=cfg.train.seed)
    for index, pair in enumerate(train[:n]):
        console.rule(f"pair {index} (positions/trained: chosen {len(pair.chosen)}/{pair.chosen.num_trained}, "
                     f"rejected {len(pair.rejected)}/{pair.rejected.num_trained})")
        for name, text in styled_pair(pair, tokenizer, marked=marked):
            console.print(f"{name}:", style="bold")
            console.print(text)


TRAINED_OPEN, TRAINED_CLOSE = "[[", "]]"


def styled_example(example, tokenizer, *, marked: bool = False):
    """The example's tokens as rich Text, trained targets green (and with `marked`, for output without colours,
    between TRAINED_OPEN and TRAINED_CLOSE): see `shown_tokens`."""
    return styled_tokens(shown_tokens(example), tokenizer, marked=marked)


def styled_pair(pair, tokenizer, *, marked: bool = False):
    """[("prompt", Text), ("chosen", Text), ("rejected", Text)]: the leading tokens both sides share, masked in
    both (BOS and the prompt), once, then each side's own tokens, marked as `styled_example` marks them."""
    chosen, rejected = shown_tokens(pair.chosen), shown_tokens(pair.rejected)
    shared = 0
    for chosen_token, rejected_token in zip(chosen, rejected):
        if chosen_token != rejected_token or chosen_token[1]:  # the sides part here, or a target starts
            break
        shared += 1
    return [(name, styled_tokens(tokens, tokenizer, marked=marked))
            for name, tokens in (("prompt", chosen[:shared]), ("chosen", chosen[shared:]),
                                 ("rejected", rejected[shared:]))]


def shown_tokens(example) -> list[tuple[int, bool]]:
    """(token, trained) for each token of the example: token k+1 is trained when labels[k] is not ignored (labels
    are shifted), the first token is never a target. A masked last token is not shown: an example keeps it
    nowhere."""
    from optrush.data.batch import IGNORE_INDEX

    labels = example.labels
    tokens = list(zip(example.input_ids, [False] + [label != IGNORE_INDEX for label in labels[:-1]]))
    return tokens + ([(labels[-1], True)] if labels and labels[-1] != IGNORE_INDEX else [])


def styled_tokens(tokens: list[tuple[int, bool]], tokenizer, *, marked: bool):
    """(token, trained) items as rich Text: trained tokens bold green, the rest dim, special tokens reversed;
    `marked` also brackets each run of trained tokens."""
    from rich.text import Text

    special = set(tokenizer.all_special_ids)
    text, in_run = Text(), False
    for token, is_trained in tokens:
        if marked and is_trained != in_run:
            text.append(TRAINED_OPEN if is_trained else TRAINED_CLOSE)
            in_run = is_trained
        style = "bold green" if is_trained else "dim"
        text.append(tokenizer.decode([token]), style=style + (" reverse" if token in special else ""))
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
    p = sub.add_parser("inspect", help="show examples (or preference pairs) with trained and masked tokens marked")
    add_config_arguments(p)
    p.add_argument("--n", type=int, default=2, help="examples to show (default: 2)")
    p.set_defaults(run=cmd_data_inspect)
