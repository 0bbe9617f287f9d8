"""DPO pairs/s with long shared prompts: padded vs packed vs shared-prompt pair batches (issue #7 target: >= 2x).

    PYTHONPATH=. python benchmarks/dpo_packing.py --preset llama3.2-1b --pairs 4 --prompt 768 --completion 96
    PYTHONPATH=. python benchmarks/dpo_packing.py --attention sdpa,flex   # also with FlexAttention masks

Random tokens (no data or tokenizer needed): every pair has a prompt of `--prompt` tokens and two completions of
`--completion` +- 50% tokens. One timed step = forward + backward of the DPO sigmoid loss against precomputed
(zero) reference log-probs, so only the policy's cost is measured. Warm-up steps are excluded. Layouts:
`padded` (one pair per row, padded to the longest pair), `packed` (pairs best-fit packed into rows of
`--max-length`), `shared` (packed, each prompt stored once; data.shared_prompt=true). Writes JSON and prints a
markdown table.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from optrush.bench.provenance import provenance
from optrush.config.schema import DPOConfig
from optrush.data.preference import PairLoader, PreferencePair, encode_sequence
from optrush.kernels.attention import FLEX
from optrush.models import layers
from optrush.models.io import build_model
from optrush.models.presets import get_preset
from optrush.objectives.dpo import DPO


def synthetic_pairs(n: int, *, prompt: int, completion: int, vocab: int, seed: int) -> list[PreferencePair]:
    rng = random.Random(seed)

    def tokens(k: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(k)]

    pairs = []
    for i in range(n):
        p = tokens(prompt)
        c, r = (tokens(rng.randint(completion // 2, completion * 3 // 2)) for _ in range(2))
        pairs.append(PreferencePair(chosen=encode_sequence(p, c, bos_id=1, eos_id=2),
                                    rejected=encode_sequence(p, r, bos_id=1, eos_id=2), index=i, shared=prompt))
    return pairs


BACKENDS = {"sdpa": layers.SDPA, "flex": FLEX}


def run(layout: str, model, pairs, *, pairs_per_step: int, max_length: int, warmup: int, steps: int) -> dict:
    strategy = "none" if layout == "padded" else "bfd"
    # about `pairs_per_step` pairs in every layout: as many rows of max_length as those pairs fill
    per_pair = pairs[0].shared_length if layout == "shared" else len(pairs[0])
    rows = pairs_per_step if layout == "padded" else max(1, round(pairs_per_step * per_pair / max_length))
    loader = PairLoader(pairs, strategy=strategy, rows=rows, max_length=max_length, pad_id=0, seed=0,
                        shared_prompt=layout == "shared")
    objective = DPO(cfg=DPOConfig(), reference_logps=torch.zeros(len(pairs), 2))
    device = next(model.parameters()).device
    done, tokens, seconds = 0, 0, 0.0
    torch.cuda.reset_peak_memory_stats()
    for step in range(warmup + steps):
        batch = next(loader).to(device)
        torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = objective(model, batch)
        (loss / batch.num_pairs).backward()
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= warmup:
            seconds += time.perf_counter() - started
            done += batch.num_pairs
            tokens += batch.input_ids.numel()
    return {"layout": layout, "pairs_per_s": done / seconds, "tokens_per_pair": tokens / done,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama3.2-1b")
    parser.add_argument("--pairs", type=int, default=4, help="pairs per step (padded: rows; packed: about)")
    parser.add_argument("--prompt", type=int, default=768)
    parser.add_argument("--completion", type=int, default=96)
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--attention", default="sdpa", help="comma-separated: sdpa, flex (the model's backend; "
                        "shared-prompt rows then use the dense SDPA or the FlexAttention branch mask)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    model = build_model(get_preset(args.preset), dtype=torch.float32, device="cuda", seed=0)
    pairs = synthetic_pairs(512, prompt=args.prompt, completion=args.completion, vocab=model.vocab_size, seed=0)
    results = []
    for attention in args.attention.split(","):
        model.set_attention_backend(BACKENDS[attention])
        # flex on padded rows is rejected by the config (a compile per row width; on an H100 the 8 steps of one
        # padded run used up dynamo's recompile limit and the later layouts then ran flex eagerly)
        layouts = ("packed", "shared") if attention == "flex" else ("padded", "packed", "shared")
        results += [{"attention": attention, **run(layout, model, pairs, pairs_per_step=args.pairs,
                                                   max_length=args.max_length, warmup=args.warmup, steps=args.steps)}
                    for layout in layouts]
    base = results[0]["pairs_per_s"]
    print("| attention | layout | pairs/s | vs padded sdpa | tokens/pair | peak GiB |\n"
          "| --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['attention']} | {r['layout']} | {r['pairs_per_s']:.2f} | {r['pairs_per_s'] / base:.2f}x | "
              f"{r['tokens_per_pair']:.0f} | {r['peak_mem_gib']:.1f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dpo_packing.json").write_text(json.dumps({"args": vars(args), "results": results,
                                                      "provenance": provenance()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
