"""Issue #5 GPU benchmark: optrush training speed and memory on the Llama-3.2-1B shape against plain HF.

    python benchmarks/train_speed.py --hf-baseline .shared_gpu/baseline-hf.py --out benchmarks/results
    python benchmarks/train_speed.py --shape 8b          # Llama-3.1-8B shape, S=4096: bf16 vs FP8 (one H200)

Llama-3.2-1B architecture, random init, B=4 rows x S=2048 synthetic tokens, full fine-tune, bf16 weights and
AdamW states (`precision.mode=bf16_pure`, as the HF baseline: bf16 model, fused AdamW), one GPU. Each config runs
`optrush.bench.run.bench` (the training loop's own step) in its own subprocess, so peak memory and compile caches
of one cannot leak into the next. The HF baseline script runs first, in the same command, on the same GPU. Output:
`train_speed_<gpu>.json` (every field, provenance included) and `.md` (the table, ratios over the best HF variant).

`--shape 8b`: the Llama-3.1-8B shape, B=1 x S=4096, full checkpointing, compiled blocks, fused loss; bf16 autocast
and FP8 (`precision.mode=fp8`, torchao float8 on the block linears), both over fp32 master weights with 8-bit
AdamW (what fits one H200), so the FP8 / bf16 ratio compares the matmul precision alone; then pure bf16 with
AdamW, without and with float8 matmuls (`fp8_pure`). Written to `train_speed_8b_<gpu>.json` / `.md`.

A config whose feature is not available (its config key rejected, or torchao missing for fp8) is reported as
skipped; one that fails (e.g. out of memory) as failed; configs left when `--budget-s` runs out are not started.
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
BASE = ["model.preset=llama3.2-1b", "precision.mode=bf16_pure", "train.micro_batch_size=4", "data.max_length=2048",
        "train.device=cuda", "objective=causal_lm", "train.lr=1e-5", "train.schedule=constant",
        "train.max_steps=1000", "output_dir=/tmp/optrush-bench"]
# --smoke: the same configs on the debug model on CPU in seconds, to check this script itself
SMOKE = ["model.preset=debug", "precision.mode=fp32", "train.micro_batch_size=2", "data.max_length=64",
         "train.device=cpu", "objective=causal_lm", "train.max_steps=1000", "output_dir=/tmp/optrush-bench"]
COMPILED = ["compile.mode=blocks"]
FUSED = COMPILED + ["kernels.fused_loss=true"]
# (name, overrides on top of BASE), in order of priority: later ones are dropped first when time runs out
CONFIGS: list[tuple[str, list[str]]] = [
    ("eager", []),
    ("compile", COMPILED),
    ("compile+fused_loss", FUSED),
    ("compile+fused_loss+ac_full", FUSED + ["activations.checkpointing=full"]),
    ("memory_lean (ac_full+offload)", FUSED + ["activations.checkpointing=full", "activations.offload=true"]),
    ("compile+fused_loss+fused_ops", FUSED + ["kernels.fused_ops=true"]),
    ("compile+fused_loss+ac_selective", FUSED + ["activations.checkpointing=selective"]),
    ("fp8+compile+fused_loss", FUSED + ["precision.mode=fp8"]),
    ("fp8_pure+compile_model+fused_loss", ["precision.mode=fp8_pure", "compile.mode=model", "kernels.fused_loss=true"]),
    ("compile_model+fused_loss", ["compile.mode=model", "kernels.fused_loss=true"]),
    ("compile_model+fused_loss+ac_selective", ["compile.mode=model", "kernels.fused_loss=true",
                                               "activations.checkpointing=selective"]),
    ("compile_model+fused_loss+ac_selective+adamw8bit", ["compile.mode=model", "kernels.fused_loss=true",
                                                         "activations.checkpointing=selective",
                                                         "optim.name=adamw8bit"]),
    # the compiled graph recomputes what is cheapest until its saved activations fit the fraction
    *[(f"compile_model+fused_loss+budget{budget}", ["compile.mode=model", "kernels.fused_loss=true",
                                                     f"compile.memory_budget={budget}"])
      for budget in (0.5, 0.3, 0.1)],
    *[(f"compile_model+fused_loss+budget{budget}+adamw8bit", ["compile.mode=model", "kernels.fused_loss=true",
                                                               f"compile.memory_budget={budget}",
                                                               "optim.name=adamw8bit"])
      for budget in (0.5, 0.3)],
    # the same 4 rows per optimizer step as micro-batches of 2 or 1 (exact accumulation): a half or a quarter of
    # the activations, for smaller matmuls and the accumulation's extra passes over the gradients
    *[(f"compile_model+fused_loss+mb{rows}x{4 // rows}", ["compile.mode=model", "kernels.fused_loss=true",
                                                          f"train.micro_batch_size={rows}",
                                                          f"train.grad_accum={4 // rows}"])
      for rows in (2, 1)],
    # more rows a micro-batch than issue #5's 4 (more tokens a step): `optrush plan`'s picks for this shape (H100: 16,
    # H200: 32)
    *[(f"compile_model+fused_loss+mb{rows}x1", ["compile.mode=model", "kernels.fused_loss=true",
                                                f"train.micro_batch_size={rows}"])
      for rows in (8, 16, 32)],
    # the same with float8 block matmuls: the planner's pick for this shape on an H100, and the 4 rows as micro-batches
    # of 1 (the same gradient)
    ("fp8_pure+compile_model+fused_loss+mb16x1", ["precision.mode=fp8_pure", "compile.mode=model",
                                                  "kernels.fused_loss=true", "train.micro_batch_size=16"]),
    ("fp8_pure+compile_model+fused_loss+mb1x4", ["precision.mode=fp8_pure", "compile.mode=model",
                                                 "kernels.fused_loss=true", "train.micro_batch_size=1",
                                                 "train.grad_accum=4"]),
    ("compile_model+fused_loss+varlen+mb16x1", ["compile.mode=model", "kernels.fused_loss=true",
                                                "model.attention=varlen", "train.micro_batch_size=16"]),
    ("compile_model+fused_loss+mb1x4+adamw8bit", ["compile.mode=model", "kernels.fused_loss=true",
                                                  "train.micro_batch_size=1", "train.grad_accum=4",
                                                  "optim.name=adamw8bit"]),
    # varlen on unpacked rows: one document per row, FlashAttention's varlen kernel instead of cuDNN's SDPA
    ("compile_model+fused_loss+varlen", ["compile.mode=model", "kernels.fused_loss=true", "model.attention=varlen"]),
    ("compile+fused_loss+varlen", FUSED + ["model.attention=varlen"]),
    ("compile_model+fused_loss+varlen+ac_selective", ["compile.mode=model", "kernels.fused_loss=true",
                                                      "model.attention=varlen", "activations.checkpointing=selective"]),
]

BASE_8B = ["model.preset=llama3.1-8b", "train.micro_batch_size=1", "data.max_length=4096", "train.device=cuda",
           "objective=causal_lm", "train.lr=1e-5", "train.schedule=constant", "train.max_steps=1000",
           "output_dir=/tmp/optrush-bench", *FUSED, "activations.checkpointing=full"]
CONFIGS_8B: list[tuple[str, list[str]]] = [
    ("bf16_mixed adamw8bit", ["precision.mode=bf16_mixed", "optim.name=adamw8bit"]),
    ("fp8 adamw8bit", ["precision.mode=fp8", "optim.name=adamw8bit"]),
    ("bf16_pure adamw", ["precision.mode=bf16_pure"]),
    ("fp8_pure adamw", ["precision.mode=fp8_pure"]),
]
SHAPES = {"1b": ("Llama-3.2-1B shape, B=4 x S=2048", BASE, CONFIGS),
          "8b": ("Llama-3.1-8B shape, B=1 x S=4096", BASE_8B, CONFIGS_8B)}


def run_child(name: str, overrides: list[str], *, warmup: int, steps: int, result_path: str) -> None:
    """In the subprocess: one config, its result (or why it did not run) written as JSON to `result_path`."""
    from optrush.bench.run import bench
    from optrush.config import ConfigError, load_config

    try:
        cfg = load_config(None, overrides, synthetic_data=True)
        result = bench(cfg, synthetic=True, warmup=warmup, steps=steps, name=name)
    except ConfigError as err:
        result = {"name": name, "skipped": str(err)}
    except Exception as err:  # noqa: BLE001 - a failing config (out of memory, compile error) is a result too
        result = {"name": name, "error": f"{type(err).__name__}: {err}"[:2000]}
    Path(result_path).write_text(json.dumps(result), encoding="utf-8")


def run_config(name: str, overrides: list[str], *, warmup: int, steps: int, timeout_s: float) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        path = handle.name
    command = [sys.executable, __file__, "--child", name, "--child-overrides", json.dumps(overrides),
               "--warmup", str(warmup), "--steps", str(steps), "--result", path]
    started = time.perf_counter()
    try:
        # the child imports optrush from this checkout, installed or not
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run(command, cwd=ROOT, env=env, timeout=timeout_s, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return {"name": name, "overrides": overrides, "error": f"timed out after {timeout_s:.0f}s"}
    sys.stdout.write(proc.stdout[-3000:] + proc.stderr[-3000:])
    text = Path(path).read_text(encoding="utf-8") if Path(path).stat().st_size else ""
    os.unlink(path)
    if not text:  # the process died before writing (e.g. killed)
        return {"name": name, "overrides": overrides, "error": f"exit code {proc.returncode}: "
                f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no output'}"}
    result = {**json.loads(text), "overrides": overrides}
    result["wall_s"] = time.perf_counter() - started
    return result


def run_hf(script: str, *, variants: str, timeout_s: float) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        path = handle.name
    try:
        proc = subprocess.run([sys.executable, script, "--variants", variants, "--json", path],
                              timeout=timeout_s, capture_output=True, text=True)
        sys.stdout.write(proc.stdout[-3000:] + proc.stderr[-2000:])
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (subprocess.TimeoutExpired, json.JSONDecodeError) as err:
        return {"meta": {}, "rows": [], "error": repr(err)[:500]}
    finally:
        os.unlink(path)


def markdown(results: list[dict], hf: dict, *, warmup: int, steps: int, shape: str = "1b") -> str:
    hf_rows = [r for r in hf.get("rows", []) if "tok_s" in r]
    best_hf = max(hf_rows, key=lambda r: r["tok_s"]) if hf_rows else None
    ours = [r for r in results if "tokens_per_s" in r]
    lines = [f"# Training speed: {SHAPES[shape][0]}, full fine-tune, one GPU", "",
             "| stack | config | tokens/s | MFU | peak GiB | first step s | loss | x best HF |",
             "|---|---|---|---|---|---|---|---|"]
    for row in hf.get("rows", []):
        if "tok_s" in row:
            ratio = row["tok_s"] / best_hf["tok_s"]
            lines.append(f"| HF transformers | {row['variant']} | {row['tok_s']:,} | {row['mfu']:.3f} | "
                         f"{row['peak_gib']:.1f} | | | {ratio:.2f} |")
        else:
            lines.append(f"| HF transformers | {row['variant']} | failed: {row.get('error', '')[:100]} | | | | | |")
    for r in results:
        if "tokens_per_s" in r:
            ratio = f"{r['tokens_per_s'] / best_hf['tok_s']:.2f}" if best_hf else "n/a"
            lines.append(f"| optrush | {r['name']} | {r['tokens_per_s']:,.0f} | {fmt(r['mfu'], '.3f')} | "
                         f"{r['peak_mem_gib']:.1f} | {r['time_to_first_step_s']:.1f} | {r['loss']:.3f} | {ratio} |")
        else:
            why = r.get("skipped") or r.get("error") or "not run"
            status = "skipped" if "skipped" in r else "failed" if "error" in r else "not run"
            lines.append(f"| optrush | {r['name']} | {status}: {why.splitlines()[-1][:150]} | | | | | |")
    lines.append("")
    if ours:
        first = ours[0]
        p = first["provenance"]
        fastest = max(ours, key=lambda r: r["tokens_per_s"])
        leanest = min(ours, key=lambda r: r["peak_mem_gib"])
        lines += [
            f"- device: {first['device']}; torch {p['torch']}, CUDA {p['cuda']}, driver {p['nvidia_driver']}, "
            f"Python {p['python']}, transformers {p['transformers']}; optrush {p['git_sha'] or p['optrush'] or 'unknown'}"
            f"{' (uncommitted changes)' if p['git_dirty'] else ''}; measured {p['timestamp_utc']}",
            f"- each config: its own process, {warmup} warm-up steps (the first compiles: 'first step s') then "
            f"{steps} timed steps, one repeat; HF: 3 warm-up + 8 timed steps (`baseline-hf.py`, same command)",
            f"- model: {first['params']:,} parameters, random init, synthetic uniform tokens (no padding), "
            + ("bf16 weights and AdamW states (fused AdamW)" if shape == "1b" else
               "precision and optimizer as each config's name says (its overrides are in the JSON)")
            + ", grad-norm clipping at 1.0 (HF baseline: none)",
            "- MFU = tokens/s x (6 x params + 6 x layers x S x hidden) / 989e12 (dense bf16 peak; fp8 rows use "
            "1979e12, the FP8 peak), the formula of `baseline-hf.py`",
            f"- fastest: {fastest['name']} ({fastest['tokens_per_s']:,.0f} tokens/s, MFU {fmt(fastest['mfu'], '.3f')}, "
            f"{fastest['peak_mem_gib']:.1f} GiB); least memory: {leanest['name']} ({leanest['peak_mem_gib']:.1f} "
            f"GiB, {leanest['tokens_per_s']:,.0f} tokens/s)",
        ]
        by_name = {r["name"]: r for r in ours}
        pairs = (("fp8 adamw8bit", "bf16_mixed adamw8bit", "fp32 master weights and 8-bit AdamW"),
                 ("fp8_pure adamw", "bf16_pure adamw", "bf16 weights and AdamW states"))
        for fp8_name, bf16_name, alike in pairs:
            if fp8_name in by_name and bf16_name in by_name:
                fp8, bf16 = by_name[fp8_name], by_name[bf16_name]
                lines.append(f"- {fp8_name} / {bf16_name} (same {alike}, same command): "
                             f"{fp8['tokens_per_s'] / bf16['tokens_per_s']:.2f}x the tokens/s, "
                             f"{fp8['peak_mem_gib'] / bf16['peak_mem_gib']:.2f}x the peak memory")
        if best_hf:
            lines.append(f"- best HF: {best_hf['variant']} ({best_hf['tok_s']:,} tokens/s, MFU {best_hf['mfu']}); "
                         f"fastest optrush / best HF = {fastest['tokens_per_s'] / best_hf['tok_s']:.2f}x")
    return "\n".join(lines) + "\n"


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def gpu_tag(results: list[dict]) -> str:
    device = next((r["device"] for r in results if "device" in r), "")
    return next((tag for tag in ("h200", "h100", "a100") if tag in device.lower()), "gpu")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-baseline", help="path to baseline-hf.py (run first, same GPU); omit to skip")
    ap.add_argument("--hf-variants", default="eager,compile")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--only", help="comma-separated config names (default: all)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--budget-s", type=float, default=420, help="start no config after this many seconds")
    ap.add_argument("--smoke", action="store_true", help="debug model on CPU (checks the script, not speed)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b", help="model shape and its configs (default: 1b)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-overrides", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run_child(args.child, json.loads(args.child_overrides), warmup=args.warmup, steps=args.steps,
                  result_path=args.result)
        return 0

    started = time.perf_counter()
    hf = run_hf(args.hf_baseline, variants=args.hf_variants, timeout_s=300) if args.hf_baseline else {"rows": []}
    wanted = set(args.only.split(",")) if args.only else None
    _, base, configs = SHAPES[args.shape]
    base = SMOKE if args.smoke else base
    results = []
    for name, overrides in configs:
        if wanted is not None and name not in wanted:
            continue
        left = args.budget_s - (time.perf_counter() - started)
        if left < 20:
            results.append({"name": name, "overrides": overrides, "skipped": "time budget of the run used up"})
            continue
        print(f"=== {name}: {' '.join(overrides)}", flush=True)
        results.append(run_config(name, base + overrides, warmup=args.warmup, steps=args.steps, timeout_s=left))
        row = results[-1]
        print(json.dumps({k: row.get(k) for k in ("name", "tokens_per_s", "mfu", "peak_mem_gib",
                                                   "time_to_first_step_s", "loss", "error", "skipped")}),
              flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shape_tag = "" if args.shape == "1b" else f"{args.shape}_"
    stem = f"train_speed_{shape_tag}smoke" if args.smoke else f"train_speed_{shape_tag}{gpu_tag(results)}"
    record = {"benchmark": f"issue #5 training speed, {SHAPES[args.shape][0]}", "base_overrides": base,
              "warmup": args.warmup, "steps": args.steps, "hf_baseline": hf, "optrush": results}
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    table = markdown(results, hf, warmup=args.warmup, steps=args.steps, shape=args.shape)
    (out / f"{stem}.md").write_text(table, encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
