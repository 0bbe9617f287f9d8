"""`optrush data clean`: apply the `data.clean` rules to `data.path` and write the cleaned data plus a report.

    paths = clean_dataset(cfg.data, tokenizer=tok, out_dir="runs/clean")
    # runs/clean/<name>.clean.jsonl, report.md, report.json, token_lengths.png

The report gives the rows in and out per rule, a few dropped examples per rule with the reason, and token-length
statistics and histograms (as `data.format` renders the records) before and after cleaning. Training applies the
same rules (`optrush.data.dataset.build_datasets`), so what the report shows is what `train` sees.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import islice
from operator import itemgetter
from pathlib import Path

import numpy as np

from optrush.config.schema import DataConfig
from optrush.data.clean import Cleaner, CleanReport, rules_from_config, token_lengths
from optrush.data.reader import DataError
from optrush.data.sources import decode_json_columns, iter_records
from optrush.data.recipes import write_jsonl


def clean_dataset(cfg: DataConfig, *, tokenizer, out_dir: str | Path, keep_examples: int = 3) -> dict[str, Path]:
    """Clean `cfg.path` with `cfg.clean` and write {"data", "markdown", "json", "histogram"} under `out_dir`.
    Raises DataError (after writing the report) when the rules leave no record. Records are streamed (one pass
    for the token lengths, one per rule that needs fitting, one that writes the kept records): memory holds a
    token count per record, not the records."""
    if cfg.path is None:
        raise DataError("data.path is not set: give the data file to clean, e.g. data.path=train.jsonl")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def records() -> Iterator[dict]:
        return (record for _, record in decode_json_columns(iter_records(cfg.path), cfg.json_columns))

    stream = records()
    before = np.asarray([n for chunk in iter(lambda: list(islice(stream, 4096)), [])
                         for n in token_lengths(chunk, cfg=cfg, tokenizer=tokenizer)], dtype=np.int64)
    rules = rules_from_config(cfg, tokenizer)
    cleaner = Cleaner(rules, keep_examples=keep_examples)
    cleaner.fit(records)
    kept_at: list[int] = []
    paths = {"data": out / f"{Path(cfg.path).stem}.clean.jsonl", "markdown": out / "report.md",
             "json": out / "report.json", "histogram": out / "token_lengths.png"}
    kept = cleaner.filter(enumerate(records()), record=itemgetter(1))
    write_jsonl((kept_at.append(index) or record for index, record in kept), paths["data"])
    report = cleaner.report()
    after = before[np.asarray(kept_at, dtype=np.int64)]
    summary = {"source": str(cfg.path), "rules": [rule.name for rule in rules], **report.as_dict(),
               "tokens_before": length_stats(before), "tokens_after": length_stats(after)}
    paths["json"].write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    paths["markdown"].write_text(markdown(summary, report, histogram=paths["histogram"].name))
    plot_histograms(before, after, paths["histogram"])
    if not report.kept:
        raise DataError(f"data.clean dropped every record of {cfg.path}:\n{report.format()}\nloosen the data.clean "
                        f"rules that dropped the most (report: {paths['markdown']})")
    return paths


def length_stats(lengths: np.ndarray) -> dict:
    if not len(lengths):
        return {"count": 0}
    a = np.asarray(lengths)
    return {"count": len(a), "mean": round(float(a.mean()), 1), "p50": int(np.percentile(a, 50)),
            "p90": int(np.percentile(a, 90)), "p99": int(np.percentile(a, 99)), "max": int(a.max()),
            "total": int(a.sum())}


def markdown(summary: dict, report: CleanReport, *, histogram: str) -> str:
    lines = [f"# Cleaning report: {summary['source']}", "",
             f"Kept **{report.kept:,}** of {report.total:,} records ({report.total - report.kept:,} dropped).", "",
             "| rule | rows in | dropped | rows out |", "|---|---:|---:|---:|"]
    rows = report.total
    for name, count in report.dropped.items():
        lines.append(f"| `{name}` | {rows:,} | {count:,} | {rows - count:,} |")
        rows -= count
    lines += ["", "## Token lengths", "", "| | records | mean | p50 | p90 | p99 | max | tokens |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for when in ("before", "after"):
        s = summary[f"tokens_{when}"]
        if s["count"]:
            lines.append(f"| {when} | {s['count']:,} | {s['mean']} | {s['p50']} | {s['p90']} | {s['p99']} | "
                         f"{s['max']} | {s['total']:,} |")
    lines += ["", f"![token lengths before and after cleaning]({histogram})", "", "## Dropped examples", ""]
    for name, shown in report.examples.items():
        lines.append(f"- `{name}`: " + ("none" if not shown else ""))
        lines += [f"  - {example}" for example in shown]
    return "\n".join(lines) + "\n"


def plot_histograms(before: np.ndarray, after: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    top = int(before.max()) if len(before) else 1
    bins = np.linspace(0, top, 60)
    ax.hist(before, bins=bins, alpha=0.5, label=f"before ({len(before):,})")
    ax.hist(after, bins=bins, alpha=0.5, label=f"after ({len(after):,})")
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("records")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
