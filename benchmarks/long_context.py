"""Issue #12 GPU benchmark: the longest context that trains on one GPU (or a context-parallel pair), and its speed.

    python benchmarks/long_context.py --scenarios 8b_qlora,1b_full --out benchmarks/results   # one GPU
    python benchmarks/long_context.py --scenarios 8b_qlora --lengths 32768,409600              # just these lengths
    python benchmarks/long_context.py --scenarios 8b_full_cp2 --lengths 262144 --warmup 0 \
        --name long_context_cp_h200 --out /tmp/res                                             # 2 x H200
    # (add --logs /tmp/res/logs to keep each try's log: both ranks' output, under torchrun)
    python benchmarks/long_context.py --smoke                                                  # CPU, debug model

Scenarios (random init, synthetic tokens, batch 1, `optrush.bench.max_context`: every try in its own process):
- `8b_qlora`: Llama-3.1-8B shape, QLoRA (NF4 base, LoRA r=32 on all linear layers), bf16. Target (issue #12):
  >= 400,000 tokens on an 80 GB H100, tokens/s at 32k and at the maximum.
- `1b_full`: Llama-3.2-1B shape, full fine-tune, bf16 weights and AdamW states: the largest context and its tokens/s.
- `8b_full_cp2`: Llama-3.1-8B shape, full fine-tune, context parallel over 2 GPUs (ring attention, zigzag layout)
  with FSDP2 sharding weights, gradients and AdamW states over the same 2 ranks; each try runs under torchrun.
  Target (issue #12): >= 256k tokens on 2 x H200, throughput reported. No activation offload: at 256k each GPU
  keeps 32 layers x 128k tokens x 4096 x bf16 = 32 GiB of block inputs, besides ~32 GiB of sharded weights,
  gradients and AdamW states, well within 141 GB.
All use the long-context memory stack: full activation checkpointing (the one-GPU scenarios offload the block
inputs to pinned CPU memory, async), the MLP in checkpointed chunks, the chunked fused cross-entropy, causal flash
attention (SDPA; ring attention's per-block flash kernels under context parallelism).

Without `--lengths`, the search doubles from `--start` up to `--limit` and bisects to `--multiple` tokens; every
try runs `--warmup` (default 1) untimed + 1 timed step and counts as not fitting when it runs out of memory or past
`--try-timeout-s`; the search also times `speed_at` (32k; 256k for `8b_full_cp2`) when it did not try it. With
`--lengths`, a try that fails for another reason than memory is recorded as failed and the script exits 1. With `--warmup 0` the one step is
timed with its warm-up (allocator, CUDA libraries; no compile in these configs), a few seconds against minutes.
Time: attention FLOPs grow with the square of the length (at 400k tokens of the 8B shape one step is roughly
2 x 4 x 32 layers x 4096 x 400k^2 / 2 ~ 1e17 FLOPs forward + recompute + backward), so long tries take minutes;
`--budget-s` stops starting new tries when the time is spent. Output: `long_context_<gpu>.json` (every try,
provenance included) and `.md`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's optrush, installed or not

from optrush.bench.max_context import find_max_context, subprocess_try  # noqa: E402
from optrush.bench.provenance import provenance_line  # noqa: E402
from optrush.config import load_config  # noqa: E402

CHUNKED = ["activations.checkpointing=full", "activations.mlp_chunk_tokens=8192", "kernels.fused_loss=true",
           "kernels.loss_chunk_tokens=8192", "objective=causal_lm", "train.lr=1e-5", "train.schedule=constant",
           "train.warmup_steps=0", "train.max_steps=1000", "output_dir=/tmp/optrush-long-context"]
LEAN = ["activations.offload=true", *CHUNKED]
# ring attention over whole rows (no packing: synthetic rows are full anyway), FSDP2 over the same ranks
CONTEXT_PARALLEL = ["parallel.strategy=fsdp", "context.degree=2", "context.layout=zigzag", "data.packing=none"]
QLORA = ["peft.method=lora", "peft.r=32", "peft.alpha=32", "peft.target_modules=all-linear", "peft.quantize=nf4"]
SCENARIOS = {
    "8b_qlora": dict(title="Llama-3.1-8B shape, QLoRA NF4 r=32 all-linear, batch 1",
                     overrides=["model.preset=llama3.1-8b", "precision.mode=bf16_pure", "train.device=cuda",
                                *QLORA, *LEAN],
                     start=32768, limit=1 << 20, multiple=16384, speed_at=32768),
    "1b_full": dict(title="Llama-3.2-1B shape, full fine-tune (bf16 weights and AdamW states), batch 1",
                    overrides=["model.preset=llama3.2-1b", "precision.mode=bf16_pure", "train.device=cuda", *LEAN],
                    start=32768, limit=1 << 20, multiple=16384, speed_at=32768),
    "8b_full_cp2": dict(title="Llama-3.1-8B shape, full fine-tune, context parallel over 2 GPUs (ring attention), "
                              "batch 1",
                        overrides=["model.preset=llama3.1-8b", "precision.mode=bf16_pure", "train.device=cuda",
                                   *CONTEXT_PARALLEL, *CHUNKED],
                        start=65536, limit=1 << 20, multiple=16384, speed_at=262144, nproc=2),
}
# --smoke: the same scenarios on the debug model on CPU (offload runs without streams; context parallelism as 2
# gloo processes), to check this script
SMOKE = ["model.preset=debug", "precision.mode=fp32", "train.device=cpu", "activations.mlp_chunk_tokens=32",
         "kernels.loss_chunk_tokens=32"]


def run_scenario(name: str, spec: dict, *, lengths: list[int] | None, budget_s: float, try_timeout_s: float,
                 warmup: int, smoke: bool, logs: Path | None) -> dict:
    overrides = spec["overrides"] + (SMOKE if smoke else [])
    start, limit, multiple, speed_at = ((64, 256, 64, 128) if smoke else
                                        (spec["start"], spec["limit"], spec["multiple"], spec["speed_at"]))
    cfg = load_config(None, overrides, synthetic_data=True)
    deadline = time.monotonic() + budget_s
    if logs is not None:
        logs = logs / name
        logs.mkdir(parents=True, exist_ok=True)
    one_try = subprocess_try(cfg, warmup=warmup, steps=1, timeout_s=try_timeout_s, logs=logs,
                             nproc=spec.get("nproc", 1))

    def budgeted(length: int) -> dict:
        if time.monotonic() > deadline:
            return {"fits": False, "reason": "not tried: --budget-s spent"}
        return one_try(length)

    record = {"scenario": name, "title": spec["title"], "overrides": overrides, "warmup": warmup,
              "nproc": spec.get("nproc", 1)}
    if lengths:
        record["tries"] = [{"length": n, **recorded(budgeted, n)} for n in lengths]
        fitting = [t for t in record["tries"] if t["fits"]]
        record["max_length"] = max((t["length"] for t in fitting), default=None)
        record["search"] = False
    else:
        record.update(find_max_context(cfg, start=start, limit=limit, multiple=multiple, try_length=budgeted))
        record["search"] = True
        if not any(t["length"] == speed_at for t in record["tries"]):
            record["tries"].append({"length": speed_at, **budgeted(speed_at)})
    return record


def recorded(one_try, length: int) -> dict:
    """A given length's try; one that fails for another reason than memory is recorded as `failed` (the search
    stops on it instead: a broken config must not pass for a short context)."""
    try:
        return one_try(length)
    except RuntimeError as err:
        return {"fits": False, "failed": True, "reason": str(err)}


def markdown(records: list[dict]) -> str:
    lines = ["# Long context: largest trainable sequence, and its speed", ""]
    provenance = None
    for r in records:
        tries = sorted(r["tries"], key=lambda t: t["length"])
        best = next((t for t in tries if t["length"] == r["max_length"]), None)
        lines += [f"## {r['title']}", "",
                  f"Largest length that trained: **{r['max_length'] or 'none'}** tokens"
                  + (f", {best['tokens_per_s']:,.0f} tokens/s, {best['peak_mem_gib']:.1f} GiB peak" if best else "")
                  + (" (the search limit)" if r.get("reached_limit") else "")
                  + ("" if r["search"] else " (of the lengths given; no search)"), "",
                  "| length | trains | tokens/s | peak GiB | step s | note |", "|---|---|---|---|---|---|"]
        for t in tries:
            if t["fits"]:
                lines.append(f"| {t['length']:,} | yes | {t['tokens_per_s']:,.0f} | {t['peak_mem_gib']:.1f} | "
                             f"{t['step_s']:.1f} | |")
                provenance = provenance or (t["device"], t["provenance"])
            else:
                lines.append(f"| {t['length']:,} | no | | | | {t.get('reason', '')[:140]} |")
        lines += ["", "overrides: `" + " ".join(r["overrides"]) + "`", ""]
        if r.get("nproc", 1) > 1:
            lines += [f"{r['nproc']} processes (one per GPU) under torchrun; tokens/s counts each token of the row "
                      "once; peak memory is rank 0's", ""]
    if provenance:
        device, p = provenance
        lines += [provenance_line(p, device),
                  "- each try: its own process, one row of synthetic uniform tokens (every token trained), "
                  f"{', '.join(sorted({str(r['warmup']) for r in records}))} warm-up "
                  "+ 1 timed optimizer step; tokens/s = length / timed step time; peak = PyTorch's peak "
                  "allocated GPU memory (host memory for offloaded activations is not included)"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", default=None,
                        help=f"comma-separated: {', '.join(SCENARIOS)} (default: those this machine has the GPUs for; "
                             "all with --smoke)")
    parser.add_argument("--lengths", default=None, help="comma-separated lengths to try instead of searching")
    parser.add_argument("--budget-s", type=float, default=1500, help="per scenario: no new try after this")
    parser.add_argument("--try-timeout-s", type=float, default=540, help="a try running longer does not fit")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed steps per try; 0 times the first step (warm-up included), for tries of minutes")
    parser.add_argument("--name", default=None, help="output file stem (default: long_context_<gpu>)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--logs", default=None, help="keep every try's log under LOGS/<scenario>/ (default: a "
                                                     "temporary directory)")
    parser.add_argument("--smoke", action="store_true", help="debug model on CPU, tiny lengths: checks the script")
    args = parser.parse_args()
    gpus = torch.cuda.device_count()
    names = args.scenarios.split(",") if args.scenarios else \
        [n for n, spec in SCENARIOS.items() if args.smoke or spec.get("nproc", 1) <= max(gpus, 1)]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    short = [n for n in names if not args.smoke and SCENARIOS[n].get("nproc", 1) > gpus]
    if short:
        parser.error(f"scenario(s) {short} need {max(SCENARIOS[n].get('nproc', 1) for n in short)} GPUs; {gpus} visible")
    lengths = [int(n) for n in args.lengths.split(",")] if args.lengths else None
    if args.smoke and lengths:
        lengths = [min(n, 256) for n in lengths]
    records = [run_scenario(n, SCENARIOS[n], lengths=lengths, budget_s=args.budget_s,
                            try_timeout_s=args.try_timeout_s, warmup=args.warmup, smoke=args.smoke,
                            logs=Path(args.logs) if args.logs else None) for n in names]
    device = next((t["device"] for r in records for t in r["tries"] if t["fits"]), "none")
    stem = args.name or "long_context_" + ("smoke" if args.smoke else device.lower().replace("nvidia ", "").split()[0])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    (out / f"{stem}.md").write_text(markdown(records), encoding="utf-8")
    print(markdown(records))
    print(f"wrote {out / stem}.json and .md")
    return 1 if any(t.get("failed") for r in records for t in r["tries"]) else 0


if __name__ == "__main__":
    sys.exit(main())
