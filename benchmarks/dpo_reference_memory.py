"""DPO with LoRA: peak memory and pairs/s of the frozen-copy reference vs the adapters-disabled reference
(issue #7 target: `dpo.reference=lora_disabled` keeps no second model in memory).

    PYTHONPATH=. python benchmarks/dpo_reference_memory.py --preset llama3.2-1b --pairs 8 --prompt 512 --completion 128
    PYTHONPATH=. python benchmarks/dpo_reference_memory.py --smoke      # CPU, debug preset, seconds

Random tokens (no data or tokenizer needed). For each reference the model is built afresh (bf16 weights on GPU),
LoRA r=16 on all linear layers is applied, and each timed step is the DPO sigmoid loss's forward (policy and
reference) + backward + AdamW step on the adapters. Warm-up steps are excluded. Reports the peak CUDA memory
(on CPU: the bytes of the weights held, policy plus reference) and pairs/s; writes JSON and a markdown table.
"""
from __future__ import annotations

import argparse
import gc
import time

import torch

from optrush.bench.provenance import provenance, provenance_line, write_result
from optrush.config.schema import DPOConfig, PeftConfig
from optrush.data.preference import PairLoader, PreferencePair, encode_sequence
from optrush.models.io import build_model
from optrush.models.presets import get_preset
from optrush.objectives import frozen_copy
from optrush.objectives.dpo import DPO
from optrush.peft.lora import apply_lora


def synthetic_pairs(n: int, *, prompt: int, completion: int, vocab: int) -> list[PreferencePair]:
    g = torch.Generator().manual_seed(0)

    def tokens(k: int) -> list[int]:
        return torch.randint(3, vocab, (k,), generator=g).tolist()

    return [PreferencePair(chosen=encode_sequence(p, tokens(completion), bos_id=1, eos_id=2),
                           rejected=encode_sequence(p, tokens(completion), bos_id=1, eos_id=2), index=i)
            for i, p in enumerate(tokens(prompt) for _ in range(n))]


def weight_bytes(*models) -> int:
    return sum(t.numel() * t.element_size() for m in models if m is not None
               for t in [*m.parameters(), *m.buffers()])


def run(reference: str, args, device: torch.device) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(get_preset(args.preset), dtype=dtype, device=device, seed=0)
    copy = frozen_copy(model) if reference == "copy" else None
    model = apply_lora(model, PeftConfig(method="lora", r=16, alpha=32))
    objective = DPO(cfg=DPOConfig(reference=reference), reference=copy)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    pairs = synthetic_pairs(64, prompt=args.prompt, completion=args.completion, vocab=model.args.vocab_size)
    loader = PairLoader(pairs, strategy="none", rows=args.pairs, max_length=2 * (args.prompt + args.completion) + 4,
                        pad_id=0, seed=0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    done, seconds = 0, 0.0
    for step in range(args.warmup + args.steps):
        batch = next(loader).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        loss, _ = objective(model, batch)
        (loss / batch.num_pairs).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            seconds += time.perf_counter() - started
            done += batch.num_pairs
    result = {"reference": reference, "pairs_per_s": done / seconds, "weight_gib": weight_bytes(model, copy) / 2**30,
              "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
    del model, copy, objective, optimizer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama3.2-1b")
    parser.add_argument("--pairs", type=int, default=8, help="pairs per step (one pair per row)")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--completion", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="dpo_reference_memory", help="<out>/<name>.json and .md")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run of the debug preset")
    args = parser.parse_args()
    if args.smoke:
        args.preset, args.pairs, args.prompt, args.completion, args.warmup, args.steps = "debug", 2, 16, 8, 1, 1
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    results = [run(reference, args, device) for reference in ("copy", "lora_disabled")]
    record = {"args": vars(args), "results": results, "provenance": provenance()}
    text = markdown(record)
    print(text)
    write_result(record, text, out=args.out, name=f"{args.name}_smoke" if args.smoke else args.name)


def markdown(record: dict) -> str:
    args = record["args"]
    lines = ["# DPO with LoRA: frozen-copy reference vs adapters disabled", "",
             "| reference | pairs/s | weights GiB | peak GiB |", "| --- | --- | --- | --- |"]
    for r in record["results"]:
        peak = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f}"
        lines.append(f"| {r['reference']} | {r['pairs_per_s']:.2f} | {r['weight_gib']:.3f} | {peak} |")
    lines += ["", f"- {args['preset']} shape, bf16 weights, LoRA r=16 all-linear, random tokens: prompt {args['prompt']} "
              f"tokens, completions {args['completion']}, {args['pairs']} pairs/step; {args['warmup']} warm-up steps, "
              f"then {args['steps']} timed steps (one run)", provenance_line(record["provenance"]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
