"""Issue #8 GPU benchmark: FSDP2 scaling from 1 to 2 GPUs, and a 70B-shape QLoRA fine-tune on 2 GPUs.

    python benchmarks/fsdp_scaling.py --out benchmarks/results            # on nvidia-h200-x2
    python benchmarks/fsdp_scaling.py --smoke --out /tmp/fsdp_smoke        # CPU, 2 gloo processes, debug model

Runs (each a fresh `torchrun --standalone --nproc-per-node N` of this script, every rank timing the training
loop's own step through `optrush.bench.run.bench`, rank 0 writing the result):
- `8b_fsdp_1gpu` / `8b_fsdp_2gpu`: Llama-3.1-8B shape, random init, full fine-tune, S=4096, one row per GPU per
  step (the same per-GPU batch), `precision.mode=bf16_pure` (bf16 weights and AdamW states: the 8B model's
  weights, gradients and optimizer fit one H200 only so), compiled blocks, fused loss, full activation
  checkpointing, `parallel.strategy=fsdp` on both (FSDP2 at degree 1 is the single-GPU path, so the only change
  is the second GPU). Target: 2-GPU tokens/s >= 1.9x the 1-GPU tokens/s. MFU is per GPU.
- `8b_fsdp_2gpu_zero2`: the same with `parallel.reshard_after_forward=false` (no second all-gather in backward).
- `70b_qlora_fsdp_2gpu`: Llama-3.1-70B shape, LoRA r=16 on all linears over an NF4 base
  (`peft.quantize=nf4`), bf16_mixed, S=4096, FSDP2 on 2 GPUs; peak memory per GPU and tokens/s.
  The NF4 codes are frozen parameters that FSDP2 shards (each GPU holds half of the ~36 GB quantized base), and
  the random-init preset is quantized block by block as it is built (`build_model(..., quantize=...)`), so no GPU
  ever holds the 140 GB bf16 model.

Output: `fsdp_scaling_<gpu>.json` (every field of every run, provenance included) and `.md` (the table and the
2-GPU / 1-GPU ratio). NCCL_NVLS_ENABLE=0 is set for every run (NVLink SHARP multicast is off on the lent machines).
`--smoke` runs the same configs on the debug model with 2 gloo processes on CPU in about a minute, to check
this script itself (its numbers mean nothing).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["objective=causal_lm", "train.lr=1e-5", "train.schedule=constant", "train.max_steps=1000",
          "train.micro_batch_size=1", "parallel.strategy=fsdp", "output_dir=/tmp/optrush-fsdp-bench"]
GPU = COMMON + ["train.device=cuda", "data.max_length=4096", "compile.mode=blocks", "kernels.fused_loss=true",
                "activations.checkpointing=full"]
FULL_8B = GPU + ["model.preset=llama3.1-8b", "precision.mode=bf16_pure"]
QLORA_70B = GPU + ["model.preset=llama3.1-70b", "precision.mode=bf16_mixed", "peft.method=lora", "peft.r=16",
                   "peft.quantize=nf4"]
# --smoke: the debug model on CPU; compile off (inductor's CPU C++ build would dominate)
SMOKE = COMMON + ["train.device=cpu", "data.max_length=64", "model.preset=debug", "precision.mode=fp32"]
# (name, processes, overrides), in the order they run
RUNS = [
    ("8b_fsdp_1gpu", 1, FULL_8B),
    ("8b_fsdp_2gpu", 2, FULL_8B),
    ("8b_fsdp_2gpu_zero2", 2, FULL_8B + ["parallel.reshard_after_forward=false"]),
    ("70b_qlora_fsdp_2gpu", 2, QLORA_70B),
]
SMOKE_RUNS = [
    ("debug_fsdp_1proc", 1, SMOKE),
    ("debug_fsdp_2proc", 2, SMOKE),
    ("debug_fsdp_2proc_zero2", 2, SMOKE + ["parallel.reshard_after_forward=false"]),
    ("debug_qlora_fsdp_2proc", 2, SMOKE + ["peft.method=lora", "peft.r=4", "peft.quantize=nf4"]),
]


def rejected(overrides: list[str]) -> str | None:
    """Why the config is rejected at load (checked here, before starting any process), or None."""
    from optrush.config import ConfigError, load_config  # no torch: the launching process stays light

    try:
        load_config(None, overrides, synthetic_data=True)
    except ConfigError as err:
        return str(err)
    return None


def run_child(name: str, overrides: list[str], *, warmup: int, steps: int, result_path: str) -> None:
    """On every rank (under torchrun): time the config; rank 0 writes the result (or the error) as JSON."""
    from optrush.bench.run import bench
    from optrush.config import load_config

    rank = int(os.environ.get("RANK", "0"))
    try:
        result = bench(load_config(None, overrides, synthetic_data=True), synthetic=True, warmup=warmup,
                       steps=steps, name=name)
    except Exception as err:  # noqa: BLE001 - a failing run (out of memory) is a result too
        result = {"name": name, "error": f"{type(err).__name__}: {err}"[:2000]}
        if rank == 0:
            Path(result_path).write_text(json.dumps(result), encoding="utf-8")
        raise
    if rank == 0:
        Path(result_path).write_text(json.dumps(result), encoding="utf-8")


def run_config(name: str, nproc: int, overrides: list[str], *, warmup: int, steps: int, timeout_s: float) -> dict:
    why = rejected(overrides)
    if why is not None:
        return {"name": name, "nproc": nproc, "overrides": overrides, "skipped": why}
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        path = handle.name
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               __file__, "--child", name, "--child-overrides", json.dumps(overrides), "--warmup", str(warmup),
               "--steps", str(steps), "--result", path]
    # NVLS (NVLink SHARP multicast) stays off on the lent machines; the children import this checkout's optrush
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=ROOT, env=env, timeout=timeout_s, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        os.unlink(path)
        return {"name": name, "nproc": nproc, "overrides": overrides, "error": f"timed out after {timeout_s:.0f}s"}
    sys.stdout.write(proc.stdout[-2000:] + proc.stderr[-2000:])
    text = Path(path).read_text(encoding="utf-8") if Path(path).stat().st_size else ""
    os.unlink(path)
    if not text:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no output"
        return {"name": name, "nproc": nproc, "overrides": overrides,
                "error": f"exit code {proc.returncode}: {last}"}
    return {**json.loads(text), "nproc": nproc, "overrides": overrides, "wall_s": time.perf_counter() - started}


def scaling(results: list[dict], *, one: str, two: str) -> float | None:
    """tokens/s of run `two` over run `one` (None when either failed)."""
    by_name = {r["name"]: r for r in results if "tokens_per_s" in r}
    if one in by_name and two in by_name:
        return by_name[two]["tokens_per_s"] / by_name[one]["tokens_per_s"]
    return None


def markdown(results: list[dict], *, ratio: float | None, warmup: int, steps: int, smoke: bool) -> str:
    title = "FSDP2 scaling (smoke: debug model, CPU gloo)" if smoke else \
        "FSDP2 scaling: Llama-3.1-8B shape full fine-tune 1 -> 2 GPUs; 70B-shape QLoRA on 2 GPUs"
    lines = [f"# {title}", "", "| run | GPUs | tokens/s (all GPUs) | tokens/s per GPU | MFU per GPU | "
             "peak GiB (rank 0) | first step s | loss |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "tokens_per_s" in r:
            mfu = f"{r['mfu']:.3f}" if r.get("mfu") is not None else "n/a"
            lines.append(f"| {r['name']} | {r['nproc']} | {r['tokens_per_s']:,.0f} | "
                         f"{r['tokens_per_s'] / r['nproc']:,.0f} | {mfu} | {r['peak_mem_gib']:.1f} | "
                         f"{r['time_to_first_step_s']:.1f} | {r['loss']:.3f} |")
        else:
            status, why = ("skipped", r["skipped"]) if "skipped" in r else ("failed", r["error"])
            lines.append(f"| {r['name']} | {r['nproc']} | {status}: {why.strip().splitlines()[-1][:160]} "
                         "| | | | | |")
    lines += ["", f"- 2-GPU / 1-GPU tokens/s at the same per-GPU batch: "
              f"{'n/a' if ratio is None else f'{ratio:.3f}x'} (target >= 1.9x)"]
    measured = [r for r in results if "provenance" in r]
    if measured:
        p, first = measured[0]["provenance"], measured[0]
        from optrush.bench.provenance import provenance_line

        lines += [provenance_line(p, first["device"]),
                  f"- each run: its own torchrun, {warmup} warm-up steps (the first compiles) then {steps} timed "
                  "steps, one repeat; synthetic uniform tokens, one row of S tokens per GPU per step; "
                  "NCCL_NVLS_ENABLE=0",
                  "- MFU = per-GPU tokens/s x (6 x params + 6 x layers x S x hidden) / the GPU's dense bf16 peak "
                  "(optrush.bench.run)"]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results", help="directory for the JSON and markdown results")
    ap.add_argument("--smoke", action="store_true", help="debug model, 2 gloo processes on CPU")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default: 3; smoke 1)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: 8; smoke 2)")
    ap.add_argument("--only", nargs="+", default=None, help="run only these names")
    ap.add_argument("--timeout-s", type=float, default=900, help="per run (default: 900)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-overrides", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    warmup = args.warmup or (1 if args.smoke else 3)
    steps = args.steps or (2 if args.smoke else 8)
    if args.child:
        run_child(args.child, json.loads(args.child_overrides), warmup=warmup, steps=steps, result_path=args.result)
        return 0

    runs = [run for run in (SMOKE_RUNS if args.smoke else RUNS) if args.only is None or run[0] in args.only]
    results = []
    for name, nproc, overrides in runs:
        print(f"== {name} ({nproc} process{'es' if nproc > 1 else ''})", flush=True)
        results.append(run_config(name, nproc, overrides, warmup=warmup, steps=steps, timeout_s=args.timeout_s))
    one, two = (runs[0][0], runs[1][0]) if len(runs) > 1 else (None, None)
    ratio = scaling(results, one=one, two=two)
    device = next((r["device"] for r in results if "device" in r), "unknown")
    slug = "cpu_smoke" if args.smoke else device.lower().replace("nvidia ", "").split()[0].replace("-", "_")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": "fsdp_scaling", "smoke": args.smoke, "scaling_2_over_1": ratio, "target": 1.9,
              "warmup": warmup, "steps": steps, "runs": results}
    (out / f"fsdp_scaling_{slug}.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    (out / f"fsdp_scaling_{slug}.md").write_text(markdown(results, ratio=ratio, warmup=warmup, steps=steps,
                                                          smoke=args.smoke), encoding="utf-8")
    print(markdown(results, ratio=ratio, warmup=warmup, steps=steps, smoke=args.smoke))
    print(f"wrote {out / f'fsdp_scaling_{slug}.json'} and .md")
    return 0 if all("tokens_per_s" in r or "skipped" in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
