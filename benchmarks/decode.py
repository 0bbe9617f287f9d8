"""Decode throughput: optrush KV-cache decoding (eager and with a compiled decode step) vs transformers `generate`,
same weights, same prompts, same run. Greedy, every row decodes exactly `--new-tokens` tokens (no EOS).

    python benchmarks/decode.py --out benchmarks/results --name decode_h100     # 1B shape, bf16, batch 1 and 32
    python benchmarks/decode.py --tiny --out /tmp/d                              # CPU smoke run of the script

tokens/s = batch * new tokens / wall time of the whole call (prefill included), median of `--repeats` calls after
warm-up calls (which include compilation). Weights are random (llama3.2-1b shape): speed does not depend on them.
Writes <name>.json (numbers + provenance) and <name>.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from optrush.bench.provenance import provenance
from optrush.generate.decode import generate_batch
from optrush.models import build_model
from optrush.models.hf import hf_config_from_args, to_hf_state_dict
from optrush.models.presets import get_preset


def timed(fn, *, warmup: int, repeats: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def hf_twin(model, dtype: torch.dtype, device: torch.device):
    import transformers

    config = transformers.LlamaConfig(**{k: v for k, v in hf_config_from_args(model.args, dtype=dtype).items()
                                         if k not in ("architectures", "model_type")})
    with torch.device(device):
        hf = transformers.LlamaForCausalLM(config).to(dtype)
    hf.load_state_dict(to_hf_state_dict(model.state_dict()), strict=False)
    return hf.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="decode_h100")
    ap.add_argument("--no-compile", action="store_true")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args = get_preset("debug" if a.tiny else "llama3.2-1b", max_seq_len=a.prompt_len + a.new_tokens)
    if a.tiny:
        a.prompt_len, a.new_tokens, a.repeats, a.batches = 8, 8, 1, [1, 2]
    model = build_model(args, dtype=dtype, device=device, seed=0).eval()
    hf = hf_twin(model, dtype, device)
    compiled = None if a.no_compile else torch.compile(model, dynamic=False)
    rows = []
    for batch in a.batches:
        g = torch.Generator().manual_seed(batch)
        prompts = torch.randint(0, args.vocab_size, (batch, a.prompt_len), generator=g)
        ids = prompts.to(device)

        def run_hf():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.new_tokens,
                               min_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0)

        def run_ours(step_fn=None):
            return generate_batch(model, prompts.tolist(), max_new_tokens=a.new_tokens, temperature=0,
                                  step_fn=step_fn)

        cases = {"transformers generate": run_hf, "optrush eager": run_ours}
        if compiled is not None:
            cases["optrush compiled step"] = lambda: run_ours(compiled)
        for name, fn in cases.items():
            try:
                seconds = timed(fn, warmup=2 if "compiled" in name else 1, repeats=a.repeats, device=device)
                rows.append({"batch": batch, "impl": name, "seconds": seconds,
                             "tokens_per_s": batch * a.new_tokens / seconds})
            except Exception as err:  # a benchmark row that fails is reported, the others still run
                rows.append({"batch": batch, "impl": name, "error": f"{type(err).__name__}: {err}"[:500]})
            print(json.dumps(rows[-1]), flush=True)
        same = [t.tolist() for t in run_hf()[:, a.prompt_len:]] == run_ours()
        rows.append({"batch": batch, "impl": "greedy tokens equal transformers", "equal": same})
        print(json.dumps(rows[-1]), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    setup = {"shape": "debug" if a.tiny else "llama3.2-1b", "dtype": str(dtype), "prompt_len": a.prompt_len,
             "new_tokens": a.new_tokens, "repeats": a.repeats}
    (out / f"{a.name}.json").write_text(json.dumps({"setup": setup, "rows": rows, "provenance": provenance()},
                                                   indent=2) + "\n")
    lines = [f"# Decode throughput ({setup['shape']}, {setup['dtype']}, prompt {a.prompt_len}, "
             f"{a.new_tokens} new tokens, greedy)", "", "| batch | implementation | tokens/s | vs transformers |",
             "| ---: | --- | ---: | ---: |"]
    for batch in a.batches:
        base = next((r.get("tokens_per_s") for r in rows if r["batch"] == batch and r["impl"] == "transformers generate"), None)
        for r in rows:
            if r["batch"] != batch or "equal" in r:
                continue
            if "error" in r:
                lines.append(f"| {batch} | {r['impl']} | error: {r['error'][:80]} | |")
            else:
                ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else ""
                lines.append(f"| {batch} | {r['impl']} | {r['tokens_per_s']:.0f} | {ratio} |")
    lines += ["", "Greedy tokens equal transformers': " + ", ".join(
        f"batch {r['batch']}: {r['equal']}" for r in rows if "equal" in r) + " (bf16: ties may differ)."]
    (out / f"{a.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
