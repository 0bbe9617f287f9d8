"""`optrush data clean`: apply the `data.clean` rules to `data.path` and write the cleaned data plus a report.

    paths = clean_dataset(cfg.data, tokenizer=tok, out_dir="runs/clean")
    # runs/clean/<name>.clean.jsonl, report.md, report.json, token_lengths.png

The report gives the rows in and out per rule, a few dropped examples per rule with the reason, and token-length
statistics and histograms (as `data.format` renders the records) before and after cleaning. Training applies the
same rules (`optrush.data.dataset.build_datasets`), so what the report shows is what `train` sees; data.on_error
too: with `skip`, bad rows go to a rejects file (<out>/<name>.rejects.jsonl unless data.rejects_path is set) and
the report counts them.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from functools import partial
from itertools import islice
from pathlib import Path

import numpy as np

from optrush.atomic import written_whole
from optrush.config.schema import DataConfig
from optrush.data.chat import check_chat_template
from optrush.data.clean import UNRENDERABLE, Cleaner, CleanReport, rules_from_config, token_lengths
from optrush.data.dataset import read_source, render_each, render_record
from optrush.data.formats import single_example_formats_only
from optrush.data.reader import DataError
from optrush.data.recipes import write_jsonl
from optrush.data.sources import Recounted, Rejects


def clean_dataset(cfg: DataConfig, *, tokenizer, out_dir: str | Path, keep_examples: int = 3) -> dict[str, Path]:
    """Clean `cfg.path` with `cfg.clean` and write {"data", "markdown", "json", "histogram"} (and "rejects" when
    data.on_error=skip skipped rows) under `out_dir`. Raises DataError (after writing the report) when the rules
    leave no record. Records are streamed (one pass for the token lengths, one per rule that needs fitting, one that
    writes the kept records): memory holds a token count per record, not the records.

    data.on_error applies as in training: a malformed row, or a kept record that data.format cannot render, raises
    DataError naming file and row, or (skip) is written to data.rejects_path (default: `<out_dir>/<name>.rejects
    .jsonl`) and counted in the report. A record the rules drop needs no rendering, so a null in a
    data.clean.nonempty column is dropped by `empty`, never an error."""
    if cfg.path is None:
        raise DataError("data.path is not set: give the data file to clean, e.g. data.path=train.jsonl")
    if cfg.format == "preference":
        raise DataError(single_example_formats_only(cfg.format))
    if cfg.format == "chat":  # a template the tokenizer cannot encode is the config's fault, not every row's
        check_chat_template(cfg, tokenizer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = Path(cfg.path).stem
    rejects = Rejects(cfg.rejects_path or out / f"{name}.rejects.jsonl") if cfg.on_error == "skip" else None

    def records(sink=Recounted() if rejects is not None else None) -> Iterator[tuple[str, dict]]:
        return read_source(cfg.path, cfg=cfg, rejects=sink)

    stream = (record for _, record in records())
    before = np.asarray([n for chunk in iter(lambda: list(islice(stream, 4096)), [])
                         for n in token_lengths(chunk, cfg=cfg, tokenizer=tokenizer)], dtype=np.int64)
    rules = rules_from_config(cfg, tokenizer)
    cleaner = Cleaner(rules, keep_examples=keep_examples)
    cleaner.fit(lambda: (record for _, record in records()))
    kept_at: list[int] = []
    paths = {"data": out / f"{name}.clean.jsonl", "markdown": out / "report.md",
             "json": out / "report.json", "histogram": out / "token_lengths.png"}

    def written() -> Iterator[dict]:
        for index, (where, record) in cleaner.filter(enumerate(records(rejects)), record=lambda item: item[1][1]):
            if before[index] == UNRENDERABLE and not _renders(where, record, cfg=cfg, tokenizer=tokenizer,
                                                             rejects=rejects):
                continue
            kept_at.append(index)
            yield record

    # written beside its final name and renamed once it holds records, so that a failed clean (a bad row, no
    # record left) leaves no cleaned file that looks complete
    with written_whole(paths["data"]) as pending:
        try:
            write_jsonl(written(), pending)
        finally:
            if rejects is not None:
                rejects.close()
        report = cleaner.report()
        if not report.total:  # no rule dropped anything, and a histogram of nothing says nothing
            raise DataError(no_records_message(cfg.path, rejects))
        unrenderable = report.kept - len(kept_at)  # kept by the rules, then rejected (data.on_error=skip)
        report.kept = len(kept_at)
        after = before[np.asarray(kept_at, dtype=np.int64)]
        before = before[before != UNRENDERABLE]
        summary = {"source": str(cfg.path), "rules": [rule.name for rule in rules], **report.as_dict(),
                   "unrenderable": unrenderable, "rejected": 0 if rejects is None else rejects.count,
                   "rejects_path": None if rejects is None or not rejects.count else str(rejects.path),
                   "reject_messages": [] if rejects is None else rejects.messages,
                   "tokens_before": length_stats(before), "tokens_after": length_stats(after)}
        if summary["rejects_path"]:
            paths["rejects"] = rejects.path
        paths["json"].write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        paths["markdown"].write_text(markdown(summary, report, histogram=paths["histogram"].name))
        plot_histograms(before, after, paths["histogram"])
        if not report.kept:
            skipped = f"; {summary['rejected']} bad rows skipped (data.on_error=skip)" if summary["rejected"] else ""
            raise DataError(f"data.clean dropped every record of {cfg.path}{skipped}:\n{report.format()}\nloosen the "
                            f"data.clean rules that dropped the most (report: {paths['markdown']})")
    return paths


def _renders(where: str, record: dict, *, cfg: DataConfig, tokenizer, rejects: Rejects | None) -> bool:
    """Whether `data.format` renders the record; if not, its error (naming the file and row) is raised or, with
    data.on_error=skip, recorded in `rejects`."""
    wheres, _ = render_each([(where, record)], partial(render_record, cfg=cfg, tokenizer=tokenizer), rejects=rejects)
    return bool(wheres)


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
    if summary["unrenderable"]:
        count = summary["unrenderable"]
        lines.append(f"| rejected: data.format cannot render (data.on_error=skip) | {rows:,} | {count:,} | "
                     f"{rows - count:,} |")
    if summary["rejected"]:
        lines += ["", f"Skipped **{summary['rejected']:,}** bad rows (data.on_error=skip; unreadable rows are not "
                      f"among the {report.total:,} records read), written to `{summary['rejects_path']}`. First: "
                      f"{summary['reject_messages'][0]}"]
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


def no_records_message(path: str, rejects: Rejects | None) -> str:
    """Why a source gave the cleaning rules no record: it holds none, or every row was malformed (skipped)."""
    if rejects is not None and rejects.count:
        return (f"{path} holds no readable record: all {rejects.count} rows are malformed, skipped "
                f"(data.on_error=skip) and written to {rejects.path}; first: {rejects.messages[0]}")
    return f"{path} holds no records: nothing to clean; point data.path at a file with records"


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
