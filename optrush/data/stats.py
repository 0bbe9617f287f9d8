"""What each packing strategy makes of a dataset: padding fraction, tokens per micro-batch, micro-batch count.

    rows = packing_stats([len(e) for e in examples], rows=8, max_length=2048, seed=0)
    # [{"strategy": "none", "batches": ..., "padding": 0.41, "positions_per_batch": ..., ...}, ...]

Used by `optrush data stats` and `benchmarks/data_pipeline.py`. The numbers come from the same planner the loader
uses (`optrush.data.pack.plan_batches`), for one epoch, so they are what training will see. For preference pairs
the lengths are those `optrush.data.preference.PairLoader` plans by (`pair_lengths`): a pair is one planned item.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from optrush.data.pack import STRATEGIES, plan_batches


def packing_stats(lengths: Sequence[int], *, rows: int, max_length: int, seed: int,
                  strategies: Sequence[str] = STRATEGIES, batch_tokens: int = 0) -> list[dict]:
    """One dict per strategy: batches, positions (padded slots) and real tokens per micro-batch, padding fraction
    (`batch_tokens` > 0: micro-batches sized by padded tokens, as `data.batch_tokens`)."""
    lens = np.asarray(lengths, dtype=np.int64)
    out = []
    for strategy in strategies:
        plan = plan_batches(lens, strategy=strategy, rows=rows, max_length=max_length, order_seed=seed,
                            batch_tokens=batch_tokens)
        positions = 0
        for micro in plan:
            if strategy == "bfd":  # packed rows are always padded to max_length
                positions += len(micro) * max_length
            else:
                positions += len(micro) * max(int(lens[row[0]]) for row in micro)
        tokens = int(lens.sum())
        batches = max(len(plan), 1)
        out.append({"strategy": strategy, "batches": len(plan), "tokens": tokens, "positions": positions,
                    "padding": 1 - tokens / max(positions, 1), "tokens_per_batch": tokens / batches,
                    "positions_per_batch": positions / batches, "examples_per_batch": len(lens) / batches})
    return out


def format_stats(stats: list[dict], *, unit: str = "examples") -> str:
    """The `packing_stats` rows as a table; `unit` names what was planned (examples, pairs)."""
    per_batch = f"{unit}/batch"
    lines = [f"  {'strategy':<8}  {'batches':>9}  {per_batch:>14}  {'tokens/batch':>12}  {'slots/batch':>11}  "
             f"{'padding':>8}"]
    for s in stats:
        lines.append(f"  {s['strategy']:<8}  {s['batches']:>9,}  {s['examples_per_batch']:>14,.1f}  "
                     f"{s['tokens_per_batch']:>12,.0f}  {s['positions_per_batch']:>11,.0f}  {s['padding']:>8.2%}")
    return "\n".join(lines)
