"""`optrush plan --measure`: run the top candidates briefly and put the predictions next to the measurements.

    rows = measure(candidates[:3], base_overrides=["model.preset=llama3.2-1b"], device="cuda", warmup=2, steps=4)

Each candidate runs `optrush.bench.run.bench` on synthetic full rows (the training loop's own step), one after the
other in this process; between runs the model is dropped and the CUDA cache emptied, and `bench` resets the peak
memory statistics after building, so each row's peak is its own. A candidate that fails (out of memory, a compile
error, `model.attention=varlen` measured on CPU) is reported with its error. On CPU the "measured" memory is the
process's peak resident set, which is not what the planner predicts (GPU allocations): only the speed column means
anything there.
"""
from __future__ import annotations

import gc

import torch

from optrush.config import ConfigError, load_config
from optrush.plan.search import Candidate, describe
from optrush.plan.setup import config_overrides


def measure(candidates: list[Candidate], *, base_overrides: list[str], device: str, warmup: int = 2,
            steps: int = 4) -> list[dict]:
    """One row per candidate: name, predicted and measured peak GiB and tokens/s (or `error`)."""
    from optrush.bench.run import bench

    rows = []
    for candidate in candidates:
        name = describe(candidate.setup)
        overrides = [*base_overrides, *config_overrides(candidate.setup), f"train.device={device}"]
        row = {"name": name, "overrides": overrides, "predicted_gib": candidate.memory.peak_gib,
               "predicted_tokens_per_s": candidate.speed.tokens_per_s}
        try:
            result = bench(load_config(None, overrides, synthetic_data=True), synthetic=True, warmup=warmup,
                           steps=steps, name=name)
            row.update(measured_gib=result["peak_mem_gib"], measured_tokens_per_s=result["tokens_per_s"],
                       device=result["device"])
        # out of memory (torch.OutOfMemoryError), compile errors, a GPU-only backend measured on CPU: a result too
        except (RuntimeError, ConfigError) as err:
            row["error"] = f"{type(err).__name__}: {err}"[:300]
        rows.append(row)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def comparison_table(rows: list[dict]) -> str:
    """Markdown: predicted vs measured peak memory and tokens/s, with the relative error."""
    lines = ["| config | predicted GiB | measured GiB | error | predicted tokens/s | measured tokens/s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['predicted_gib']:.2f} | failed: {r['error'][:80]} | | "
                         f"{r['predicted_tokens_per_s']:,.0f} | |")
            continue
        error = r["predicted_gib"] / r["measured_gib"] - 1
        lines.append(f"| {r['name']} | {r['predicted_gib']:.2f} | {r['measured_gib']:.2f} | {error:+.1%} | "
                     f"{r['predicted_tokens_per_s']:,.0f} | {r['measured_tokens_per_s']:,.0f} |")
    if any(r.get("device") == "cpu" for r in rows):
        lines.append("\nOn CPU, measured GiB is the process's peak resident memory, not GPU allocations.")
    return "\n".join(lines)
