"""GPU measurements that test `optrush plan` beyond the 1B ladder: other shapes, sequence lengths, micro-batches,
precisions, optimizers, LoRA/QLoRA and long context, each measured by `optrush bench` in its own process.

    python benchmarks/plan_validation.py                       # all configs on the GPU (about 15-25 minutes)
    python benchmarks/plan_validation.py --only 8b qwen        # those whose name contains a word (split runs)
    python benchmarks/plan_validation.py --smoke               # two debug-model configs on CPU: checks the script

Each run appends its bench records (full config, tokens/s, peak memory) to
`benchmarks/results/plan_validation_<gpu>.json`, replacing records of the same name, and prints predicted vs
measured. `python benchmarks/plan_accuracy.py` then includes every record of that file in the committed
comparison. A config that fails (out of memory, a missing optional package such as torchao) is stored with its
error and is not compared. The configs are fixed in advance (not chosen after seeing predictions).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["objective=causal_lm", "train.lr=1e-5", "train.schedule=constant", "train.max_steps=1000",
          "train.device=cuda", "output_dir=/tmp/optrush-plan-validation"]
FAST = ["compile.mode=blocks", "kernels.fused_loss=true"]


def cfg(preset: str, seq: int, rows: int, precision: str, *extra: str) -> list[str]:
    return [f"model.preset={preset}", f"data.max_length={seq}", f"train.micro_batch_size={rows}",
            f"precision.mode={precision}", *extra]


LORA = ["peft.method=lora", "peft.r=16"]
QLORA = [*LORA, "peft.quantize=nf4"]
# (name, overrides): every lever the memory model has a term for, on shapes other than the ladder's
CONFIGS: list[tuple[str, list[str]]] = [
    ("qwen2.5-0.5b eager 8x1024", cfg("qwen2.5-0.5b", 1024, 8, "bf16_pure")),
    ("qwen2.5-0.5b mixed compile fused 8x2048", cfg("qwen2.5-0.5b", 2048, 8, "bf16_mixed", *FAST)),
    ("qwen3-0.6b compile_model fused 16x1024", cfg("qwen3-0.6b", 1024, 16, "bf16_pure", "compile.mode=model",
                                                   "kernels.fused_loss=true")),
    ("1b fp32 eager 2x1024", cfg("llama3.2-1b", 1024, 2, "fp32")),
    ("1b mixed selective 8x2048", cfg("llama3.2-1b", 2048, 8, "bf16_mixed", *FAST,
                                      "activations.checkpointing=selective")),
    ("1b adamw8bit 4x2048", cfg("llama3.2-1b", 2048, 4, "bf16_pure", *FAST, "optim.name=adamw8bit")),
    ("1b lion 4x4096", cfg("llama3.2-1b", 4096, 4, "bf16_pure", *FAST, "optim.name=lion")),
    ("1b adafactor eager fused 4x2048", cfg("llama3.2-1b", 2048, 4, "bf16_pure", "kernels.fused_loss=true",
                                            "optim.name=adafactor")),
    ("1b mlp chunks full 1x8192", cfg("llama3.2-1b", 8192, 1, "bf16_pure", *FAST, "activations.checkpointing=full",
                                      "activations.mlp_chunk_tokens=2048")),
    ("3b full every 2 4x4096", cfg("llama3.2-3b", 4096, 4, "bf16_pure", *FAST, "activations.checkpointing=full",
                                   "activations.every=2")),
    ("3b lora 4x2048", cfg("llama3.2-3b", 2048, 4, "bf16_pure", *FAST, *LORA)),
    ("8b lora full 2x2048", cfg("llama3.1-8b", 2048, 2, "bf16_pure", *FAST, *LORA, "activations.checkpointing=full")),
    ("8b qlora full 4x2048", cfg("llama3.1-8b", 2048, 4, "bf16_pure", *FAST, *QLORA,
                                 "activations.checkpointing=full")),
    ("8b qlora eager 1x4096", cfg("llama3.1-8b", 4096, 1, "bf16_pure", *QLORA, "activations.checkpointing=full")),
    ("mistral-7b lora selective 1x4096", cfg("mistral-7b-v0.3", 4096, 1, "bf16_pure", *FAST, *LORA,
                                             "activations.checkpointing=selective")),
]
SMOKE_COMMON = ["objective=causal_lm", "train.device=cpu", "output_dir=/tmp/optrush-plan-validation"]
SMOKE = [("debug eager 2x64", cfg("debug", 64, 2, "bf16_pure")),
         ("debug lora 2x64", cfg("debug", 64, 2, "fp32", *LORA, "activations.checkpointing=full"))]


def run_one(name: str, overrides: list[str], *, warmup: int, steps: int, timeout_s: float) -> dict:
    """`optrush bench --synthetic` in a fresh process; its record, or the error."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        path = Path(handle.name)
    command = [sys.executable, "-m", "optrush", "bench", *overrides, "--synthetic", "--warmup", str(warmup),
               "--steps", str(steps), "--name", name, "--json-out", str(path)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run(command, cwd=ROOT, env=env, timeout=timeout_s, capture_output=True, text=True,
                              check=False)
    except subprocess.TimeoutExpired:
        return {"name": name, "overrides": overrides, "error": f"timed out after {timeout_s:.0f}s"}
    text = path.read_text(encoding="utf-8") if path.stat().st_size else ""
    path.unlink()
    if proc.returncode != 0 or not text:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"name": name, "overrides": overrides, "error": f"exit {proc.returncode}: {tail[0][:300]}"}
    record = json.loads(text)
    record = record[0] if isinstance(record, list) else record
    return {**record, "overrides": overrides}


def predicted_gib(record: dict) -> float | None:
    from optrush.plan.memory import estimate_memory
    from optrush.plan.speed import record_setup

    rebuilt = record_setup(record)
    return None if rebuilt is None else estimate_memory(rebuilt[1], rebuilt[2]).peak_gib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None, help="run configs whose name contains one of these")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--timeout-s", type=float, default=300.0, help="per config (default: 300)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--smoke", action="store_true", help="debug configs on CPU, written under /tmp")
    args = parser.parse_args()
    configs, common = (SMOKE, SMOKE_COMMON) if args.smoke else (CONFIGS, COMMON)
    chosen = [(n, o) for n, o in configs if args.only is None or any(word in n for word in args.only)]
    results = []
    for name, overrides in chosen:
        print(f"== {name}", flush=True)
        results.append(run_one(name, [*common, *overrides], warmup=args.warmup, steps=args.steps,
                               timeout_s=args.timeout_s))
        result = results[-1]
        if "error" in result or result.get("status", "ok") != "ok":
            print(f"   failed: {result.get('error') or result.get('reason')}", flush=True)
        else:
            predicted = predicted_gib(result)
            shown = "n/a" if predicted is None else f"{predicted:.2f}"
            print(f"   measured {result['peak_mem_gib']:.2f} GiB, predicted {shown} GiB, "
                  f"{result['tokens_per_s']:,.0f} tokens/s", flush=True)
    device = next((r["device"] for r in results if "device" in r), "unknown")
    tag = "cpu" if args.smoke else device.replace("NVIDIA ", "").split()[0].lower()
    out = Path("/tmp" if args.smoke else args.out) / f"plan_validation_{tag}.json"
    old = json.loads(out.read_text(encoding="utf-8")) if out.exists() else []
    names = {r["name"] for r in results}
    out.write_text(json.dumps([r for r in old if r["name"] not in names] + results, indent=1) + "\n",
                   encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
