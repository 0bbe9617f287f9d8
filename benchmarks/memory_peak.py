"""What is live on the GPU at a training step's memory peak, grouped by where it was allocated.

    python benchmarks/memory_peak.py model.preset=llama3.1-8b peft.method=lora ... --name qlora8b --out DIR

Runs `--warmup` steps of the training loop's own step (`optrush.bench.run`: `prepare` + `train_step`, as `optrush
bench` times it), then records the CUDA caching allocator's history (`torch.cuda.memory._record_memory_history`)
over `--steps` more. The recorded allocations and frees are replayed to find the moment the allocated total is
highest; what was live then (allocated during the recorded steps: weights and other older tensors are the
`before` total) is grouped by its innermost frame outside torch, which for Inductor's buffers is a line of a
compiled graph, and by its innermost optrush frame. The planner's moments (`optrush.plan.memory`) are written
beside it, so a row the planner misses shows which term it lacks. Writes `<name>.json` and `<name>.md`.
CUDA only; `peak_allocations` (the replay) is tested on CPU.
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections import defaultdict
from pathlib import Path

GIB = 2**30


def frame_key(frames: list[dict]) -> str:
    """'innermost frame outside torch < innermost optrush frame' of an allocation's Python stack."""
    def where(frame: dict) -> str:
        return f"{Path(frame['filename']).name}:{frame['line']} {frame['name']}"

    outside = next((f for f in frames if "/torch/" not in f["filename"]), None)
    ours = next((f for f in frames if "/optrush/" in f["filename"]), None)
    parts = [where(f) for f in (outside, ours) if f is not None]
    return " < ".join(dict.fromkeys(parts)) or "(no Python frame)"


def peak_allocations(events: list[dict]) -> dict:
    """Replay allocator trace events ('alloc' adds a block, 'free_requested' removes it: the allocator's
    allocated-bytes statistic drops at the request, even while a side stream's use defers the block's reuse): the
    highest total reached, the event index where it was reached, and the blocks live at that moment."""
    live: dict[int, dict] = {}
    total = peak = 0
    peak_index = -1
    for index, event in enumerate(events):
        if event["action"] == "alloc":
            live[event["addr"]] = event
            total += event["size"]
            if total > peak:
                peak, peak_index = total, index
        elif event["action"] == "free_requested" and event["addr"] in live:
            total -= live.pop(event["addr"])["size"]
    live = {}
    for event in events[:peak_index + 1]:
        if event["action"] == "alloc":
            live[event["addr"]] = event
        elif event["action"] == "free_requested":
            live.pop(event["addr"], None)
    return {"peak_bytes": peak, "peak_index": peak_index, "live": list(live.values())}


def grouped(blocks: list[dict]) -> list[dict]:
    """Live blocks summed by `frame_key`, largest first."""
    groups: dict[str, list[int]] = defaultdict(list)
    for block in blocks:
        groups[frame_key(block.get("frames", []))].append(block["size"])
    rows = [{"where": key, "count": len(sizes), "gib": sum(sizes) / GIB} for key, sizes in groups.items()]
    return sorted(rows, key=lambda r: -r["gib"])


def measure(overrides: list[str], *, warmup: int, steps: int) -> dict:
    import torch

    from optrush.bench.provenance import provenance
    from optrush.bench.run import prepare, train_step
    from optrush.config import load_config
    from optrush.parallel.distributed import init_distributed
    from optrush.plan.memory import estimate_memory
    from optrush.plan.search import model_args
    from optrush.plan.setup import setup_from_config

    cfg = load_config(None, overrides, synthetic_data=True)
    parallel = init_distributed(cfg.parallel, device=torch.device("cuda"))
    run = prepare(cfg, parallel, synthetic=True, n_steps=warmup + steps)
    torch.cuda.reset_peak_memory_stats()
    for micro_batches in run.batches[:warmup]:
        train_step(run, micro_batches, max_grad_norm=cfg.train.max_grad_norm)
    torch.cuda.synchronize()
    warm_peak = torch.cuda.max_memory_allocated()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    for micro_batches in run.batches[warmup:]:
        train_step(run, micro_batches, max_grad_norm=cfg.train.max_grad_norm)
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    events = snapshot["device_traces"][torch.cuda.current_device()]
    peak = peak_allocations(events)
    at_peak = events[peak["peak_index"]] if peak["peak_index"] >= 0 else {}
    memory = estimate_memory(model_args(cfg.model.preset or cfg.model.path), setup_from_config(cfg))
    return {"overrides": overrides, "warmup": warmup, "steps": steps, "provenance": provenance(),
            "peak_gib_warmup": warm_peak / GIB, "peak_gib_recorded": torch.cuda.max_memory_allocated() / GIB,
            "before_gib": before / GIB, "replayed_peak_gib": (before + peak["peak_bytes"]) / GIB,
            "events": len(events), "peak_reached_at": frame_key(at_peak.get("frames", [])),
            "live_at_peak": grouped(peak["live"]),
            "planner_moments_gib": {k: v / GIB for k, v in memory.phases.items()},
            "planner_terms_gib": {k: v / GIB for k, v in memory.terms.items()}, "trace": events}


def markdown(name: str, r: dict) -> str:
    lines = [f"# Memory at the peak: `{name}`", "",
             f"- overrides: `{' '.join(r['overrides'])}`",
             f"- device: {', '.join(r['provenance'].get('devices') or [])}; torch {r['provenance'].get('torch')}; "
             f"measured {r['provenance'].get('timestamp_utc')}",
             f"- peak allocated: {r['peak_gib_warmup']:.2f} GiB over {r['warmup']} warm-up steps, "
             f"{r['peak_gib_recorded']:.2f} GiB over the {r['steps']} recorded; replayed from the trace: "
             f"{r['replayed_peak_gib']:.2f} GiB ({r['before_gib']:.2f} allocated before recording, "
             f"{r['events']:,} events)",
             f"- the allocation that reached the peak: `{r['peak_reached_at']}`",
             "- planner moments (GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in r["planner_moments_gib"].items()),
             "- planner terms at its peak (GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                            r["planner_terms_gib"].items() if v),
             "", "| live at the peak, allocated at | blocks | GiB |", "|---|---:|---:|"]
    lines += [f"| `{g['where']}` | {g['count']} | {g['gib']:.3f} |" for g in r["live_at_peak"][:30]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    parser.add_argument("--name", default="memory_peak")
    parser.add_argument("--out", default="benchmarks/results/memory_peak")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--trace", help="also write the raw trace events (JSON, gzip) to this file")
    args = parser.parse_args()
    result = measure(args.overrides, warmup=args.warmup, steps=args.steps)
    if args.trace:
        Path(args.trace).parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(args.trace, "wt", encoding="utf-8") as trace:
            json.dump(result.pop("trace"), trace)
    result.pop("trace", None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    table = markdown(args.name, result)
    (out / f"{args.name}.md").write_text(table, encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
