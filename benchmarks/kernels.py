"""Micro-benchmarks of optrush.kernels on one GPU: attention backends, the fused loss, the fused ops.

    python benchmarks/kernels.py --out benchmarks/results --name kernels_h100
    python benchmarks/kernels.py --tiny --out /tmp/k        # CPU smoke run of the script itself (tiny shapes)

Writes <name>.json (every number, the shapes and the provenance record) and <name>.md (the tables).
Every case is forward + backward. Warm-up calls (which include compilation) are excluded; then `--repeats` calls
are timed one by one with CUDA events and the median is reported. "Peak" is the highest memory allocated during
one timed call above what was allocated before it (inputs excluded), in GiB.

- attention: bf16, 32 query heads, 8 KV heads, head dim 64 (Llama-3.2-1B), two packed layouts of 8,192 tokens.
  `sdpa-dense` is the reference (SDPA with a dense document-causal mask: the memory-efficient kernel);
  `sdpa-causal` ignores document boundaries (flash, one causal sequence per row: not equivalent, only a yardstick).
  Mask building is timed separately (once per batch, not per layer).
- loss: 8,192 tokens x hidden 2,048 x vocab 128,256 in bf16 (the naive path casts the full logits to fp32).
- ops: RMSNorm, SwiGLU and RoPE at the 1B shape, eager reference vs the compiled region of optrush.kernels.ops,
  with the effective bandwidth from the minimal bytes each must move (reads + writes of forward and backward).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from optrush.bench.provenance import provenance
from optrush.kernels import fused_linear_cross_entropy
from optrush.kernels import ops
from optrush.kernels.attention import FLEX, VARLEN
from optrush.models import layers

GIB = 2 ** 30


def measure(fn, *, device: torch.device, warmup: int, repeats: int) -> dict:
    """Median/min milliseconds and peak GiB (above the memory in use before the call) of `fn()`."""
    for _ in range(warmup):
        fn()
    times, peak = [], 0.0
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
            peak = max(peak, (torch.cuda.max_memory_allocated() - base) / GIB)
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    result = {"ms": round(statistics.median(times), 4), "ms_min": round(min(times), 4), "peak_gib": round(peak, 3)}
    if device.type == "cuda":
        result["kernel_ms"] = round(kernel_ms(fn, repeats=5), 4)
    return result


def kernel_ms(fn, *, repeats: int) -> float:
    """GPU time of the kernels that one `fn()` launches (profiler sum): what the op costs once the CPU runs ahead
    of the GPU, as it does inside a model, while one timed call alone also counts launch gaps."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    return sum(event.self_device_time_total for event in prof.key_averages()) / repeats / 1e3


# ---------------------------------------------------------------------------------------------------- attention

def sft_mix_rows(*, rows: int, seq_len: int, seed: int) -> list[list[int]]:
    """Document lengths of a lognormal SFT-like mix (mean about 477 tokens) packed first-fit into `rows` rows."""
    gen = torch.Generator().manual_seed(seed)
    packed, room = [[] for _ in range(rows)], [seq_len] * rows
    for _ in range(400):
        length = int(min(seq_len, max(8, math.exp(math.log(477) - 0.5 + torch.randn(1, generator=gen).item()))))
        for r in range(rows):
            if length <= room[r]:
                packed[r].append(length)
                room[r] -= length
                break
    return packed


def document_ids(rows: list[list[int]], *, seq_len: int, device) -> torch.Tensor:
    docs = torch.full((len(rows), seq_len), -1, dtype=torch.int32)
    for r, lengths in enumerate(rows):
        start = 0
        for d, n in enumerate(lengths):
            docs[r, start:start + n] = d
            start += n
    return docs.to(device)


def attention_cases(layout: str, rows: list[list[int]], *, seq_len: int, heads: int, kv_heads: int, head_dim: int,
                    device, dtype, args) -> list[dict]:
    docs = document_ids(rows, seq_len=seq_len, device=device)
    B = docs.shape[0]
    torch.manual_seed(0)
    # (B, T, H, D) storage seen as (B, H, T, D), exactly as the model hands q, k, v over
    q = torch.randn(B, seq_len, heads, head_dim, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(B, seq_len, kv_heads, head_dim, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
    v = torch.randn(B, seq_len, kv_heads, head_dim, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
    grad_out = torch.randn(B, heads, seq_len, head_dim, device=device, dtype=dtype)
    backends = {"sdpa-dense": layers.SDPA, "flex": FLEX, "varlen": VARLEN}
    if device.type == "cpu":  # the smoke run: neither GPU backend trains on CPU
        backends = {"sdpa-dense": layers.SDPA}
    results = []
    for name, backend in backends.items():
        build = functools.partial(backend.build_mask, docs, seq_len=seq_len, sliding_window=None, device=device)
        mask = build()

        def step(backend=backend, mask=mask):
            out = backend.attend(q, k, v, mask=mask)
            torch.autograd.grad(out, (q, k, v), grad_out)

        results.append({"layout": layout, "backend": name, **measure(step, device=device, warmup=args.warmup,
                                                                     repeats=args.repeats),
                        "mask_build_ms": measure(build, device=device, warmup=2, repeats=args.repeats)["ms"]})

    def causal_step():
        out = layers.sdpa_attention(q, k, v, mask=None)
        torch.autograd.grad(out, (q, k, v), grad_out)

    results.append({"layout": layout, "backend": "sdpa-causal (no document mask)",
                    **measure(causal_step, device=device, warmup=args.warmup, repeats=args.repeats),
                    "mask_build_ms": 0.0})
    return results


# --------------------------------------------------------------------------------------------------------- loss

def loss_cases(*, tokens: int, hidden: int, vocab: int, device, dtype, args) -> list[dict]:
    torch.manual_seed(0)
    h = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(vocab, hidden, device=device) / hidden ** 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device=device)
    labels[torch.rand(tokens, device=device) < 0.1] = -100
    cases = {"naive (full fp32 logits)": layers.linear_cross_entropy}
    for chunk in args.loss_chunks:  # eager call; on CUDA each chunk's element-wise work is one compiled kernel
        cases[f"fused, chunks of {chunk}"] = functools.partial(fused_linear_cross_entropy, chunk_tokens=chunk)
    if device.type == "cuda":  # the whole loss inside torch.compile, as with compile.mode=model
        cases[f"fused, chunks of {args.loss_chunks[0]}, whole loss compiled"] = torch.compile(
            functools.partial(fused_linear_cross_entropy, chunk_tokens=args.loss_chunks[0]), fullgraph=True)
    results = []
    for name, fn in cases.items():
        def step(fn=fn):
            loss = fn(h, w, labels, reduction="sum")
            torch.autograd.grad(loss, (h, w))

        results.append({"case": name, **measure(step, device=device, warmup=args.warmup, repeats=args.repeats)})
    return results


# ---------------------------------------------------------------------------------------------------------- ops

def op_cases(*, tokens: int, dim: int, ffn_dim: int, heads: int, kv_heads: int, head_dim: int, device, dtype,
             args) -> list[dict]:
    torch.manual_seed(0)
    new = functools.partial(torch.randn, device=device, dtype=dtype)
    x, weight = new(1, tokens, dim, requires_grad=True), new(dim, requires_grad=True)
    gate, up = new(1, tokens, ffn_dim, requires_grad=True), new(1, tokens, ffn_dim, requires_grad=True)
    q, k = new(1, tokens, heads, head_dim, requires_grad=True), new(1, tokens, kv_heads, head_dim, requires_grad=True)
    cos, sin = (torch.randn(1, tokens, head_dim // 2, device=device) for _ in range(2))
    norm = layers.RMSNorm(dim).to(device=device, dtype=dtype)
    nbytes = x.element_size()
    specs = {  # name: (reference, fused, inputs, minimal bytes moved by forward + backward)
        "RMSNorm": (lambda x, w: torch.func.functional_call(norm, {"weight": w}, (x,)),
                    lambda x, w: ops.fused_rms_norm(x, w, norm.eps), (x, weight), 5 * x.numel() * nbytes),
        "SwiGLU": (ops.swiglu, ops.fused_swiglu, (gate, up), 8 * gate.numel() * nbytes),
        "RoPE": (lambda q, k: layers.apply_rotary(q, k, cos, sin), lambda q, k: ops.fused_rotary(q, k, cos, sin),
                 (q, k), 4 * (q.numel() + k.numel()) * nbytes),
    }
    results = []
    for name, (reference, fused, inputs, moved) in specs.items():
        for variant, fn in (("eager reference", reference), ("compiled (optrush.kernels.ops)", fused)):
            def step(fn=fn, inputs=inputs):
                out = fn(*inputs)
                out = out if isinstance(out, tuple) else (out,)
                torch.autograd.grad(out, inputs, [torch.ones_like(o) for o in out])

            timing = measure(step, device=device, warmup=args.warmup, repeats=args.repeats)
            gpu_ms = timing.get("kernel_ms", timing["ms"])
            results.append({"op": name, "variant": variant, **timing,
                            "effective_gb_s": round(moved / (gpu_ms * 1e-3) / 1e9, 1)})
    return results


# ------------------------------------------------------------------------------------------------------ report

def markdown(record: dict) -> str:
    p, c = record["provenance"], record["config"]
    lines = [f"# optrush.kernels micro-benchmarks ({', '.join(p['devices']) or 'CPU'})", "",
             f"torch {p['torch']}, CUDA {p['cuda']}, driver {p['nvidia_driver']}, Python {p['python']}, "
             f"git {p['git_sha']}{' (dirty)' if p['git_dirty'] else ''}, {p['timestamp_utc']}. "
             f"Median of {c['repeats']} timed calls after {c['warmup']} warm-up calls (compilation excluded); "
             "forward + backward; peak = memory allocated above the inputs; kernel ms = GPU time of the launched "
             "kernels (profiler sum over 5 calls), i.e. without CPU launch gaps. "
             "Produced by `python benchmarks/kernels.py`.", "",
             f"## Attention ({c['dtype']}, {c['attention']['heads']} heads, {c['attention']['kv_heads']} KV heads, "
             f"head dim {c['attention']['head_dim']})", ""]
    for layout, desc in c["attention"]["layouts"].items():
        lines.append(f"- `{layout}`: {desc}")
    lines += ["", "| layout | backend | ms | min ms | kernel ms | peak GiB | mask build ms |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['layout']} | {r['backend']} | {r['ms']} | {r['ms_min']} | {r.get('kernel_ms', '')} | "
              f"{r['peak_gib']} | {r['mask_build_ms']} |" for r in record["attention"]]
    lo = c["loss"]
    lines += ["", f"## Linear + cross-entropy ({lo['tokens']} tokens, hidden {lo['hidden']}, vocab {lo['vocab']}, "
              f"{c['dtype']}, reduction sum)", "", "| case | ms | min ms | kernel ms | peak GiB |", "|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['ms']} | {r['ms_min']} | {r.get('kernel_ms', '')} | {r['peak_gib']} |"
              for r in record["loss"]]
    o = c["ops"]
    lines += ["", f"## Fused ops ({o['tokens']} tokens, dim {o['dim']}, ffn {o['ffn_dim']}, {o['heads']}/"
              f"{o['kv_heads']} heads x {o['head_dim']}, {c['dtype']})", "",
              "| op | variant | ms | min ms | kernel ms | peak GiB | effective GB/s (kernel time) |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['op']} | {r['variant']} | {r['ms']} | {r['ms_min']} | {r.get('kernel_ms', '')} | {r['peak_gib']} | "
              f"{r['effective_gb_s']} |" for r in record["ops"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="kernels_h100")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--loss-chunks", type=int, nargs="+", default=[4096, 2048, 1024])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run with tiny shapes")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    scale = 64 if args.tiny else 1
    seq = 8192 // scale
    att = dict(heads=4, kv_heads=1, head_dim=8) if args.tiny else dict(heads=32, kv_heads=8, head_dim=64)
    layouts = {
        "1x8192, 4 docs": ([[seq // 4] * 4], seq),
        "4x2048, SFT mix": (sft_mix_rows(rows=4, seq_len=seq // 4, seed=0), seq // 4),
    }
    loss_shape = dict(tokens=8192 // scale, hidden=2048 // scale, vocab=128256 // scale)
    op_shape = dict(tokens=8192 // scale, dim=2048 // scale, ffn_dim=8192 // scale, **att)
    config = {"repeats": args.repeats, "warmup": args.warmup, "dtype": str(dtype).removeprefix("torch."),
              "attention": {**att, "layouts": {
                  name: f"{len(rows)} row(s) x {T} tokens, document lengths {rows}" for name, (rows, T) in
                  layouts.items()}},
              "loss": loss_shape, "loss_chunks": args.loss_chunks, "ops": op_shape}
    print(json.dumps(config), flush=True)
    record = {"provenance": provenance(), "config": config, "attention": [], "loss": [], "ops": []}
    for name, (rows, T) in layouts.items():
        results = attention_cases(name, rows, seq_len=T, device=device, dtype=dtype, args=args, **att)
        record["attention"] += results
        print(json.dumps(results), flush=True)
    record["loss"] = loss_cases(device=device, dtype=dtype, args=args, **loss_shape)
    print(json.dumps(record["loss"]), flush=True)
    record["ops"] = op_cases(device=device, dtype=dtype, args=args, **op_shape)
    print(json.dumps(record["ops"]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(markdown(record))
    print(markdown(record), flush=True)
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
