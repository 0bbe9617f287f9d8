"""DPO log-probs from full logits vs chunk by chunk (`kernels.fused_loss=true`): peak memory and pairs/s.

    PYTHONPATH=. python benchmarks/dpo_logprobs.py                     # llama3.2-1b shape, 8 pairs/step, GPU
    PYTHONPATH=. python benchmarks/dpo_logprobs.py --smoke --out /tmp  # CPU, debug preset, seconds

The shapes of benchmarks/dpo_packing.py (random tokens, prompt 768 tokens, completions 96 +- 50%, fp32 weights
under bf16 autocast), at 8 pairs per step, where the full-logits path ran out of memory on an H100 (4 pairs/step
already peaked at 32.5 GiB, benchmarks/results/dpo_packing_h100.md). One timed step = forward of policy and frozen
copy reference + backward of the DPO sigmoid loss; warm-up steps (and the chunk's compilation) are excluded. Each
variant builds its model afresh; an out-of-memory step is reported as such. Writes JSON and prints a markdown table.
"""
from __future__ import annotations

import argparse
import gc
import time

import torch
from dpo_packing import synthetic_pairs  # the same random pairs (this script's folder is on sys.path)

from optrush.bench.provenance import provenance, provenance_line, write_result
from optrush.config.schema import DPOConfig
from optrush.data.preference import PairLoader
from optrush.models.io import build_model
from optrush.models.presets import get_preset
from optrush.objectives import frozen_copy
from optrush.objectives.dpo import DPO


def run(*, chunk_tokens: int | None, layout: str, args, device: torch.device) -> dict:
    """One variant: `chunk_tokens=None` is the full-logits path. Returns its pairs/s, peak memory and last loss."""
    cuda = device.type == "cuda"
    model = build_model(get_preset(args.preset), dtype=torch.float32, device=device, seed=0)
    objective = DPO(cfg=DPOConfig(), reference=frozen_copy(model), chunk_tokens=chunk_tokens)
    pairs = synthetic_pairs(256, prompt=args.prompt, completion=args.completion, vocab=model.vocab_size, seed=0)
    packed = layout != "padded"
    rows = max(1, round(args.pairs * (pairs[0].shared_length if layout == "shared" else len(pairs[0]))
                        / args.max_length)) if packed else args.pairs
    loader = PairLoader(pairs, strategy="bfd" if packed else "none", rows=rows, max_length=args.max_length,
                        pad_id=0, seed=0, shared_prompt=layout == "shared")
    result = {"fused": chunk_tokens is not None, "chunk_tokens": chunk_tokens, "layout": layout}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    done, tokens, seconds = 0, 0, 0.0
    try:
        for step in range(args.warmup + args.steps):
            batch = next(loader).to(device)
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss, _ = objective(model, batch)
            (loss / batch.num_pairs).backward()
            model.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            if step >= args.warmup:
                seconds += time.perf_counter() - started
                done += batch.num_pairs
                tokens += batch.input_ids.numel()
        result.update(pairs_per_s=done / seconds, tokens_per_step=tokens / args.steps,
                      pairs_per_step=done / args.steps, loss=float(loss.detach()) / batch.num_pairs)
    except torch.cuda.OutOfMemoryError:
        result["oom"] = True
    result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    del model, objective
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama3.2-1b")
    parser.add_argument("--pairs", type=int, default=8, help="pairs per step (padded: rows; packed: about)")
    parser.add_argument("--prompt", type=int, default=768)
    parser.add_argument("--completion", type=int, default=96)
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument("--chunk-tokens", type=int, default=4096, help="kernels.loss_chunk_tokens")
    parser.add_argument("--layouts", default="padded,shared", help="comma-separated: padded, packed, shared")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="dpo_logprobs", help="<out>/<name>.json and .md")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run of the debug preset")
    args = parser.parse_args()
    if args.smoke:
        args.preset, args.pairs, args.prompt, args.completion, args.max_length = "debug", 2, 16, 8, 64
        args.chunk_tokens, args.warmup, args.steps = 24, 1, 1
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    results = [run(chunk_tokens=chunk, layout=layout, args=args, device=device)
               for layout in args.layouts.split(",") for chunk in (None, args.chunk_tokens)]
    for full, fused in zip(results[0::2], results[1::2]):  # the same pairs: the same loss, fused or not
        if "loss" in full and "loss" in fused and abs(full["loss"] - fused["loss"]) > 1e-2 * max(1, abs(full["loss"])):
            raise SystemExit(f"{fused['layout']}: fused loss {fused['loss']} != full-logits loss {full['loss']}")
    record = {"args": vars(args), "results": results, "provenance": provenance()}
    text = markdown(record)
    print(text)
    write_result(record, text, out=args.out, name=f"{args.name}_smoke" if args.smoke else args.name)


def markdown(record: dict) -> str:
    args = record["args"]
    lines = ["# DPO log-probs: full logits vs chunked", "",
             "| layout | log-probs | pairs/step | pairs/s | peak GiB |", "| --- | --- | --- | --- | --- |"]
    for r in record["results"]:
        name = f"chunked ({r['chunk_tokens']})" if r["fused"] else "full logits"
        speed = "OOM" if r.get("oom") else f"{r['pairs_per_s']:.2f}"
        peak = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
        lines.append(f"| {r['layout']} | {name} | {r.get('pairs_per_step', args['pairs']):.0f} | {speed} | {peak} |")
    lines += ["", f"- {args['preset']} shape, random tokens: prompt {args['prompt']} tokens, completions "
              f"{args['completion']} +- 50%, {args['pairs']} pairs/step, fp32 weights under bf16 autocast, frozen-copy "
              f"reference; {args['warmup']} warm-up steps, then {args['steps']} timed steps (one run)",
              provenance_line(record["provenance"]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
