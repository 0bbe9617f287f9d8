"""How well `optrush plan` predicts: peak memory vs every committed GPU measurement (issue #10 target: within 10%
over >= 10 GPU configurations), and tokens/s with each row left out of the speed calibration.

    python benchmarks/plan_accuracy.py                    # writes benchmarks/results/plan_accuracy.{md,json}
    python benchmarks/plan_accuracy.py --smoke --out /tmp # the same on the committed rows, written elsewhere

Rows: every bench record (config + tokens_per_s + peak_mem_gib + a CUDA device) in benchmarks/results/*.json
(`optrush.plan.speed.load_measurements`), i.e. what `optrush bench` and `benchmarks/train_speed.py` write. Each
record carries its full resolved config, which is turned back into the planner's `Setup`; rows are synthetic
full rows (no document masks) as those scripts run them. Needs no GPU: it only reads committed results.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from optrush.plan.memory import GIB, estimate_memory
from optrush.plan.search import describe
from optrush.plan.speed import RESULTS_DIR, calibrate, estimate_speed, load_measurements

TARGET = 0.10
# Results of the fused loss's chunk that, compiled on its own (every compile mode but `model`), kept an fp32 copy
# of its logits: everything measured before 5866a7b (2026-12-06). Results added since measure the current chunk.
OLD_LOSS_CHUNK = {
    "fsdp_scaling_h200.json", "ladder_1b_h100/ladder.json", "ladder_fsdp2_h200/ladder.json",
    "ladder_qlora8b_h100/ladder.json", "length_mix_h100.json", "length_mix_h100_before_fix.json",
    "length_mix_h200.json", "length_mix_varlen_h100.json", "long_context_1b_h100.json", "long_context_400k_h100.json",
    "long_context_cp_h200.json", "long_context_h100.json", "profile_h100/profile_qlora8b_h100.json",
    "profile_h100/profile_qlora8b_offload_h100.json", "profile_h100/profile_qlora8b_offload_shared.json",
    "profile_h100/profile_qlora8b_selective_offload_h100.json", "qlora_h100.json",
    *(f"qlora_h100_ab/{ab}_{i}.json" for ab in ("shared_input_new", "shared_input_old", "triton_dequantize_mid",
                                                 "triton_dequantize_new") for i in (0, 1)),
    "qlora_h100_confirm.json", "qlora_h100_fused.json", "qlora_h100_repeats.json", "qlora_h100_selective.json",
    "qlora_h100_shared_input.json", "qlora_h100_skip_last.json", "qlora_h100_skip_last_sweep.json",
    "train_speed_8b_h200.json", "train_speed_8b_h200_repeats.json", "train_speed_h100.json",
    "train_speed_h100_loss_chunk_ab/before.json", "train_speed_h100_rerun.json",
}


def measured_old_loss_chunk(m) -> bool:
    """A row measured while the fused loss's chunk (compiled alone) kept an fp32 copy of its logits."""
    return m.setup.fused_loss and m.setup.compile != "model" and m.source in OLD_LOSS_CHUNK


def predicted_gib(m) -> float:
    """The planner's peak for the code that was measured: the current model, plus, for a row of the old chunk,
    that copy (3 bytes per bf16 chunk element more than the current chunk's 2 x 2 + 1) at the loss moment."""
    memory = estimate_memory(m.args, m.setup)
    if not measured_old_loss_chunk(m):
        return memory.peak_gib
    phases = dict(memory.phases)
    phases["loss"] += 3 * min(m.setup.loss_chunk_tokens, m.setup.tokens) * m.args.vocab_size
    return max(phases.values()) / GIB


def rows() -> list[dict]:
    measured = load_measurements()
    out = []
    for index, m in enumerate(measured):
        predicted = predicted_gib(m)
        others = calibrate(measured[:index] + measured[index + 1:])  # leave this row out of the speed model
        speed = estimate_speed(m.args, m.setup, m.gpu, others)
        shape = f"{m.cfg.model.preset or m.cfg.model.path}, B={m.setup.micro_batch} x S={m.setup.seq_len}"
        out.append({"source": m.source, "name": m.name, "shape": shape, "setup": describe(m.setup), "gpu": m.gpu.name,
                    "measured_gib": m.peak_gib, "predicted_gib": predicted,
                    "memory_error": predicted / m.peak_gib - 1, "measured_tokens_per_s": m.tokens_per_s,
                    "predicted_tokens_per_s_loo": speed.tokens_per_s,
                    "speed_error_loo": speed.tokens_per_s / m.tokens_per_s - 1, "speed_basis_loo": speed.basis})
    return out


def markdown(results: list[dict]) -> str:
    within = sum(abs(r["memory_error"]) <= TARGET for r in results)
    worst = max(results, key=lambda r: abs(r["memory_error"]))
    speed_within = sum(abs(r["speed_error_loo"]) <= TARGET for r in results)
    shapes, gpus = sorted({r["shape"] for r in results}), sorted({r["gpu"] for r in results})
    lines = [
        "# `optrush plan` accuracy: predicted vs measured", "",
        f"**Peak memory: {within} of {len(results)} measured GPU configurations within {TARGET:.0%}** "
        f"(worst: {worst['name']}, {worst['memory_error']:+.1%}). The issue's target asks for >= 10 "
        f"configurations. The {len(results)} committed ones cover {len(shapes)} model shape(s) "
        f"({'; '.join(shapes)}) on {', '.join(gpus)}"
        + (": they test the per-optimization terms, not how the model scales with shape or GPU."
           if len(shapes) == 1 else "."),
        "",
        "| source | config | planner setup | measured GiB | predicted GiB | error | measured tok/s | "
        "predicted tok/s (row left out) | error | speed basis |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['source']} | {r['name']} | {r['setup']} | {r['measured_gib']:.2f} | "
                     f"{r['predicted_gib']:.2f} | {r['memory_error']:+.1%} | {r['measured_tokens_per_s']:,.0f} | "
                     f"{r['predicted_tokens_per_s_loo']:,.0f} | {r['speed_error_loo']:+.1%} | "
                     f"{r['speed_basis_loo']} |")
    lines += [
        "",
        "- Measured: `torch.cuda.max_memory_allocated` over the timed steps (`optrush.bench.run`); predicted: "
        "`optrush.plan.memory.estimate_memory(...).peak_gib`, the same quantity (CUDA context and allocator slack, "
        "which `optrush plan` adds before deciding what fits, are excluded on both sides).",
        "- No constant is fitted per row or to these rows. The activation terms count the tensors autograd keeps "
        "(eager) or that Inductor keeps (compiled: matmul inputs and outputs, residuals); the loss terms count "
        "the logits buffers. Two modelling choices were made after seeing these rows and are therefore checked "
        "only loosely by them: the compiled-block saved set (the `compile` row: -0.3%) and that "
        "whole-model compile fuses away the fused loss's fp32 chunk copy (inferred from the two "
        "`compile_model` rows). Likewise the backward-time terms (`block_backward_bytes`: attention gradients, the "
        "kernel's fp32 dq accumulator, residual-stream gradients; and the moment when every saved activation is "
        "still held) were added after the 131,072-token long-context row came out 23% under; and bf16_mixed got "
        "its own speed family after the 1B ladder rows ran about 15% below bf16_pure.",
        "- Regression rows: the whole-model compile rows of train_speed_h100_rerun.json and profile_h100/ were "
        "measured while the fused loss wrote its per-chunk losses into a preallocated buffer, which under "
        "whole-model compile kept each chunk's fp32 logits copy alive (+1.45 GiB, 5.9-11.1% under the "
        "prediction). Bisected and fixed the same day: train_speed_h100_fused_loss_fix.json measures the fixed code "
        "at 19.77 GiB, as before the regression; `tests/test_plan.py` leaves the regression rows out.",
        "- Old loss chunk: the rows measured before 5866a7b (2026-12-06) with the fused loss's chunk compiled on "
        "its own (every compile mode but `model`) ran a chunk that kept an fp32 copy of its logits; the planner "
        "models the current chunk (2 x 2 + 1 bytes per bf16 chunk element, from the loss-chunk A/B of the 1B step "
        "and the 8B QLoRA rows of the new code), so those rows are predicted with the copy's 3 bytes per element "
        "added back at the loss moment (`predicted_gib`; the files: `OLD_LOSS_CHUNK`).",
        "- Kept blocks (`activations.skip_last`): their backward runs before any checkpointed block recomputes, "
        "so the recompute is counted after their activations are freed (the `first_recompute` moment), not on "
        "top of them; the kept-block rows came out 8-16% over before.",
        "- A recomputed block's backward, compiled over a quantized base (`recomputed_block_backward_bytes`): "
        "the B=4 8B QLoRA ladder's offload rungs without kept blocks came out 16-19% under once the loss chunk "
        "no longer set their peak. A snapshot of the allocator at that peak (`benchmarks/memory_peak.py`, "
        "memory_peak.md) found it in the first block's backward, with 11 ffn-wide buffers live where the model "
        "counted 3 and attention's gradients; the MLP's backward is now counted, as the 9 buffers left after the "
        "LoRA scaling moved to the r-wide product (d36390b; memory_peak/bench_offload_chunk2048_scaled_low_rank: "
        "+0.3%; the ladder rows of the code before: -3 to -6%).",
        "- Speed calibration uses the configurations `optrush plan` can emit: it always dequantizes a compiled "
        "quantized base with one kernel, so compiled QLoRA rows without `kernels.fused_dequantize` (1.18x slower) "
        "are predicted but do not calibrate (`optrush.plan.speed.plannable`); this brought the left-out speed "
        "predictions within 10% from 38 to 56 of 131 rows (QLoRA rows: from 8 to 23 of 63).",
        "- Speed families are keyed by model width too (`optrush.plan.speed.family`; another width falls back "
        "to the nearest measured one): the 8B rows had borrowed the 1B rows' efficiency, which put the 8B QLoRA "
        "rows 10-27% under. Left-out speed predictions within 10%: from 57 to 90 of 146 rows (QLoRA: 18 to 52 of "
        "74). The misses left: micro-batch-1 rows (predicted over: their families' efficiency was measured at "
        "B=4), the eager 8B rows at B=4 (under), and the eager long-context rows (19-28% under).",
        "- Per micro-batch and per optimizer step (`optrush.plan.speed.step_overhead_seconds_per_token`, "
        "2026-12-07): a micro-batch costs a fixed number of weight reads whatever its tokens, fitted on the "
        "full fine-tuning rows alike but for their rows per micro-batch (train_speed_h100_accum: issue #5's 4 "
        "rows as 1, 2 or 4 micro-batches; about 7 reads), and AdamW's update traffic comes once a step. Before, "
        "every micro-batch size of a family ran at one efficiency, so `optrush plan` ranked micro-batch 1 first "
        "on a 1B model (tied speed, least memory), measured 12% slower than 4; the accum rows' left-out errors "
        "went from +10% (mb1x4) and +21% (mb1x4 with 8-bit AdamW, whose slower update is not modelled) to 0% "
        "and +9%, and speed predictions within 10% from 98 to 102 of 161 rows.",
        "- Attention at its own efficiency (`optrush.plan.speed.fit_attention`, 2026-12-07): plan_picks_h100 "
        "measured the 1B model's MFU falling from 0.55 at 2,048 tokens to 0.29 (varlen) and 0.40 (sdpa) at "
        "131,072, where attention is 78% of the FLOPs; priced at the short rows' efficiency those long rows came "
        "out 22-78% over. Rows where attention is at least 30% of the FLOPs now calibrate an efficiency per "
        "backend (about 0.39 sdpa, 0.27 varlen), the families are fitted on their short rows net of it, and "
        "packed rows' SDPA (dense document mask) counts as no faster than the slowest backend. The long rows "
        "came within 8%, the planner's 131k pick within 1% (8,755 predicted, 8,675 measured); with the 10 new "
        "rows speed predictions within 10% went from 112 to 118 of 171. Memory: with chunked MLPs a compiled "
        "block keeps one (token x dim) tensor fewer (the 65,536-token trace), which brought those rows from "
        "11-13% over to within 1.3% (peak memory within 10%: 163 to 167 of 171).",
        "- Reverted code: a results file whose `meta.reverted` names a commit (qlora_h100_kept.json) measured code "
        "that no longer exists; `optrush.plan.speed.load_measurements` leaves it out of this table and of the "
        "speed calibration.",
        "- The 1B ladder was rerun (2026-11-24) with the current checkpointing policy: selective checkpointing "
        "recomputes the adapters' low-rank products (`optrush.parallel.checkpointing.low_rank_product`) and "
        "QLoRA's opaque quantized matmul. Its QLoRA rungs, which had come out 59% under with the old policy's "
        "rows, are now predicted within 1%.",
        "- Changed after seeing the newest rows (so these rows check them only loosely): the fused loss's cast of "
        "a bf16_mixed head is freed per chunk, not kept for backward (the 8B QLoRA ladder's fused-loss rungs came "
        "out 14% over, now 4-5%); `data.batch_tokens` sets the rows of a "
        "micro-batch (the length-mix rows were predicted with `train.micro_batch_size`'s 8 rows: 39-44% over); "
        "QLoRA under selective checkpointing keeps only attention's output (+57% over before); autocast caches "
        "the bf16 casts of trained weights only, so a frozen LoRA base's casts are kept by its matmuls and dropped "
        "by checkpointing (the rerun 1B ladder's `+LoRA` rung: +11% over before, now -0.4%).",
        "- Known gap: the two FSDP2 rows of fsdp_scaling_h200.json (8B full fine-tune, bf16 weights and AdamW "
        "states, `parallel.reduce_dtype=fp32`) used 7.1 GiB (1 GPU) and 4.8 GiB (2 GPUs) more than predicted, at "
        "the end of backward. The likely cause, not yet modelled: FSDP2 reduce-scatters each group's gradients in "
        "fp32, so the last group, the root (embedding and head, 1.05B parameters), holds its unsharded bf16 "
        "gradients, their fp32 copy and the fp32 shard at once (up to 7.8 GiB at 1 GPU, 6.8 at 2); which of them "
        "overlap depends on FSDP2's stream and free order, which these two rows alone cannot settle.",
        "- Known gap: the context-parallel row (long_context_cp_h200.json; ring attention over 2 GPUs, 131,072 "
        "tokens per GPU) is predicted 20% over. Context parallelism entered the model after this row was measured "
        "(each GPU holds seq_len / context.degree tokens; `ring_attention_bytes` adds the ring's fp32 accumulator "
        "and travelling key/value blocks and gradients), which brought the prediction from 124 to 78 GiB against "
        "65.4 measured; the rest is in the last block's recompute and backward transients (modelled 22.6 GiB, "
        "measured at most 9.6), not yet understood at this length without offload.",
        "  `tests/test_plan.py` bounds the other rows only.",
        "- Float8 (2026-12-08, with the fp8_pure rows of fp8_pure_h100): a compiled block with torchao's float8 "
        "linears keeps no matmul input at all, neither bf16 nor an fp8 copy (the norms and SiLU*mul are "
        "recomputed and cast again in backward), and an eager one keeps what a bf16 block keeps (a compiled and "
        "an eager block's saved tensors, counted on CPU in tests/test_plan.py). The model had counted fp8 copies "
        "of the inputs: the 1B fp8_pure rows came out 13.6% over, the 1B fp8 row 6.1% over; now +2.6% and -0.5% "
        "(peak memory within 10%: 172 to 175 of 179). Speed: a float8 family without rows is the same setup in "
        "bf16_pure times the float8 mode's speed-up measured side by side (rows of one results file alike but "
        "for the precision), nearest in width (`optrush.plan.speed.setup_efficiency`), instead of the nearest "
        "family of another width or precision. Left out: the 8B fp8_pure row went from -29.9% to -16.1% (from "
        "the 1B pairs' ratio; its own 8B pair is left out with it), the 8B fp8 row from +7.5% to +2.5%; the 1B "
        "fp8 row, the only fp8 pair, from -20.0% to +14.4% (left out, it has no ratio, and the nearest float8 "
        "family is an 8B one). Within 10%: 125 of 179 before and after. Family means had first been tried as the "
        "ratio: they mix machines and dates and put fp8 at 1.41x bf16_pure where one command measured 1.00x.",
        "- Real length mixes do not calibrate (2026-12-08; `optrush.plan.speed.plannable`): the length_mix rows "
        "(`data.batch_tokens`: padded or packed micro-batches of varying shape) had calibrated the compiled-block "
        "family as if they were full rows; their padded rows ran 20,104 tokens/s (9,326 real) with 6-12 s "
        "recompiles inside the timed steps, which put that family's full rows 24-26% under (train_speed_h100's "
        "compile+fused_loss: -23.9%). Fitted on full rows only, those come within 1.5%, the packed length-mix "
        "rows of the current code within 2% (flex, varlen) to 10% (SDPA with a dense document mask), and speed "
        "predictions within 10% went from 125 to 135 of 179. The padded and length-sorted rows now come out "
        "65-260% over: the model prices full rows, and a padded real mix is not one (the planner's `--packing "
        "none` prediction is the full-row speed; the README says so). The length_mix_h100_before_fix rows "
        "measured code since fixed.",
        f"- Speed: {speed_within} of {len(results)} within {TARGET:.0%} when each row is predicted from the "
        "other rows only (its own family's efficiency removed: `nearest` families stand in). With its own row "
        "in the calibration a measured family reproduces its speed by construction, so only the left-out "
        "numbers say anything.",
        "- Not compared: the HF baseline rows of train_speed_h100.json (another stack), the DPO layout rows of "
        "dpo_packing_h100.json (a custom forward+backward loop without optimizer, not a bench record), decode and "
        "kernel micro-benchmarks (not training steps), and bench rows of `objective=dpo` or `reward` "
        "(bench_objectives_h100: the planner models a language model's step; `PLANNED_OBJECTIVES`).",
        "", "Regenerate: `python benchmarks/plan_accuracy.py`."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(RESULTS_DIR), help="output directory (default: benchmarks/results)")
    parser.add_argument("--smoke", action="store_true", help="print only; with --out, write there")
    args = parser.parse_args()
    results = rows()
    if not results:
        raise SystemExit(f"no GPU bench records under {RESULTS_DIR}")
    text = markdown(results)
    print(text)
    if args.smoke and args.out == str(RESULTS_DIR):
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan_accuracy.md").write_text(text, encoding="utf-8")
    (out / "plan_accuracy.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out / 'plan_accuracy.md'} and {out / 'plan_accuracy.json'}")


if __name__ == "__main__":
    main()
