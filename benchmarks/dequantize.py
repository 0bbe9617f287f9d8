"""NF4 dequantization kernels at the Llama-3.1-8B weight shapes: the eager reference, the compiled reference (what
`kernels.fused_dequantize` ran before the Triton kernel) and optrush.kernels.nf4's Triton kernel.

    python benchmarks/dequantize.py --out benchmarks/results --name dequantize_h100
    python benchmarks/dequantize.py --tiny --out /tmp/dq        # CPU smoke run of the script (reference paths only)

Each case dequantizes to bf16; several weights of one shape are used in turn, so the timing does not read from L2
what an earlier call left there. Time: median of `--repeats` calls, CUDA events around each. Bandwidth: the fewest
bytes the operation must move (the codes, half a byte per weight, the int8 block maxima and the bf16 output, two
bytes per weight) over the median time. Every output is compared with the eager reference first.
Writes <name>.json (every number, provenance) and <name>.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from optrush.bench.provenance import provenance, provenance_line, write_result
from optrush.kernels import nf4
from optrush.peft.quant import compiled_dequantize, quantize_weight

SHAPES = {"q_proj / o_proj": (4096, 4096), "k_proj / v_proj": (1024, 4096), "gate_proj / up_proj": (14336, 4096),
          "down_proj": (4096, 14336)}
ROTATE = 4


def median_ms(fn, weights, *, repeats: int, device: torch.device) -> float:
    for w in weights:  # warm-up, compilation included
        fn(w)
    times = []
    for i in range(repeats):
        w = weights[i % len(weights)]
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(w)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn(w)
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def paths(device: torch.device) -> dict:
    dtype = torch.bfloat16
    out = {"eager reference": lambda q: q.dequantize(dtype)}
    if device.type == "cuda":  # (Inductor on CPU would need a C++ toolchain for the smoke run)
        out["compiled reference"] = lambda q: compiled_dequantize("nf4")(q.shape, dtype, *q.stored())
    if nf4.available(device):
        out["triton kernel"] = lambda q: nf4.nf4_dequantize_triton(*q.stored(), *q.shape, dtype)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="dequantize_h100")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run with small shapes")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.tiny else "cuda")
    shapes = {name: (r // 64, c // 64) if args.tiny else (r, c) for name, (r, c) in SHAPES.items()}
    rows = []
    for name, shape in shapes.items():
        weights = [quantize_weight(torch.randn(shape, device=device), method="nf4") for _ in range(ROTATE)]
        numel = shape[0] * shape[1]
        min_bytes = numel // 2 + numel // 64 + 2 * numel
        reference = weights[0].dequantize(torch.bfloat16)
        for path, fn in paths(device).items():
            max_diff = (fn(weights[0]).float() - reference.float()).abs().max().item()
            ms = median_ms(fn, weights, repeats=args.repeats, device=device)
            rows.append({"weight": name, "shape": list(shape), "path": path, "ms": round(ms, 4),
                         "gb_per_s": round(min_bytes / ms / 1e6, 1), "max_abs_diff_vs_eager": max_diff})
            print(rows[-1], flush=True)
    record = {"provenance": provenance(), "repeats": args.repeats, "rotate": ROTATE, "results": rows}
    write_result(record, markdown(record), out=args.out, name=args.name)
    return record


def markdown(record: dict) -> str:
    lines = ["# NF4 dequantization to bf16, 8B weight shapes", "",
             provenance_line(record['provenance']),
             f"- median of {record['repeats']} calls, {record['rotate']} weights of each shape in turn", "",
             "| weight | shape | path | ms | GB/s (minimal bytes) | max abs diff vs eager |",
             "|---|---|---|---:|---:|---:|"]
    for r in record["results"]:
        lines.append(f"| {r['weight']} | {r['shape'][0]} x {r['shape'][1]} | {r['path']} | {r['ms']:.4f} | "
                     f"{r['gb_per_s']:,.0f} | {r['max_abs_diff_vs_eager']:.3g} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(sys.argv[1:])
