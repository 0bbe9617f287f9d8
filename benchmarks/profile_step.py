"""Where one training step spends its GPU time: kernel time by category, under torch.profiler.

    python benchmarks/profile_step.py --name profile_1b_h100 --out benchmarks/results -- \
        model.preset=llama3.2-1b precision.mode=bf16_pure train.micro_batch_size=4 data.max_length=2048 \
        train.device=cuda compile.mode=model kernels.fused_loss=true
    python benchmarks/profile_step.py --smoke          # the debug model on CPU, to check this script itself

The step is `optrush bench`'s (`optrush.bench.run.prepare` / `train_step`: the training loop's own model,
optimizations, optimizer and clipping) on synthetic full rows. `--warmup` steps run first (compilation), then
`--steps` steps are timed with a device sync after each (the wall time per step, as `optrush bench` reports it),
then `--profile-steps` more run under torch.profiler. Reported per profiled step:
- GPU busy time: the union of all kernel and copy intervals, against the wall time (the rest is the GPU idle:
  launch overhead, host syncs);
- kernel time by category, by kernel name: matmul (cuBLAS / CUTLASS), attention, optimizer + gradient clipping
  (multi-tensor kernels), inductor-generated Triton kernels (fused pointwise/reduction: norms, RoPE, SwiGLU,
  casts, the fused loss's softmax), copies and fills, other;
- model FLOPs over kernel time for matmul and attention: the MFU formula's two terms (6 x params per token, and
  6 x layers x seq x dim) divided by those kernels' time. Recomputation (activation checkpointing) runs matmuls
  the formula does not count, so under checkpointing this understates the hardware's rate;
- the slowest kernels by total time;
- the idle gaps of the compute stream (the stream with the most kernel time): their total per step, and the
  largest, each with the kernels before and after it and what ran on other streams meanwhile (offload copies),
  to tell a GPU waiting for the host (launch overhead, syncs) from one waiting for copies.
`--sdpa-backend` runs everything inside `torch.nn.attention.sdpa_kernel(BACKEND)`, to compare SDPA's kernels.
Output: `<out>/<name>.json` (every number, provenance included) and `.md`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from optrush.bench.provenance import provenance, provenance_line, write_result  # noqa: E402
from optrush.bench.run import prepare, train_step  # noqa: E402
from optrush.config import load_config, to_dict  # noqa: E402
from optrush.parallel.distributed import init_distributed, teardown  # noqa: E402
from optrush.train.loop import resolve_device  # noqa: E402
from optrush.train.metrics import peak_memory_gib, training_flops_per_token  # noqa: E402

SMOKE = ["model.preset=debug", "precision.mode=fp32", "train.micro_batch_size=2", "data.max_length=64",
         "train.device=cpu", "objective=causal_lm", "output_dir=/tmp/optrush-profile"]
# first match wins: cuDNN's attention kernels carry "sm90" like cuBLAS's, so attention is tried before matmul
CATEGORIES = [
    ("attention", re.compile(r"flash|fmha|attention|sdpa|attn|flex", re.I)),
    # triton_tem: inductor's matmul templates (max-autotune)
    ("matmul", re.compile(r"gemm|nvjet|cutlass|xmma|cublas|splitk|^triton_tem", re.I)),
    ("optimizer + clipping", re.compile(r"multi_tensor|adam|foreach|lpnorm", re.I)),
    ("triton (inductor-fused)", re.compile(r"^triton_", re.I)),
    ("copies and fills", re.compile(r"memcpy|memset|copy|fill", re.I)),
]


def category(kernel: str) -> str:
    return next((name for name, pattern in CATEGORIES if pattern.search(kernel)), "other")


def union_us(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def device_events(events) -> list:
    """The device-side events: kernels, copies and fills. User annotations (`Optimizer.step#AdamW.step`) are
    mirrored onto the device timeline as spans over the kernels they launched: counted, they would count twice."""
    return [e for e in events
            if e.device_type != torch.autograd.DeviceType.CPU and not getattr(e, "is_user_annotation", False)]


def compute_gaps(trace_events: list[dict], *, steps: int, top: int = 10) -> dict:
    """Idle gaps between consecutive kernels of the compute stream, from a Chrome trace's device events: total
    per step, and the `top` largest with their neighbours and the device time other streams used meanwhile."""
    device = [e for e in trace_events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    if not device:
        return {"idle_s_per_step": 0.0, "largest": []}
    time_on: dict[int, float] = defaultdict(float)
    for e in device:
        if e["cat"] == "kernel":
            time_on[e["args"].get("stream", -1)] += e["dur"]
    compute = max(time_on, key=time_on.get)
    kernels = sorted((e for e in device if e["cat"] == "kernel" and e["args"].get("stream", -1) == compute),
                     key=lambda e: e["ts"])
    others = [e for e in device if e["args"].get("stream", -1) != compute]
    gaps = []
    for before, after in zip(kernels, kernels[1:]):
        start, end = before["ts"] + before["dur"], after["ts"]
        if end > start:
            gaps.append((end - start, start, before["name"], after["name"]))
    largest = []
    for us, start, before, after in sorted(gaps, reverse=True)[:top]:
        meanwhile = sum(max(0.0, min(e["ts"] + e["dur"], start + us) - max(e["ts"], start)) for e in others)
        largest.append({"us": us, "before": before, "after": after, "other_streams_us": meanwhile})
    return {"compute_stream": compute, "idle_s_per_step": sum(g[0] for g in gaps) / 1e6 / steps,
            "gaps_per_step": len(gaps) / steps, "largest": largest}


def summarize(events: list, *, steps: int, wall_s: float, tokens: int, matmul_flops: float,
              attention_flops: float) -> dict:
    """Per-step kernel time by category and the slowest kernels, from the profiled steps' device events."""
    by_category: dict[str, float] = defaultdict(float)
    by_kernel: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for event in events:
        us = event.time_range.end - event.time_range.start
        by_category[category(event.name)] += us
        by_kernel[event.name][0] += us
        by_kernel[event.name][1] += 1
    busy_s = union_us([(e.time_range.start, e.time_range.end) for e in events]) / 1e6 / steps
    kernel_s = sum(by_category.values()) / 1e6 / steps
    rate = {"matmul": matmul_flops, "attention": attention_flops}
    return {
        "wall_s_per_step": wall_s,
        "gpu_busy_s_per_step": busy_s,
        "kernel_s_per_step": kernel_s,  # above busy time when streams overlap (offload copies)
        "tokens_per_step": tokens,
        "categories": {name: {"s_per_step": us / 1e6 / steps, "share_of_kernel_time": us / 1e6 / steps / kernel_s,
                              "model_tflops": (rate[name] / (us / 1e6 / steps) / 1e12 if name in rate else None)}
                       for name, us in sorted(by_category.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": name, "s_per_step": us / 1e6 / steps, "calls_per_step": calls / steps,
                         "category": category(name)}
                        for name, (us, calls) in sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:15]],
    }


def profile_step(overrides: list[str], *, warmup: int, steps: int, profile_steps: int) -> dict:
    cfg = load_config(None, overrides, synthetic_data=True)
    parallel = init_distributed(cfg.parallel, device=resolve_device(cfg.train.device))
    try:
        run = prepare(cfg, parallel, synthetic=True, n_steps=warmup + steps + profile_steps)
        device = run.device
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *_: None)
        batches = iter(run.batches)
        for _ in range(warmup):
            train_step(run, next(batches), max_grad_norm=cfg.train.max_grad_norm)
        sync(device)
        seconds = []
        for _ in range(steps):
            started = time.perf_counter()
            train_step(run, next(batches), max_grad_norm=cfg.train.max_grad_norm)
            sync(device)
            seconds.append(time.perf_counter() - started)
        activities = [torch.profiler.ProfilerActivity.CPU]
        activities += [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []
        with torch.profiler.profile(activities=activities) as prof:
            started = time.perf_counter()
            for _ in range(profile_steps):
                train_step(run, next(batches), max_grad_norm=cfg.train.max_grad_norm)
            sync(device)
            profiled_s = (time.perf_counter() - started) / profile_steps
        with tempfile.TemporaryDirectory() as tmp:
            prof.export_chrome_trace(f"{tmp}/trace.json")
            trace = json.loads(Path(f"{tmp}/trace.json").read_text(encoding="utf-8"))
        tokens = sum(b.input_ids.numel() for b in run.batches[0])
        per_token = training_flops_per_token(run.model, cfg.data.max_length)
        args = run.model.args
        attention_per_token = 6 * args.n_layers * cfg.data.max_length * args.dim
        summary = summarize(device_events(prof.events()), steps=profile_steps, wall_s=profiled_s, tokens=tokens,
                            matmul_flops=tokens * (per_token - attention_per_token),
                            attention_flops=tokens * attention_per_token)
        summary["gaps"] = compute_gaps(trace.get("traceEvents", []), steps=profile_steps)
        step_s = sorted(seconds)[len(seconds) // 2]
        return {**summary, "step_s_median": step_s, "step_seconds": seconds, "tokens_per_s": tokens / step_s,
                "peak_mem_gib": peak_memory_gib(device), "config": to_dict(cfg), "overrides": overrides,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    finally:
        teardown()


def markdown(record: dict, name: str) -> str:
    p = record["provenance"]
    lines = [f"# Step profile `{name}` ({record['device']})", "",
             provenance_line(p, record["device"]),
             f"- overrides: `{' '.join(record['overrides'])}`" + (f"; SDPA backend forced: {record['sdpa_backend']}"
                                                                   if record["sdpa_backend"] != "default" else ""),
             f"- timed: {len(record['step_seconds'])} steps after {record['warmup']} warm-up, median "
             f"{record['step_s_median'] * 1e3:.1f} ms ({record['tokens_per_s']:,.0f} tokens/s), peak "
             f"{record['peak_mem_gib']:.1f} GiB; profiled: {record['profile_steps']} more steps, "
             f"{record['wall_s_per_step'] * 1e3:.1f} ms each under the profiler",
             f"- GPU busy {record['gpu_busy_s_per_step'] * 1e3:.1f} ms per step "
             f"({record['gpu_busy_s_per_step'] / record['wall_s_per_step']:.0%} of the profiled wall time)", "",
             "| category | ms per step | share of kernel time | model TFLOP/s in these kernels |", "|---|---:|---:|---:|"]
    for cat, v in record["categories"].items():
        tflops = "" if v["model_tflops"] is None else f"{v['model_tflops']:.0f}"
        lines.append(f"| {cat} | {v['s_per_step'] * 1e3:.1f} | {v['share_of_kernel_time']:.1%} | {tflops} |")
    gaps = record["gaps"]
    lines += ["", f"Compute stream idle: {gaps['idle_s_per_step'] * 1e3:.1f} ms per step "
              f"({gaps.get('gaps_per_step', 0):g} gaps per step). Largest gaps:", "",
              "| gap us | other streams busy us | kernel before | kernel after |", "|---:|---:|---|---|"]
    for g in gaps["largest"]:
        lines.append(f"| {g['us']:.0f} | {g['other_streams_us']:.0f} | `{g['before'][:60]}` | `{g['after'][:60]}` |")
    lines += ["", "| slowest kernels | category | ms per step | calls per step |", "|---|---|---:|---:|"]
    for k in record["top_kernels"]:
        lines.append(f"| `{k['name'][:90]}` | {k['category']} | {k['s_per_step'] * 1e3:.2f} | "
                     f"{k['calls_per_step']:g} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    parser.add_argument("--name", default="profile")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--sdpa-backend", default="default", choices=["default", "cudnn", "flash", "efficient"])
    parser.add_argument("--smoke", action="store_true", help="the debug model on CPU: checks this script")
    args = parser.parse_args(argv)
    overrides = SMOKE + args.overrides if args.smoke else args.overrides
    backend = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}
    context = (torch.nn.attention.sdpa_kernel(getattr(torch.nn.attention.SDPBackend, backend[args.sdpa_backend]))
               if args.sdpa_backend != "default" else contextlib.nullcontext())
    with context:
        record = profile_step(overrides, warmup=args.warmup, steps=args.steps, profile_steps=args.profile_steps)
    record.update(name=args.name, warmup=args.warmup, profile_steps=args.profile_steps, sdpa_backend=args.sdpa_backend,
                  provenance=provenance())
    text = markdown(record, args.name)
    write_result(record, text, out=args.out, name=args.name)
    print(text)


if __name__ == "__main__":
    main()
