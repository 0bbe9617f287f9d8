"""Issue #4 data-pipeline benchmark on the synthetic recipe corpus, on CPU (the machine that prepares the data).

    nice -n 19 python benchmarks/data_pipeline.py --records 2000000 --name data_pipeline_2m
    python benchmarks/data_pipeline.py --smoke        # 3,000 records, a few seconds; writes nothing

Stages, each timed once on the same corpus (`optrush.data.recipes.generate_recipes`, lognormal lengths, with
`--bad-rates recipenlg` by default: more than half the records deliberately bad, as in the issue's reference job):
1. clean (fit): the `data.clean` rules below (empty columns, exact and MinHash near-duplicates, ingredient-count
   bounds, rare-ingredient rule) fitted by `optrush.data.clean.Cleaner` in streamed passes over the JSONL, one per
   rule that needs corpus statistics; records/s over all passes.
2. filter + tokenize: the last cleaning pass streams the kept records into tokenization (`data.format=recipe`,
   `data.num_proc` processes with bounded in-flight chunks, a byte-level BPE trained on a sample of the corpus),
   exactly as `build_datasets` does; records/s and tokens/s. Examples land in flat int32 arrays
   (`optrush.data.examples.Examples`); bytes per token is measured for them and, on a sample, for the former
   layout (two Python lists of ints per example, measured with tracemalloc).
3. packing: padding fraction, tokens per micro-batch and micro-batch count per `data.packing` strategy at
   `data.max_length=2048`, 8 rows per micro-batch (`optrush.data.stats.packing_stats`).
4. loader: `BatchLoader(strategy=bfd)` micro-batches/s on one core (planning the epoch timed separately),
   compared with what a GPU consumes at `--gpu-tokens-per-s` (the training speed target): ratio >= 10 passes.
Peak RSS is read after each stage (it is the process peak so far; tokenizer worker processes are not included,
their own peak is reported apart). Writes <name>.json and <name>.md under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
import tracemalloc
from itertools import islice
from operator import itemgetter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from optrush.config.schema import DataCleanConfig, DataConfig  # noqa: E402
from optrush.data.clean import Cleaner, rules_from_config  # noqa: E402
from optrush.data.dataset import Tally, encode_parallel, encode_records, read_source  # noqa: E402
from optrush.data.examples import Examples  # noqa: E402
from optrush.data.loader import BatchLoader  # noqa: E402
from optrush.data.recipes import (BAD_RECORD_RATES, RECIPENLG_BAD_RATES, generate_recipes,  # noqa: E402
                                  recipe_completion, recipe_prompt, write_jsonl)
from optrush.data.sources import iter_records  # noqa: E402
from optrush.data.stats import packing_stats  # noqa: E402
from optrush.data.tokenizer import train_tokenizer  # noqa: E402

BAD_RATES = {"default": BAD_RECORD_RATES, "recipenlg": RECIPENLG_BAD_RATES}
CLEAN = DataCleanConfig(nonempty=["title", "ingredients", "directions"], dedup=True, near_dedup=True,
                        min_items=2, max_items=40, max_chars=12_000, rare_field="NER", rare_min_count=2)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def children_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def list_bytes_per_token(examples: Examples, *, sample: int = 20_000) -> float:
    """Bytes per token of the former layout (an object holding two Python lists of ints per example) on a
    sample of `examples`, measured with tracemalloc."""
    part = examples[:sample]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    held = [(example.input_ids, example.labels) for example in part]
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    del held
    return used / max(part.num_tokens, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=2_000_000)
    ap.add_argument("--bad-rates", choices=sorted(BAD_RATES), default="recipenlg",
                    help="share of deliberately bad records: recipenlg (55%%, the issue's reference job) or "
                         "default (1.6%%, the demo corpus)")
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--loader-batches", type=int, default=300)
    ap.add_argument("--gpu-tokens-per-s", type=float, default=50_000)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--name", default="data_pipeline", help="file name stem of the results")
    ap.add_argument("--note", default="", help="a remark printed with the results (e.g. the machine's load)")
    ap.add_argument("--smoke", action="store_true", help="3,000 records, 20 loader batches, nothing written")
    args = ap.parse_args()
    if args.smoke:
        args.records, args.loader_batches = 3_000, 20
    work = Path(tempfile.mkdtemp(prefix="optrush-data-bench-"))
    result: dict = {"records": args.records, "bad_rates": args.bad_rates, "num_proc": args.num_proc,
                    "max_length": args.max_length, "rows": args.rows, "note": args.note,
                    "clean": {k: getattr(CLEAN, k) for k in CLEAN.__slots__}, "repeats": 1,
                    "load_average_start": os.getloadavg()}

    t = time.perf_counter()
    data = work / "recipes.jsonl"
    write_jsonl(generate_recipes(args.records, seed=0, bad_rates=BAD_RATES[args.bad_rates]), data)
    result["generate_s"] = round(time.perf_counter() - t, 1)
    result["file_mb"] = round(data.stat().st_size / 2**20, 1)
    print(f"generated {args.records:,} records ({result['file_mb']} MB) in {result['generate_s']} s", flush=True)

    t = time.perf_counter()
    tok_dir = work / "tok"
    sample = islice(iter_records(data), 20_000)
    tokenizer = train_tokenizer((recipe_prompt(r) + recipe_completion(r) for _, r in sample if r["title"]),
                                vocab_size=8192, out_dir=tok_dir)
    result["tokenizer"] = {"vocab": len(tokenizer), "trained_on": 20_000, "train_s": round(time.perf_counter() - t, 1)}

    cfg = DataConfig(path=str(data), format="recipe", max_length=args.max_length, too_long="truncate",
                     num_proc=args.num_proc, clean=CLEAN)
    rules = rules_from_config(cfg, tokenizer)
    cleaner = Cleaner(rules)
    t = time.perf_counter()
    cleaner.fit(lambda: map(itemgetter(1), read_source(data, cfg=cfg, rejects=None)))
    fit_s = time.perf_counter() - t
    passes = sum(rule.needs_fit for rule in rules)
    result["clean_fit"] = {"seconds": round(fit_s, 1), "passes": passes,
                           "records_per_s": round(args.records * passes / fit_s),
                           "peak_rss_mb": round(peak_rss_mb())}
    print(f"clean (fit, {passes} passes): {fit_s:.1f} s", flush=True)

    t = time.perf_counter()
    tally = Tally(path=str(data))
    kept = cleaner.filter(read_source(data, cfg=cfg, rejects=None), record=itemgetter(1))
    if args.num_proc > 1:
        examples = encode_parallel(kept, cfg=cfg, tokenizer=tokenizer, tally=tally, rejects=None)
    else:
        examples = Examples.from_examples(encode_records(kept, cfg=cfg, tokenizer=tokenizer, tally=tally))
    tok_s = time.perf_counter() - t
    report = cleaner.report()
    tokens = examples.num_tokens
    result["filter_tokenize"] = {
        "seconds": round(tok_s, 1), "records_per_s": round(args.records / tok_s),
        "kept_records_per_s": round(report.kept / tok_s), "tokens_per_s": round(tokens / tok_s),
        "examples": len(examples), "tokens": tokens, "truncated": tally.truncated,
        "bytes_per_token": round(examples.nbytes / tokens, 2),
        "list_bytes_per_token": round(list_bytes_per_token(examples), 1), "list_sample": min(len(examples), 20_000),
        "peak_rss_mb": round(peak_rss_mb()), "workers_peak_rss_mb": round(children_peak_rss_mb())}
    result["cleaning"] = {"kept": report.kept, "kept_fraction": round(report.kept / args.records, 4),
                          "dropped": report.dropped, "examples": report.examples}
    result["clean_plus_tokenize_records_per_s"] = round(args.records / (fit_s + tok_s))
    print(f"filter + tokenize: {tok_s:.1f} s, kept {report.kept:,}: {report.dropped}; {tokens:,} tokens, "
          f"{result['filter_tokenize']['bytes_per_token']} B/token (lists: "
          f"{result['filter_tokenize']['list_bytes_per_token']})", flush=True)

    t = time.perf_counter()
    lengths = examples.lengths
    result["packing"] = packing_stats(lengths, rows=args.rows, max_length=args.max_length, seed=0)
    result["packing_s"] = round(time.perf_counter() - t, 1)
    for s in result["packing"]:
        print(f"packing {s['strategy']}: padding {s['padding']:.2%}, {s['batches']:,} batches", flush=True)

    t = time.perf_counter()
    loader = BatchLoader(examples, strategy="bfd", rows=args.rows, max_length=args.max_length, pad_id=0, seed=0)
    plan_s = time.perf_counter() - t
    next(loader)
    t = time.perf_counter()
    for _ in range(args.loader_batches):
        next(loader)
    per_batch = (time.perf_counter() - t) / args.loader_batches
    batch_tokens = args.rows * args.max_length
    needed = args.gpu_tokens_per_s / batch_tokens
    result["loader"] = {"strategy": "bfd", "plan_epoch_s": round(plan_s, 2), "batches_per_s": round(1 / per_batch, 1),
                        "tokens_per_s": round(batch_tokens / per_batch), "gpu_tokens_per_s": args.gpu_tokens_per_s,
                        "gpu_batches_per_s": round(needed, 2), "headroom": round(1 / per_batch / needed, 1),
                        "peak_rss_mb": round(peak_rss_mb())}
    print(f"loader: {1 / per_batch:.1f} batches/s vs {needed:.2f} needed ({result['loader']['headroom']}x)")
    result["load_average_end"] = os.getloadavg()

    import numpy
    import pyarrow
    import tokenizers
    import torch

    result["provenance"] = {"device": f"CPU, {platform.processor() or platform.machine()}",
                            "cpu_count": os.cpu_count(), "python": platform.python_version(),
                            "torch": torch.__version__, "numpy": numpy.__version__,
                            "tokenizers": tokenizers.__version__,
                            "pyarrow": pyarrow.__version__, "platform": platform.platform(),
                            "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            "command": " ".join(sys.argv)}
    if args.smoke:
        print(markdown(result))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(markdown(result))
    print(f"wrote {out / args.name}.json and .md")


def markdown(r: dict) -> str:
    fit, tk, cl, ld = r["clean_fit"], r["filter_tokenize"], r["cleaning"], r["loader"]
    load = ", ".join(f"{x:.1f}" for x in r["load_average_start"])
    load_end = ", ".join(f"{x:.1f}" for x in r["load_average_end"])
    lines = [f"# Data pipeline benchmark ({r['records']:,} synthetic recipes)", "",
             f"{r['provenance']['device']}, {r['provenance']['cpu_count']} cores; Python {r['provenance']['python']}, "
             f"torch {r['provenance']['torch']}, tokenizers {r['provenance']['tokenizers']}, pyarrow "
             f"{r['provenance']['pyarrow']}; {r['provenance']['timestamp_utc']}; one run per stage. Load average "
             f"(1, 5, 15 min) {load} at the start, {load_end} at the end.", "",
             f"Command: `{r['provenance']['command']}`", "",
             *([f"Note: {r['note']}", ""] if r.get("note") else []),
             f"Corpus: {r['records']:,} records ({r['file_mb']:,} MB JSONL, generated in {r['generate_s']} s), "
             f"bad-record rates `{r['bad_rates']}`.", "",
             "| stage | seconds | records/s | peak RSS (MB) |", "|---|---:|---:|---:|",
             f"| clean: fit ({fit['passes']} streamed passes) | {fit['seconds']} | {fit['records_per_s']:,} "
             f"(per pass) | {fit['peak_rss_mb']:,} |",
             f"| filter + tokenize ({r['num_proc']} processes) | {tk['seconds']} | {tk['records_per_s']:,} | "
             f"{tk['peak_rss_mb']:,} (workers {tk['workers_peak_rss_mb']:,}) |",
             f"| clean + tokenize | {round(fit['seconds'] + tk['seconds'], 1)} | "
             f"{r['clean_plus_tokenize_records_per_s']:,} | |", "",
             f"Cleaning kept {cl['kept']:,} of {r['records']:,} ({cl['kept_fraction']:.1%}; target < 50%: "
             f"{'met' if cl['kept_fraction'] < 0.5 else 'NOT met'}); dropped per rule: "
             + ", ".join(f"`{k}` {v:,}" for k, v in cl["dropped"].items()) + ". "
             f"Tokenization: {tk['tokens']:,} tokens ({tk['tokens_per_s']:,} tokens/s), {tk['truncated']:,} truncated.",
             "", f"Tokenized examples take {tk['bytes_per_token']} bytes per token in flat int32 arrays "
             f"(`optrush.data.examples.Examples`), against {tk['list_bytes_per_token']} bytes per token as Python "
             f"lists of ints (the former layout, measured on {tk['list_sample']:,} examples with tracemalloc).",
             "", f"## Packing at {r['max_length']} tokens, {r['rows']} rows per micro-batch", "",
             "| strategy | micro-batches | tokens / batch | slots / batch | padding |", "|---|---:|---:|---:|---:|"]
    for s in r["packing"]:
        lines.append(f"| `{s['strategy']}` | {s['batches']:,} | {s['tokens_per_batch']:,.0f} | "
                     f"{s['positions_per_batch']:,.0f} | {s['padding']:.2%} |")
    bfd = next(s for s in r["packing"] if s["strategy"] == "bfd")
    lines += ["", f"Target `bfd` padding <= 2%: {'met' if bfd['padding'] <= 0.02 else 'NOT met'} "
              f"({bfd['padding']:.2%}).", "", "## Loader", "",
              f"`bfd` micro-batches of {r['rows']} x {r['max_length']} tokens: {ld['batches_per_s']} batches/s "
              f"({ld['tokens_per_s']:,} tokens/s) on one core, after planning the epoch in {ld['plan_epoch_s']} s. "
              f"A GPU at {ld['gpu_tokens_per_s']:,.0f} tokens/s consumes {ld['gpu_batches_per_s']} batches/s: "
              f"headroom {ld['headroom']}x (target >= 10x: {'met' if ld['headroom'] >= 10 else 'NOT met'}). "
              f"Peak RSS of the whole run: {ld['peak_rss_mb']:,} MB."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
