"""The ladder's report: `ladder.json` (every field), `ladder.md` (the table and how it was measured) and PNG charts.

    paths = write_ladder_report(record, "runs/ladder")   # {"json": ..., "markdown": ..., "tokens": ..., ...}

The table has one row per rung and peer, skipped and failed ones included with their reason, and ends with our
best rung as a ratio over the best peer (non-padding tokens/s). Charts (matplotlib, Agg backend, no display):
`ladder_tokens.png` (non-padding tokens/s per rung and peer), `ladder_memory.png` (peak memory) and
`ladder_loss.png` (per-step losses overlaid).
"""
from __future__ import annotations

import json
from pathlib import Path

from optrush.bench.provenance import provenance_line

MEMORY_KINDS = {"cuda_allocated": "peak GPU memory allocated by PyTorch (torch.cuda.max_memory_allocated)",
                "cpu_peak_rss": "peak resident memory of the measuring process (getrusage ru_maxrss: includes the "
                                "Python interpreter and libraries)"}
COLUMNS = ("stack", "config", "tokens/s", "non-pad tokens/s", "MFU", "peak GiB", "first step s", "loss",
           "Δ loss vs ref", "× best peer")


def write_ladder_report(record: dict, out_dir: str | Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "ladder.json", "markdown": out_dir / "ladder.md"}
    paths["json"].write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    paths["markdown"].write_text(ladder_markdown(record), encoding="utf-8")
    paths.update(plot_ladder(record, out_dir))
    return paths


def ladder_markdown(record: dict) -> str:
    rows = record["rungs"] + record["peers"]
    best_peer = next((p for p in record["peers"] if p["name"] == record["best_peer"]), None)
    lines = ["# optrush bench: the optimization ladder", "", "| " + " | ".join(COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    lines += [table_row(r, best_peer) for r in rows]
    lines += ["", *measurement_notes(record, rows)]
    return "\n".join(lines) + "\n"


def table_row(result: dict, best_peer: dict | None) -> str:
    if result["status"] != "ok":
        reason = " ".join(result["reason"].split()).replace("|", "/")
        return f"| {result['stack']} | {result['name']} | {result['status']}: {reason[:300]} |" + " |" * 7
    ratio = result["real_tokens_per_s"] / best_peer["real_tokens_per_s"] if best_peer else None
    cells = [result["stack"], result["name"], f"{result['tokens_per_s']:,.0f}", f"{result['real_tokens_per_s']:,.0f}",
             fmt(result["mfu"], ".3f"), fmt(result["peak_mem_gib"], ".2f"), fmt(result["time_to_first_step_s"], ".1f"),
             fmt(result["loss"], ".4f"), fmt(result.get("loss_delta"), "+.4f"), fmt(ratio, ".2f")]
    return "| " + " | ".join(cells) + " |"


def measurement_notes(record: dict, rows: list[dict]) -> list[str]:
    measured = [r for r in rows if r["status"] == "ok"]
    notes = []
    if record["best_rung"] is not None:
        ratio = record["ratio_over_best_peer"]
        notes.append(f"- **best optrush rung: {record['best_rung']}**" + (
            f", {ratio:.2f}x the non-padding tokens/s of the best peer ({record['best_peer']})" if ratio is not None
            else " (no peer measured: no ratio)"))
    if measured:
        first = measured[0]
        p = first["provenance"]
        notes += [
            provenance_line(p, first["device"]),
            f"- config: {record['config'] or 'defaults'} {' '.join(record['overrides'])}".rstrip(),
            f"- batch: {first['rows']} rows x {first['seq_len']} tokens x {first['grad_accum']} micro-batches"
            f"{' of synthetic random tokens' if record['synthetic'] else ''}; {first['params']:,} parameters"
            f"{'; every rung and peer loads the same saved weights' if record['shared_model'] else ''}",
            f"- each rung and peer in its own process: {record['warmup']} warm-up steps (the first includes "
            f"compilation: 'first step s'), then {record['steps']} timed steps; {record['repeats']} repeat(s), the "
            "median shown",
            f"- rungs are cumulative: each adds its overrides to every rung above it that ran; Δ loss is the final "
            f"loss minus that of the reference rung ({record['reference']}) after {record['warmup'] + record['steps']}"
            " steps" + ("" if record["reference"] == record.get("configured_reference", record["reference"]) else
                       f" (the ladder's reference, {record['configured_reference']}, did not run)"),
            "- MFU = tokens/s x (6 x params + 6 x layers x seq x dim) / dense peak FLOP/s of the matmul precision "
            "(n/a where the peak is unknown, e.g. CPU)",
            *[f"- peak GiB ({kind}): {MEMORY_KINDS[kind]}" for kind in sorted({r["peak_mem_kind"] for r in measured})],
        ]
    return notes


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


# ------------------------------------------------------------------------------------------------------ charts

def plot_ladder(record: dict, out_dir: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = record["rungs"] + record["peers"]
    labels = [r["name"] for r in rows]
    colors = ["tab:blue" if r["stack"] == "optrush" else "tab:gray" for r in rows]
    paths = {}
    for key, field, title in (("tokens", "real_tokens_per_s", "non-padding tokens/s"),
                              ("memory", "peak_mem_gib", "peak memory (GiB)")):
        fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(rows) + 2), 4))
        values = [r[field] if r["status"] == "ok" else 0.0 for r in rows]
        bars = ax.bar(range(len(rows)), values, color=colors)
        for bar, r in zip(bars, rows):
            if r["status"] != "ok":  # a missing bar must not read as "zero": say why it is missing
                ax.annotate(r["status"], (bar.get_x() + bar.get_width() / 2, 0), ha="center", va="bottom",
                            rotation=90, fontsize=8, color="tab:red")
        ax.set_xticks(range(len(rows)), labels, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(title)
        ax.set_title(f"optrush bench ladder: {title} (blue: optrush, grey: peers)")
        fig.tight_layout()
        paths[key] = out_dir / f"ladder_{key}.png"
        fig.savefig(paths[key], dpi=120)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        if r["status"] == "ok" and r["losses"]:
            ax.plot(range(1, len(r["losses"]) + 1), r["losses"], marker=".",
                    linestyle="-" if r["stack"] == "optrush" else "--", label=f"{r['name']}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no tick at step 1.5
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("loss per step (dashed: peers)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths["loss"] = out_dir / "ladder_loss.png"
    fig.savefig(paths["loss"], dpi=120)
    plt.close(fig)
    return paths
