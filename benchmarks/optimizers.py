"""Optimizer benchmark: state memory and step time on the Llama-3.2-1B shape, and a 200-step convergence comparison.

    python benchmarks/optimizers.py --out benchmarks/results --name optimizers_h100     # one GPU, ~10 minutes
    python benchmarks/optimizers.py --smoke --out /tmp/optimizers                      # CPU run of the script itself

Writes <name>.json (every number, the settings and the provenance record) and <name>.md (the tables).

1. Memory and speed, per optimizer configuration: a random-init model of the `llama3.2-1b` preset (fp32 weights
   for bf16_mixed, bf16 for bf16_pure), forward + backward on one row of `--seq` random tokens, then the optimizer
   step. "State GiB" is the GPU memory the first step allocates (the optimizer state; with offload it lives on the
   CPU), "counted GiB" the bytes of the state tensors themselves (quantized ones by their packed storage). The first
   `--warmup` steps (which include torchao's compilation) are excluded; then the optimizer step alone and the whole
   iteration are timed over `--repeats` iterations with CUDA events, median reported. `LORA_CASES` do the same with
   LoRA r=16 on every linear: torchao's 8-bit AdamW stepping each of the 224 adapter factors with its own compiled
   call (`optim.low_bit_min_numel=0`) against optrush's default, which steps them together (optrush.optim.low_bit).
2. Convergence: `optrush train` of the demo recipe (synthetic recipes, `demo` preset) for `--steps` steps with each
   optimizer (same data order and seed), reporting the loss curve, the final eval loss and tokens/s. Learning
   rates follow each method's guidance relative to the recipe's AdamW lr (table `CONVERGENCE`).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from optrush.bench.provenance import provenance
from optrush.config import load_config
from optrush.config.schema import OptimConfig, PeftConfig
from optrush.models.io import build_model
from optrush.models.presets import get_preset
from optrush.optim import build_optimizer
from optrush.peft import apply_lora

GIB = 2 ** 30

# (label, optim.* settings, precision.mode)
MEMORY_CASES = [
    ("adamw (fused)", {}, "bf16_mixed"),
    ("adamw (foreach)", {"fused": False}, "bf16_mixed"),
    ("adamw8bit", {"name": "adamw8bit"}, "bf16_mixed"),
    ("adamw4bit", {"name": "adamw4bit"}, "bf16_mixed"),
    ("adafactor", {"name": "adafactor"}, "bf16_mixed"),
    ("lion", {"name": "lion"}, "bf16_mixed"),
    ("muon", {"name": "muon"}, "bf16_mixed"),
    ("schedule_free_adamw", {"name": "schedule_free_adamw"}, "bf16_mixed"),
    ("adamw + offload", {"offload": True}, "bf16_mixed"),
    ("adamw bf16_pure", {}, "bf16_pure"),
    ("adamw bf16_pure fp32-state kahan", {"state_dtype": "fp32", "bf16_update": "kahan"}, "bf16_pure"),
    ("adamw bf16_pure stochastic", {"bf16_update": "stochastic"}, "bf16_pure"),
    ("adamw8bit bf16_pure stochastic", {"name": "adamw8bit", "bf16_update": "stochastic"}, "bf16_pure"),
]

# the same, on the model with LoRA r=16 on every linear (only the adapters train)
LORA_CASES = [
    ("lora adamw (fused)", {}, "bf16_mixed"),
    ("lora adamw8bit, per-tensor torchao step", {"name": "adamw8bit", "low_bit_min_numel": 0}, "bf16_mixed"),
    ("lora adamw8bit", {"name": "adamw8bit"}, "bf16_mixed"),
]

# (label, overrides of the demo recipe, whose AdamW lr is 3e-3 with weight decay 0.01)
CONVERGENCE = [
    ("adamw", []),
    ("adamw8bit", ["optim.name=adamw8bit"]),
    ("adamw4bit", ["optim.name=adamw4bit"]),
    ("adafactor", ["optim.name=adafactor", "train.lr=1e-2"]),  # relative step size: torch's default lr
    ("lion", ["optim.name=lion", "train.lr=3e-4", "optim.weight_decay=0.1"]),  # 10x smaller lr, 10x larger wd
    ("muon", ["optim.name=muon"]),
    ("schedule_free_adamw", ["optim.name=schedule_free_adamw", "train.schedule=constant"]),
    ("adamw bf16_pure", ["precision.mode=bf16_pure"]),
    ("adamw bf16_pure kahan", ["precision.mode=bf16_pure", "optim.bf16_update=kahan"]),
    ("adamw bf16_pure stochastic", ["precision.mode=bf16_pure", "optim.bf16_update=stochastic"]),
]


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors; a tensor subclass (torchao's quantized state) counts the plain
    tensors it is made of."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if not isinstance(value, torch.Tensor):
                continue
            if type(value) is torch.Tensor:
                total += value.nbytes
            else:
                names, _ = value.__tensor_flatten__()
                total += sum(getattr(value, name).nbytes for name in names)
    return total


def memory_case(label: str, optim: dict, mode: str, *, preset: str, seq: int, warmup: int, repeats: int,
                device: torch.device, lora: bool = False) -> dict:
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the previous case's model and state are gone by now
        torch.cuda.reset_peak_memory_stats()
    dtype = torch.bfloat16 if mode == "bf16_pure" else torch.float32
    args = get_preset(preset)
    model = build_model(args, dtype=dtype, device=device, seed=0)
    if lora:
        model = apply_lora(model, PeftConfig(method="lora", r=16))
    cfg = OptimConfig(**optim)
    optimizer = build_optimizer(model, cfg, lr=1e-5, device_type=device.type)
    tokens = torch.randint(0, args.vocab_size, (1, seq + 1), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "bf16_mixed")

    def backward():
        with autocast:
            loss = model(tokens[:, :-1], labels=tokens[:, 1:])
        loss.backward()

    cuda = device.type == "cuda"
    backward()
    before = torch.cuda.memory_allocated() if cuda else 0
    optimizer.step()
    after = torch.cuda.memory_allocated() if cuda else 0
    optimizer.zero_grad(set_to_none=True)
    for _ in range(warmup):
        backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    step_ms, iteration_ms = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        backward()
        step = timed(optimizer.step, cuda=cuda)
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        iteration_ms.append((time.perf_counter() - started) * 1e3)
        step_ms.append(step)
    counted = None if cfg.offload else state_bytes(optimizer)
    result = {"label": label, "optim": optim, "precision": mode, "preset": preset, "lora_r": 16 if lora else None,
              "params": sum(p.numel() for p in model.parameters()),
              "trainable_tensors": sum(p.requires_grad for p in model.parameters()),
              "state_gib": (after - before) / GIB if cuda else None,
              "counted_state_gib": counted / GIB if counted is not None else None,
              "step_ms": statistics.median(step_ms), "iteration_ms": statistics.median(iteration_ms),
              "peak_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None}
    return result


def timed(fn, *, cuda: bool) -> float:
    if not cuda:
        started = time.perf_counter()
        fn()
        return (time.perf_counter() - started) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def demo_data(directory: Path, *, records: int) -> list[str]:
    """The demo's synthetic recipe corpus and tokenizer (as `optrush demo` makes them); returns the overrides."""
    from optrush.cli.demo import train_demo_tokenizer
    from optrush.data.clean import clean_records
    from optrush.data.recipes import generate_recipes, write_jsonl

    kept, _ = clean_records(list(generate_recipes(records, seed=0)))
    write_jsonl(kept, directory / "recipes.jsonl")
    train_demo_tokenizer(kept, directory / "tokenizer")
    return [f"data.path={directory / 'recipes.jsonl'}", f"data.tokenizer={directory / 'tokenizer'}"]


def convergence_case(label: str, overrides: list[str], *, data: list[str], steps: int, out: Path,
                     extra: list[str]) -> dict:
    from optrush.cli.demo import demo_config_path
    from optrush.train import train

    cfg = load_config(demo_config_path(), data + overrides + extra + [
        f"output_dir={out / label.replace(' ', '_')}", f"train.max_steps={steps}", f"train.eval_every={steps}",
        "checkpoint.every=0", "checkpoint.save_final=false", "checkpoint.resume=never", "logging.progress=false",
        f"train.warmup_steps={min(10, steps)}"])
    summary = train(cfg)
    return {"label": label, "overrides": overrides, "losses": summary["losses"],
            "final_loss": summary["final_loss"], "eval_loss": summary.get("eval_loss"),
            "tokens_per_s": summary["tokens_per_s"], "peak_mem_gib": summary["peak_mem_gib"]}


def markdown(record: dict) -> str:
    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    lines = [f"# Optimizers ({record['device']})", "",
             (f"## State memory and step time: `{record['settings']['preset']}` shape, one row of "
              f"{record['settings']['seq']} tokens"), "",
             "| optimizer | precision | state GiB (allocated) | state GiB (counted) | step ms | iteration ms |",
             "|---|---|---:|---:|---:|---:|"]
    for r in record["memory"]:
        lines.append(f"| {r['label']} | {r['precision']} | {num(r['state_gib'], '.3f')} | "
                     f"{num(r['counted_state_gib'], '.3f')} | {r['step_ms']:.1f} | {r['iteration_ms']:.1f} |")
    if not record["convergence"]:
        return "\n".join(lines) + "\n"
    lines += ["", f"## Convergence: demo recipe, {record['settings']['steps']} steps", "",
              "| optimizer | overrides | loss @25% | loss @50% | final loss | eval loss | tokens/s |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for r in record["convergence"]:
        losses = r["losses"]
        lines.append(f"| {r['label']} | `{' '.join(r['overrides'])}` | {losses[len(losses) // 4]:.3f} | "
                     f"{losses[len(losses) // 2]:.3f} | {r['final_loss']:.3f} | {num(r['eval_loss'], '.3f')} | "
                     f"{r['tokens_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="optimizers")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run: debug preset, a few steps")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--steps", type=int, default=200, help="convergence steps per optimizer; 0 skips that part")
    parser.add_argument("--only", help="comma-separated substrings: run the cases whose label contains one")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    preset, records, extra = "llama3.2-1b", 6000, []
    if args.smoke:
        args.seq, args.warmup, args.repeats, args.steps = 32, 1, 2, 4
        preset, records = "debug", 300
        extra = ["model.preset=debug", "train.device=cpu", "data.max_length=128", "train.micro_batch_size=2",
                 "train.eval_batches=1"]
    cases = [(*c, False) for c in MEMORY_CASES if device.type == "cuda" or not c[1].get("offload")]
    cases += [(*c, True) for c in LORA_CASES]
    if args.smoke:  # torchao compiles its step per tensor shape: minutes on a CPU, for nothing the smoke run checks;
        # the debug model's tensors are all under the default optim.low_bit_min_numel, so only a 0 there compiles
        cases = [c for c in cases if c[1].get("low_bit_min_numel") != 0]
    def wanted(label: str) -> bool:
        return not args.only or any(part in label for part in args.only.split(","))

    memory = []
    for label, optim, mode, lora in filter(lambda c: wanted(c[0]), cases):
        memory.append(memory_case(label, optim, mode, preset=preset, seq=args.seq, warmup=args.warmup,
                                  repeats=args.repeats, device=device, lora=lora))
        print(json.dumps(memory[-1]), flush=True)

    convergence = []
    runs = [c for c in CONVERGENCE if not (args.smoke and "bit" in " ".join(c[1])) and wanted(c[0]) and args.steps]
    with tempfile.TemporaryDirectory() as tmp:
        data = demo_data(Path(tmp), records=records)
        for label, overrides in runs:
            convergence.append(convergence_case(label, overrides, data=data, steps=args.steps,
                                                out=Path(tmp) / "runs", extra=extra))
            print(json.dumps({k: v for k, v in convergence[-1].items() if k != "losses"}), flush=True)

    record = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "settings": {"preset": preset, "seq": args.seq, "warmup": args.warmup, "repeats": args.repeats,
                           "steps": args.steps, "smoke": args.smoke},
              "memory": memory, "convergence": convergence, "provenance": provenance()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(record, indent=1))
    (out / f"{args.name}.md").write_text(markdown(record))
    print(markdown(record))


if __name__ == "__main__":
    main()
