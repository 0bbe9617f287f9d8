"""Issue #4 data-pipeline benchmark on the synthetic recipe corpus, on CPU (the machine that prepares the data).

    nice -n 19 python benchmarks/data_pipeline.py --records 2000000 --out benchmarks/results

Stages, each timed once on the same corpus (`optrush.data.recipes.generate_recipes`, lognormal lengths):
1. read + clean: stream the JSONL (`optrush.data.sources`) and apply the `data.clean` rules below (empty columns,
   exact and MinHash near-duplicates, ingredient-count bounds, rare-ingredient rule); records/s.
2. tokenize: the kept records -> examples (`data.format=recipe`, `data.num_proc` processes, a byte-level BPE
   trained on a sample of the corpus); records/s and tokens/s.
3. packing: padding fraction, tokens per micro-batch and micro-batch count per `data.packing` strategy at
   `data.max_length=2048`, 8 rows per micro-batch (`optrush.data.stats.packing_stats`).
4. loader: `BatchLoader(strategy=bfd)` micro-batches/s on one core (planning the epoch timed separately),
   compared with what a GPU consumes at `--gpu-tokens-per-s` (the training speed target): ratio >= 10 passes.
Peak RSS is read after each stage (it is the process peak so far). Writes data_pipeline.json and .md.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from optrush.config.schema import DataCleanConfig, DataConfig  # noqa: E402
from optrush.data.clean import clean_records, rules_from_config  # noqa: E402
from optrush.data.dataset import Tally, encode_parallel, encode_records  # noqa: E402
from optrush.data.loader import BatchLoader  # noqa: E402
from optrush.data.recipes import generate_recipes, recipe_completion, recipe_prompt, write_jsonl  # noqa: E402
from optrush.data.sources import iter_records  # noqa: E402
from optrush.data.stats import packing_stats  # noqa: E402
from optrush.data.tokenizer import train_tokenizer  # noqa: E402

CLEAN = DataCleanConfig(nonempty=["title", "ingredients", "directions"], dedup=True, near_dedup=True,
                        min_items=2, max_items=40, max_chars=12_000, rare_field="NER", rare_min_count=2)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=2_000_000)
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--loader-batches", type=int, default=300)
    ap.add_argument("--gpu-tokens-per-s", type=float, default=50_000)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--note", default="", help="a remark printed with the results (e.g. why fewer records)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="optrush-data-bench-"))
    result: dict = {"records": args.records, "num_proc": args.num_proc, "max_length": args.max_length,
                    "rows": args.rows, "note": args.note, "clean": {k: getattr(CLEAN, k) for k in CLEAN.__slots__}, "repeats": 1}

    t = time.perf_counter()
    data = work / "recipes.jsonl"
    write_jsonl(generate_recipes(args.records, seed=0), data)
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
    t = time.perf_counter()
    numbered = list(iter_records(data))
    read_s = time.perf_counter() - t
    kept, report = clean_records([r for _, r in numbered], rules=rules_from_config(cfg, tokenizer))
    clean_s = time.perf_counter() - t
    survivors = {id(r) for r in kept}
    kept_numbered = [(w, r) for w, r in numbered if id(r) in survivors]
    del numbered
    result["read_clean"] = {"seconds": round(clean_s, 1), "read_seconds": round(read_s, 1),
                            "records_per_s": round(args.records / clean_s), "kept": report.kept,
                            "dropped": report.dropped, "peak_rss_mb": round(peak_rss_mb())}
    print(f"read + clean: {clean_s:.1f} s, kept {report.kept:,}: {report.dropped}", flush=True)

    t = time.perf_counter()
    tally = Tally(path=str(data))
    if args.num_proc > 1:
        examples = encode_parallel(kept_numbered, cfg=cfg, tokenizer=tokenizer, tally=tally, rejects=None)
    else:
        examples = list(encode_records(kept_numbered, cfg=cfg, tokenizer=tokenizer, tally=tally))
    tok_s = time.perf_counter() - t
    tokens = sum(len(e) for e in examples)
    result["tokenize"] = {"seconds": round(tok_s, 1), "records_per_s": round(len(kept_numbered) / tok_s),
                          "tokens_per_s": round(tokens / tok_s), "examples": len(examples), "tokens": tokens,
                          "truncated": tally.truncated, "peak_rss_mb": round(peak_rss_mb())}
    del kept_numbered, kept
    result["clean_plus_tokenize_records_per_s"] = round(args.records / (clean_s + tok_s))
    print(f"tokenize: {tok_s:.1f} s, {tokens:,} tokens", flush=True)

    t = time.perf_counter()
    lengths = [len(e) for e in examples]
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

    import numpy
    import pyarrow
    import tokenizers
    import torch

    result["provenance"] = {"device": f"CPU, {platform.processor() or platform.machine()}",
                            "cpu_count": __import__("os").cpu_count(), "python": platform.python_version(),
                            "torch": torch.__version__, "numpy": numpy.__version__,
                            "tokenizers": tokenizers.__version__,
                            "pyarrow": pyarrow.__version__, "platform": platform.platform(),
                            "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            "command": " ".join(sys.argv)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_pipeline.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "data_pipeline.md").write_text(markdown(result))
    print(f"wrote {out / 'data_pipeline.json'} and {out / 'data_pipeline.md'}")


def markdown(r: dict) -> str:
    rc, tk, ld = r["read_clean"], r["tokenize"], r["loader"]
    lines = [f"# Data pipeline benchmark ({r['records']:,} synthetic recipes)", "",
             f"{r['provenance']['device']}, {r['provenance']['cpu_count']} cores; Python {r['provenance']['python']}, "
             f"torch {r['provenance']['torch']}, tokenizers {r['provenance']['tokenizers']}, pyarrow "
             f"{r['provenance']['pyarrow']}; {r['provenance']['timestamp_utc']}; one run per stage.", "",
             f"Command: `{r['provenance']['command']}`", "",
             *([f"Note: {r['note']}", ""] if r.get("note") else []),
             "| stage | seconds | records/s | peak RSS (MB) |", "|---|---:|---:|---:|",
             f"| read + clean | {rc['seconds']} | {rc['records_per_s']:,} | {rc['peak_rss_mb']:,} |",
             f"| tokenize ({r['num_proc']} processes) | {tk['seconds']} | {tk['records_per_s']:,} | "
             f"{tk['peak_rss_mb']:,} |",
             f"| clean + tokenize | {round(rc['seconds'] + tk['seconds'], 1)} | "
             f"{r['clean_plus_tokenize_records_per_s']:,} | |", "",
             f"Cleaning kept {rc['kept']:,} of {r['records']:,}; dropped per rule: "
             + ", ".join(f"`{k}` {v:,}" for k, v in rc["dropped"].items()) + ". "
             f"Tokenization: {tk['tokens']:,} tokens ({tk['tokens_per_s']:,} tokens/s), {tk['truncated']:,} truncated.",
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
              f"headroom {ld['headroom']}x (target >= 10x: {'met' if ld['headroom'] >= 10 else 'NOT met'})."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
