"""QLoRA and LoRA benchmark: tokens/s and peak GPU memory of optrush vs transformers + PEFT + bitsandbytes (issue #6).

    python benchmarks/qlora.py --out benchmarks/results --name qlora_h100     # one H100/H200, ~15 minutes
    python benchmarks/qlora.py --only "r=16 B=4" --case-timeout-s 240 ...      # a subset, each case bounded
    python benchmarks/qlora.py --smoke --out /tmp/qlora                      # CPU run of the script itself (~1 min)
    python benchmarks/qlora.py --case "peer hf+peft+bnb qlora r=16 B=4 (gc)" --case "optrush qlora nf4 r=16 B=4 (ac +
        offload, last 2 blocks kept, fused loss in 1024-token chunks, compiled blocks, fused dequantize)" \
        --repeats 3 --steps 10                          # exact cases, 3 rounds: issue #6's head-to-head

Writes <name>.json (every number, the settings, the provenance record) and <name>.md (the tables), after every
case, so a run cut short keeps the cases it finished (the most telling ones run first).

1. Llama-3.1-8B shape (random init, saved once in HF format to --ckpt, default /tmp/rand8b: the same directory the
   peer script /work/shared/gpu/baseline-peers.py writes, so both read one checkpoint), S=2048, LoRA on all linear
   layers (alpha = r, as the peer), NF4 base with double quantization (or int8). optrush loads the checkpoint
   layer by layer straight into NF4 (`load_model(..., quantize=...)`), then applies its transforms from the config
   (precision bf16_pure: adapters and AdamW state in bf16; full activation checkpointing; fused loss; per-block
   compile where the case says so). The peer is the issue's baseline, measured in the same run: transformers
   `from_pretrained` with BitsAndBytesConfig(nf4, double quant, bf16 compute), gradient checkpointing, PEFT
   get_peft_model(r, all-linear), fused AdamW.
2. Llama-3.2-1B shape: full fine-tune (bf16_mixed: fp32 master weights and AdamW state) vs LoRA r=16 vs QLoRA r=16,
   B=4, S=2048, fused loss, no checkpointing.

Each case runs in its own process (clean peak-memory statistics). Per case: `--warmup` steps (compilation
included) excluded, then `--steps` steps of forward + backward + optimizer step on random tokens timed with
torch.cuda.synchronize; tokens/s = B * S * steps / time; peak = torch.cuda.max_memory_allocated over the timed
steps and the warm-up; "weights GiB" = memory allocated after loading and transforming the model. A case that fails
(out of memory, a missing package) is recorded with its error instead of a number.

`--repeats N` runs the selected cases N times, round-robin (case 1, case 2, ..., case 1, ...), each in a fresh
process, so slow drifts of the machine fall on every case alike; the .md then adds a table of each case's median
and of its ratio to the peer of the same batch, computed per repeat (each optrush run against the peer run of the
same round) and summarised by the median and the range.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

# Run as a script, this folder leads sys.path, and its kernels.py would stand in for the `kernels` package that
# transformers (5.x) imports when it finds one: the peer's model load would fail on it.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

GIB = 2 ** 30
OPTIMIZED = ["activations.checkpointing=full", "kernels.fused_loss=true"]


def cases(smoke: bool) -> list[dict]:
    """(name, kind, model, batch, seq, overrides) of every case; --smoke: the debug preset, tiny shapes, on CPU."""
    if smoke:
        small = dict(model="debug", seq=32)
        return [
            dict(name="optrush qlora nf4 r=16 B=2", kind="optrush", batch=2, r=16, quantize="nf4", extra=OPTIMIZED,
                 **small),
            dict(name="optrush qlora int8 r=16 B=2", kind="optrush", batch=2, r=16, quantize="int8", extra=[],
                 **small),
            dict(name="optrush lora r=16 B=2", kind="optrush", batch=2, r=16, quantize="none", extra=[], **small),
            dict(name="optrush full fine-tune B=2", kind="optrush", batch=2, r=0, quantize="none", extra=[], **small),
            dict(name="peer hf+peft lora r=16 B=2 (no bitsandbytes on CPU)", kind="peer", batch=2, r=16,
                 gradient_checkpointing=True, **small),
            dict(name="peer hf+peft lora r=16 B=2 (bf16 autocast, no bitsandbytes on CPU)", kind="peer", batch=2,
                 r=16, gradient_checkpointing=True, autocast=True, **small),
        ]
    big = dict(model="llama3.1-8b", seq=2048)
    compiled = OPTIMIZED + ["compile.mode=blocks"]
    nf4 = dict(kind="optrush", quantize="nf4", **big)
    # most telling first: a device call that runs out of time keeps the head-to-head rows
    out = [
        dict(name="optrush qlora nf4 r=16 B=4 (ac, fused loss, compiled blocks)", batch=4, r=16, extra=compiled, **nf4),
        dict(name="peer hf+peft+bnb qlora r=16 B=4 (gc)", kind="peer", batch=4, r=16, gradient_checkpointing=True,
             **big),
        # the same peer under bf16 autocast, as the HF Trainer runs it with bf16=True (the QLoRA ladder's peer):
        # the fp32 LoRA adapters then multiply in bf16
        dict(name="peer hf+peft+bnb qlora r=16 B=4 (gc, bf16 autocast)", kind="peer", batch=4, r=16,
             gradient_checkpointing=True, autocast=True, **big),
        dict(name="optrush qlora nf4 r=16 B=4 (ac, fused loss, compiled blocks, fused dequantize)", batch=4, r=16,
             extra=compiled + ["kernels.fused_dequantize=true"], **nf4),
        dict(name="optrush qlora nf4 r=16 B=4 (ac + offload, fused loss, compiled blocks, fused dequantize)", batch=4,
             r=16, extra=compiled + ["activations.offload=true", "kernels.fused_dequantize=true"], **nf4),
        # selective checkpointing keeps QLoRA's attention outputs only (the quantized matmuls recompute): 1.18x the
        # speed of full at B=1 for +0.5 GiB (ladder_qlora8b_h100); smaller loss chunks pay for that memory at B=4
        dict(name="optrush qlora nf4 r=16 B=4 (selective + offload, fused loss in 2048-token chunks, compiled blocks, "
                  "fused dequantize)", batch=4, r=16,
             extra=["kernels.fused_loss=true", "compile.mode=blocks", "activations.checkpointing=selective",
                    "activations.offload=true", "kernels.loss_chunk_tokens=2048", "kernels.fused_dequantize=true"],
             **nf4),
        dict(name="optrush qlora nf4 r=16 B=4 (ac + offload, fused loss, compiled blocks)", batch=4, r=16,
             extra=compiled + ["activations.offload=true"], **nf4),
    ]
    # the last blocks kept whole (activations.skip_last), paid for by smaller loss chunks: the loss sets the peak
    out += [
        dict(name=f"optrush qlora nf4 r=16 B=4 (ac + offload, last {kept} blocks kept, fused loss in {chunk}-token "
                  "chunks, compiled blocks, fused dequantize)", batch=4, r=16,
             extra=compiled + ["activations.offload=true", "kernels.fused_dequantize=true",
                               f"activations.skip_last={kept}", f"kernels.loss_chunk_tokens={chunk}"], **nf4)
        for kept, chunk in [(1, 2048), (2, 1024), (3, 1024), (3, 512)]
    ]
    # the frozen embedding table (1 GiB) in host memory pays for one more kept block
    out += [
        dict(name=f"optrush qlora nf4 r=16 B=4 (ac + offload, last {kept} blocks kept, fused loss in {chunk}-token "
                  "chunks, compiled blocks, fused dequantize, embedding on host)", batch=4, r=16,
             extra=compiled + ["activations.offload=true", "kernels.fused_dequantize=true",
                               f"activations.skip_last={kept}", f"kernels.loss_chunk_tokens={chunk}",
                               "peft.embedding_on_host=true"], **nf4)
        for kept, chunk in [(2, 1024), (3, 1024), (3, 2048), (4, 1024)]
    ]
    out += [
        dict(name="peer hf+peft+bnb qlora r=16 B=1 (gc)", kind="peer", batch=1, r=16, gradient_checkpointing=True,
             **big),
        dict(name="optrush qlora nf4 r=16 B=1 (ac, fused loss, compiled blocks)", batch=1, r=16, extra=compiled, **nf4),
        dict(name="optrush qlora int8 r=16 B=4 (ac, fused loss, compiled blocks)", kind="optrush", batch=4, r=16,
             quantize="int8", extra=compiled, **big),
        dict(name="optrush qlora nf4 r=16 B=4 (ac, fused loss, eager)", batch=4, r=16, extra=OPTIMIZED, **nf4),
        dict(name="optrush qlora nf4 r=32 B=4 (ac, fused loss, compiled blocks)", batch=4, r=32, extra=compiled, **nf4),
        dict(name="optrush qlora nf4 r=32 B=1 (ac, fused loss, compiled blocks)", batch=1, r=32, extra=compiled, **nf4),
    ]
    one_b = dict(model="llama3.2-1b", seq=2048, batch=4)
    out += [
        dict(name="1B full fine-tune (bf16_mixed)", kind="optrush", r=0, quantize="none",
             extra=["kernels.fused_loss=true", "precision.mode=bf16_mixed"], **one_b),
        dict(name="1B lora r=16 (bf16_mixed)", kind="optrush", r=16, quantize="none",
             extra=["kernels.fused_loss=true", "precision.mode=bf16_mixed"], **one_b),
        dict(name="1B qlora nf4 r=16 (bf16_mixed)", kind="optrush", r=16, quantize="nf4",
             extra=["kernels.fused_loss=true", "precision.mode=bf16_mixed"], **one_b),
    ]
    return out


def checkpoint_for(case: dict, ckpt_root: Path) -> Path:
    """A random-init HF checkpoint of the case's shape (written once; the 8B one with transformers, as the peer)."""
    from optrush.models.io import build_model, save_model
    from optrush.models.presets import get_preset

    path = ckpt_root if case["model"] == "llama3.1-8b" else ckpt_root.parent / f"rand-{case['model']}"
    if not (path / "config.json").is_file():
        device = "cuda" if torch.cuda.is_available() else "cpu"
        args = get_preset(case["model"], **({"vocab_size": 512} if case["model"] == "debug" else {}))
        save_model(build_model(args, dtype=torch.bfloat16, device=device, seed=0), path)
        if device == "cuda":
            torch.cuda.empty_cache()
    return path


def run_optrush(case: dict, path: Path, *, steps: int, warmup: int) -> dict:
    from optrush.config import load_config
    from optrush.models.io import load_model
    from optrush.optim import build_optimizer
    from optrush.train import loop
    from optrush.train.optimizations import apply_optimizations

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peft = [] if case["r"] == 0 else ["peft.method=lora", f"peft.r={case['r']}", f"peft.alpha={case['r']}",
                                      f"peft.quantize={case['quantize']}"]
    overrides = [f"model.path={path}", "precision.mode=bf16_pure", f"train.device={device.type}",
                 f"data.max_length={case['seq']}", f"train.micro_batch_size={case['batch']}", *peft, *case["extra"]]
    cfg = load_config(None, overrides, synthetic_data=True)
    torch.manual_seed(0)
    model = load_model(path, dtype=loop.param_dtype(cfg), device=device,
                       quantize=cfg.peft.quantize)
    model = apply_optimizations(model, cfg)
    model.train()
    optimizer = build_optimizer(model, cfg.optim, lr=1e-4, device_type=device.type)
    weights_gib = torch.cuda.memory_allocated() / GIB if device.type == "cuda" else None
    autocast = loop.precision_context(cfg, device)
    ids = torch.randint(0, model.vocab_size, (case["batch"], case["seq"]), device=device)

    def step():
        with autocast:
            loss = model(ids, labels=ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    measured = timed(step, steps=steps, warmup=warmup, tokens=ids.numel(), device=device)
    return {**measured, **planner_fields(case, cfg, measured, device=device), "weights_gib": weights_gib,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "overrides": overrides}


def planner_fields(case: dict, cfg, measured: dict, *, device: torch.device) -> dict:
    """The keys of an `optrush bench` record, so `benchmarks/plan_accuracy.py` checks the planner against this
    row: the resolved config names the preset the random checkpoint was saved from (the directory is gone)."""
    from optrush.config import to_dict

    config = to_dict(cfg)
    config["model"].update(preset=case["model"], path=None)
    return {"config": config, "peak_mem_gib": measured["peak_gib"], "world_size": 1,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type}


def run_peer(case: dict, path: Path, *, steps: int, warmup: int) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kwargs = {}
    if device.type == "cuda":
        from transformers import BitsAndBytesConfig
        kwargs = dict(quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16), device_map={"": 0})
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa", **kwargs)
    if case["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=case["r"], lora_alpha=case["r"], target_modules="all-linear",
                                             lora_dropout=0.0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                  fused=device.type == "cuda")
    weights_gib = torch.cuda.memory_allocated() / GIB if device.type == "cuda" else None
    ids = torch.randint(0, model.config.vocab_size, (case["batch"], case["seq"]), device=device)

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=case.get("autocast", False))

    def step():
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return {**timed(step, steps=steps, warmup=warmup, tokens=ids.numel(), device=device), "weights_gib": weights_gib,
            "quantized": device.type == "cuda"}


def timed(step, *, steps: int, warmup: int, tokens: int, device: torch.device) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses = [float(step()) for _ in range(warmup)]  # compilation and allocator warm-up, not timed
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    losses.append(float(loss))  # one sync at the end: the timed steps are not serialised by .item()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"tokens_per_s": round(tokens * steps / seconds, 1), "seconds": round(seconds, 3),
            "peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 2) if device.type == "cuda" else None,
            "losses": [round(x, 4) for x in losses]}


def run_case(case: dict, args) -> dict:
    """One case in a fresh process: its own CUDA context and peak-memory statistics."""
    with_ckpt = {**case, "ckpt": str(checkpoint_for(case, Path(args.ckpt)))}
    cmd = [sys.executable, __file__, "--case-json", json.dumps(with_ckpt), "--steps", str(args.steps),
           "--warmup", str(args.warmup)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.case_timeout_s)
    except subprocess.TimeoutExpired:
        return {**case, "error": f"did not finish within --case-timeout-s={args.case_timeout_s:g}"}
    if done.returncode != 0:
        return {**case, "error": (done.stderr.strip().splitlines() or ["(no output)"])[-1][:400]}
    return {**case, **json.loads(done.stdout.strip().splitlines()[-1])}


def markdown(results: list[dict], meta: dict) -> str:
    lines = [f"# QLoRA / LoRA benchmark ({meta['device']})", "",
             f"Steps timed: {meta['steps']} after {meta['warmup']} warm-up, {meta.get('repeats', 1)} repeat(s); "
             "provenance in the JSON.", "",
             "| case | repeat | tokens/s | peak GiB | weights GiB | trainable params |", "|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | {r.get('repeat', 0)} | error: {r['error']} | | | |")
        else:
            fmt = lambda v: "-" if v is None else f"{v:.2f}"
            lines.append(f"| {r['name']} | {r.get('repeat', 0)} | {r['tokens_per_s']:,.0f} | {fmt(r['peak_gib'])} "
                         f"| {fmt(r['weights_gib'])} | {r.get('trainable_params', '-')} |")
    if meta.get("repeats", 1) > 1:
        lines += ["", *summary_table(results)]
    return "\n".join(lines) + "\n"


def summary_table(results: list[dict]) -> list[str]:
    """Median over repeats, and each optrush case against the peer of the same batch in the same round: the
    issue's peer (no autocast) and, where it ran, the same peer under bf16 autocast."""
    ok = [r for r in results if "error" not in r]
    lines = ["| case | runs | median tokens/s | vs peer (median, min-max) | vs peer with bf16 autocast "
             "| max peak GiB | peak vs peer |", "|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["name"] for r in ok):
        runs = [r for r in ok if r["name"] == name]
        speed = statistics.median(r["tokens_per_s"] for r in runs)
        peak = max((r["peak_gib"] for r in runs if r["peak_gib"]), default=None)  # None on CPU
        ratio, pairs = ratio_to_peer(runs, ok, autocast=False)
        autocast_ratio, _ = ratio_to_peer(runs, ok, autocast=True)
        peer_peak = min((p["peak_gib"] for _, p in pairs if p["peak_gib"]), default=None)  # None on CPU
        vs_peak = f"{peak / peer_peak:.3f}x" if peak and peer_peak else ""
        shown_peak = "-" if peak is None else f"{peak:.2f}"
        lines.append(f"| {name} | {len(runs)} | {speed:,.0f} | {ratio} | {autocast_ratio} | {shown_peak} "
                     f"| {vs_peak} |")
    return lines


def ratio_to_peer(runs: list[dict], ok: list[dict], *, autocast: bool) -> tuple[str, list[tuple[dict, dict]]]:
    """'median (min-max)' of the optrush `runs` over the peer (with or without autocast) of the same batch and
    round, and the (run, peer run) pairs; empty for peers themselves."""
    peers = {(r["batch"], r.get("repeat", 0)): r for r in ok
             if r["kind"] == "peer" and r.get("autocast", False) == autocast}
    pairs = [(r, peers[r["batch"], r.get("repeat", 0)]) for r in runs
             if r["kind"] != "peer" and (r["batch"], r.get("repeat", 0)) in peers]
    if not pairs:
        return "", pairs
    ratios = [r["tokens_per_s"] / p["tokens_per_s"] for r, p in pairs]
    return f"{statistics.median(ratios):.3f}x ({min(ratios):.3f}-{max(ratios):.3f})", pairs


def select_cases(every: list[dict], *, only: str | None, exact: list[str]) -> list[dict]:
    names = [c["name"] for c in every]
    unknown = [name for name in exact if name not in names]
    if unknown:
        raise SystemExit(f"--case {unknown[0]!r} is not a case name; the cases are:\n  " + "\n  ".join(names))
    return [c for c in every if (not exact or c["name"] in exact)
            and (not only or any(part in c["name"] for part in only.split(",")))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="qlora")
    parser.add_argument("--ckpt", default="/tmp/rand8b", help="the 8B random checkpoint (shared with the peer)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="run the selected cases this many times, round-robin")
    parser.add_argument("--smoke", action="store_true", help="debug-size cases on CPU: checks the script runs")
    parser.add_argument("--only", help="comma-separated substrings: run the cases whose name contains one")
    parser.add_argument("--case", action="append", default=[], help="run the case of exactly this name (repeatable)")
    parser.add_argument("--case-timeout-s", type=float, default=None, help="record a case as failed after this")
    parser.add_argument("--case-json", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = parser.parse_args()
    if args.case_json:
        case = json.loads(args.case_json)
        run = run_peer if case["kind"] == "peer" else run_optrush
        print(json.dumps(run(case, Path(case["ckpt"]), steps=args.steps, warmup=args.warmup)))
        return
    if args.smoke:
        args.steps, args.warmup = 2, 1
        args.ckpt = str(Path(args.out) / "rand-debug")
    from optrush.bench.provenance import provenance

    meta = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "steps": args.steps,
            "warmup": args.warmup, "repeats": args.repeats, "smoke": args.smoke, "provenance": provenance(),
            "peer_reference": "issue #6: HF+PEFT+bnb NF4 double quant, gc: B=1 4,877 tok/s 9.31 GiB; "
                              "B=4 6,084 tok/s 19.72 GiB (H100)"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    selected = select_cases(cases(args.smoke), only=args.only, exact=args.case)
    results = []
    for repeat, case in ((repeat, case) for repeat in range(args.repeats) for case in selected):
        results.append({**run_case(case, args), "repeat": repeat})
        print(json.dumps(results[-1]), flush=True)
        # written after every case: a device command cut short keeps what it measured
        (out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
        (out / f"{args.name}.md").write_text(markdown(results, meta))
    print(f"wrote {out / args.name}.json and .md")


if __name__ == "__main__":
    main()
