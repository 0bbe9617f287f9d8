"""Issue #5 target "real length mix": padded vs sorted vs packed micro-batches of SFT-like lengths, one epoch each.

    python benchmarks/length_mix.py --peer .shared_gpu/baseline-peers.py --budget-s 450   # one H100, ~5-7 min
    python benchmarks/length_mix.py --only bfd_varlen bfd_flex                   # just these cases (no peer)
    python benchmarks/length_mix.py --smoke                                      # debug model on CPU (sdpa cases)

Data: the length mix of `baseline-peers.py` (the peer's generator, reimplemented with its seed: lognormal lengths,
median 350, sigma 0.8, clipped to [32, 2048], 4000 draws, mean ~477), of which the first `--examples` are used,
as text documents of uniformly random words through a word-level tokenizer of the Llama 3 vocabulary size (one
word = one token; built here, saved with the corpus under --work), so each example is exactly its drawn length
in tokens and every token is trained. The corpus goes through the real pipeline: `optrush bench` on the config's
own data (tokenized once into `data.cache_dir`, then planned and collated by the training loader).

Batches: the peer's fixed 8192 padded-token budget (`data.batch_tokens=8192`): padded cases hold as many rows as
keep rows x longest <= 8192, bfd cases 4 rows of 2048. Cases, each `optrush bench` in its own process, all on the
Llama-3.2-1B shape (random init), bf16 weights and AdamW states, each block compiled, fused linear+cross-entropy:
  (a) padded_random  data.packing=none   (random order, padded to the longest of each micro-batch; SDPA causal)
  (b) sorted         data.packing=sorted (sorted by length, micro-batches shuffled: the seed author's method)
  (c) bfd_sdpa       data.packing=bfd, model.attention=sdpa   (document mask as a dense boolean mask)
  (d) bfd_varlen     data.packing=bfd, model.attention=varlen (FlashAttention varlen: no padding in attention)
  (e) bfd_flex       data.packing=bfd, model.attention=flex   (FlexAttention document-causal block mask)
Every case trains exactly one epoch over the same examples: 3 warm-up steps (compilation: the padded cases
compile once with symbolic shapes, `compile.dynamic=true`, as their shape changes every step), then the rest of
the epoch timed. Reported: non-padding tokens/s, padding fraction, peak GPU memory, and the epoch's mean loss per
trained token (the same examples in every case, the same initial weights from `train.seed`).
`train.lr=1e-9`: an update that small is lost when written into bf16 weights (round to nearest), so the weights do
not move and each case's epoch loss depends on its examples alone: padded and packed must agree up to bf16
arithmetic (|difference| <= 5e-3 on the GPU; the CPU smoke runs in fp32 and checks 1e-4). The optimizer
step still runs in full: its cost does not depend on the learning rate. The exact check, fp32 on CPU, is
`tests/test_data_pack.py::test_token_budget_epoch_loss_is_the_same_padded_or_packed` (and
`tests/test_models.py::test_packed_forward_equals_each_document_alone`).

Peer (`--peer PATH` to `baseline-peers.py`, skipped when missing; `.shared_gpu/` holds a copy of
`../shared/gpu/baseline-peers.py` that travels to the device when carried): its `lengthmix_random` and
`lengthmix_sorted` sections (HF LlamaForCausalLM, eager SDPA, same lengths and budget, 8 warm-up + 40 timed
batches), each in its own process in this same command (first, then the packed cases, then the rest:
`--budget-s` stops starting cases when the time is spent), so the ratios are measured on one machine in one run. Issue #5's target: bfd +
varlen or flex >= 1.8x the sorted peer and >= 4x the padded peer, with the same loss as unpacked.
Output: `<out>/length_mix_<gpu>.json` (every record, provenance included) and `.md`, rewritten after each case.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's optrush, installed or not

from optrush.bench.ladder import run_child  # noqa: E402
from optrush.bench.provenance import provenance, provenance_line, write_result  # noqa: E402
from optrush.data.pack import plan_batches  # noqa: E402

LLAMA3_VOCAB = 128256
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"]
CASES = {  # name -> overrides
    # padded micro-batches change shape every step: one compile with symbolic shapes, no recompiles while timed
    "padded_random": ["data.packing=none", "model.attention=sdpa", "compile.dynamic=true"],
    "sorted": ["data.packing=sorted", "model.attention=sdpa", "compile.dynamic=true"],
    "bfd_sdpa": ["data.packing=bfd", "model.attention=sdpa"],
    "bfd_varlen": ["data.packing=bfd", "model.attention=varlen"],
    "bfd_flex": ["data.packing=bfd", "model.attention=flex"],
}
RUN_ORDER = ["bfd_varlen", "bfd_flex", "padded_random", "sorted", "bfd_sdpa"]
"""The targets' cases first, so that a run cut short by the time limit still has them."""
GPU = dict(preset="llama3.2-1b", vocab=LLAMA3_VOCAB, max_length=2048, batch_tokens=8192, examples=1000,
           cases=list(CASES), loss_tolerance=5e-3,
           overrides=["precision.mode=bf16_pure", "compile.mode=blocks", "kernels.fused_loss=true",
                      "train.device=cuda"])
# the same mix scaled down 32x (lengths 2..64 tokens) on the debug model, in fp32 so losses compare exactly
SMOKE = dict(preset="debug", vocab=512, max_length=64, batch_tokens=256, examples=160,
             cases=["padded_random", "sorted", "bfd_sdpa"], loss_tolerance=1e-4,
             overrides=["precision.mode=fp32", "compile.mode=none", "kernels.fused_loss=true", "train.device=cpu"])
COMMON = ["objective=causal_lm", "data.format=text", "data.eval_fraction=0", "train.lr=1e-9",
          "train.schedule=constant", "train.warmup_steps=0", "train.max_steps=100000", "train.seed=0"]


def peer_lengths(n: int = 4000, *, seed: int = 0, scale: int = 1) -> list[int]:
    """`baseline-peers.py`'s lengths: lognormal (median 350 tokens, sigma 0.8) clipped to [32, 2048], drawn with
    `random.Random(seed)` in its order; `scale` divides them (the CPU smoke's short documents)."""
    rng = random.Random(seed)
    lengths = [min(2048, max(32, int(math.exp(rng.gauss(math.log(350), 0.8))))) for _ in range(n)]
    return [max(2, length // scale) for length in lengths]


def write_corpus(work: Path, lengths: list[int], *, vocab: int, seed: int) -> tuple[Path, Path]:
    """A JSONL of random-word documents whose examples are exactly `lengths` tokens, and the word-level tokenizer
    that reads them (word `w<i>` is token i; BOS/EOS/PAD are 0/1/2). Returns (data file, tokenizer directory)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer_dir, data_path = work / "tokenizer", work / "data.jsonl"
    words = {f"w{i}": i for i in range(len(SPECIALS), vocab)}
    tok = Tokenizer(models.WordLevel({**{s: i for i, s in enumerate(SPECIALS)}, **words}, unk_token=SPECIALS[2]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[0], eos_token=SPECIALS[1],
                            pad_token=SPECIALS[2]).save_pretrained(tokenizer_dir)
    rng = np.random.default_rng(seed)
    with data_path.open("w", encoding="utf-8") as out:
        for length in lengths:  # [BOS] + length-1 words + [EOS]: `length` inputs, `length` trained targets
            ids = rng.integers(len(SPECIALS), vocab, size=length - 1)
            out.write(json.dumps({"text": " ".join(f"w{i}" for i in ids.tolist())}) + "\n")
    return data_path, tokenizer_dir


def common_overrides(spec: dict, *, data_path: Path, tokenizer_dir: Path, work: Path) -> list[str]:
    """The config every case shares (`spec`: GPU or SMOKE); a case adds its packing and attention."""
    return [*COMMON, f"model.preset={spec['preset']}", f"data.path={data_path}", f"data.tokenizer={tokenizer_dir}",
            f"data.cache_dir={work / 'cache'}", f"data.max_length={spec['max_length']}",
            f"data.batch_tokens={spec['batch_tokens']}", f"output_dir={work / 'runs'}", *spec["overrides"]]


def epoch_batches(lengths: list[int], *, packing: str, max_length: int, batch_tokens: int, seed: int) -> int:
    """Micro-batches in epoch 0 of the training loader (same planner, same order seed `train.seed`)."""
    return len(plan_batches(lengths, strategy=packing, rows=1, max_length=max_length, order_seed=seed,
                            batch_tokens=batch_tokens))


def run_case(name: str, overrides: list[str], *, warmup: int, steps: int, timeout_s: float, logs: Path) -> dict:
    """`optrush bench` (config's own data) in a fresh process, as a ladder rung runs: its record, or why it did not
    run (its output in `logs/<name>.log`)."""
    command = [sys.executable, "-m", "optrush", "bench", *overrides, "--warmup", str(warmup), "--steps", str(steps),
               "--name", name]
    return run_child(command, name=name, timeout_s=timeout_s, logs=logs)


def epoch_loss(record: dict) -> float:
    """Mean loss per trained token over every step (warm-up included: together they are the epoch)."""
    units = record["step_units"]
    return sum(loss * n for loss, n in zip(record["losses"], units)) / sum(units)


def run_peer(path: Path, section: str, *, timeout_s: float) -> dict:
    """One section of baseline-peers.py in its own process: its `hf_1b_<section>` record and the length mix."""
    with tempfile.TemporaryDirectory() as out:
        try:
            proc = subprocess.run([sys.executable, str(path), section], env={**os.environ, "OUT": out},
                                  timeout=timeout_s, capture_output=True, text=True, check=False)
        except subprocess.TimeoutExpired:
            return {"status": "failed", "reason": f"timed out after {timeout_s:.0f}s"}
        found = Path(out) / "peers.json"
        record = json.loads(found.read_text(encoding="utf-8")) if found.exists() else {}
    result = record.get(f"hf_1b_{section}")
    if not isinstance(result, dict):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"status": "failed", "reason": str(result or f"exit {proc.returncode}: {tail[0][:300]}")}
    return {"status": "ok", **result, "length_mix": record.get("length_mix"), "gpu": record.get("gpu"),
            "torch": record.get("torch")}


def summarize(record: dict, *, tolerance: float) -> dict:
    """Epoch losses, their difference from the padded case, and speed ratios against (a), (b) and the peers."""
    cases = {r["name"]: r for r in record["cases"] if r.get("status") == "ok"}
    for result in cases.values():
        result["epoch_loss"] = epoch_loss(result)
    ratios, losses = {}, {}
    bases = {f"x {name}": cases[name]["real_tokens_per_s"] for name in ("padded_random", "sorted") if name in cases}
    bases.update({f"x HF {name}": peer["nonpad_tok_s"] for name, peer in record["peers"].items()
                  if peer.get("status") == "ok"})
    for name, result in cases.items():
        ratios[name] = {base: result["real_tokens_per_s"] / speed for base, speed in bases.items()}
        if "padded_random" in cases:
            delta = result["epoch_loss"] - cases["padded_random"]["epoch_loss"]
            losses[name] = {"delta_vs_padded": delta, "same_loss": abs(delta) <= tolerance}
    return {"ratios": ratios, "loss": losses, "loss_tolerance": tolerance, "target": target(cases, ratios, losses)}


def target(cases: dict, ratios: dict, losses: dict) -> dict | None:
    """Issue #5: the faster of bfd + varlen / flex against the HF peers of the same run (>= 1.8x sorted, >= 4x
    padded) with the same loss as the padded case; None until that case and both peers ran."""
    packed = [name for name in ("bfd_varlen", "bfd_flex") if name in cases]
    if not packed or not {"x HF random", "x HF sorted"} <= set(ratios[packed[0]]):
        return None
    best = max(packed, key=lambda name: cases[name]["real_tokens_per_s"])
    vs_sorted, vs_padded = ratios[best]["x HF sorted"], ratios[best]["x HF random"]
    same = losses.get(best, {}).get("same_loss", False)
    return {"case": best, "x_hf_sorted": vs_sorted, "x_hf_padded": vs_padded, "same_loss": same,
            "met": vs_sorted >= 1.8 and vs_padded >= 4 and same}


def slowest_step(result: dict) -> str:
    """The slowest timed step against the median one: a recompilation inside the timed epoch stands out here."""
    timed = result.get("step_seconds", [])[result["warmup"]:]
    if not timed:
        return "n/a"
    return f"{max(timed):.2f} s ({max(timed) / float(np.median(timed)):.1f}x median)"


def markdown(record: dict) -> str:
    summary, stats = record["summary"], record["length_mix"]
    bases = sorted({base for r in summary["ratios"].values() for base in r}, key=lambda b: ("HF" in b, b))
    lines = [f"# Real length mix: padded vs sorted vs packed, {record['model']} shape, {stats['batch_tokens']}-token "
             "budget", "",
             "| " + " | ".join(["case", "non-pad tokens/s", "padding", "peak GiB", "steps", "slowest timed step",
                                "epoch loss", "Δ loss vs padded", *bases]) + " |", "|" + "---|" * (8 + len(bases))]
    for result in record["cases"]:
        if result.get("status") != "ok":
            lines.append(f"| {result['name']} | {result.get('status')}: {result.get('reason', '')[:150]} |"
                         + " |" * (6 + len(bases)))
            continue
        name, loss = result["name"], summary["loss"].get(result["name"], {})
        delta = f"{loss['delta_vs_padded']:+.2e}" if loss else "n/a"
        cells = [name, f"{result['real_tokens_per_s']:,.0f}", f"{result['padding_fraction']:.1%}",
                 f"{result['peak_mem_gib']:.1f}", f"{result['warmup']}+{result['steps']}", slowest_step(result),
                 f"{result['epoch_loss']:.5f}", delta]
        cells += [f"{summary['ratios'][name][b]:.2f}" if b in summary["ratios"][name] else "n/a" for b in bases]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for name, peer in record["peers"].items():
        shown = (f"{peer['nonpad_tok_s']:,} non-pad tokens/s, padding {peer['pad_frac']:.1%}, peak "
                 f"{peer['peak_gib']} GiB" if peer.get("status") == "ok" else f"{peer['status']}: {peer['reason']}")
        lines.append(f"- peer HF {name} (baseline-peers.py lengthmix_{name}, same command): {shown}")
    first = next((r for r in record["cases"] if r.get("status") == "ok"), None)
    goal = summary["target"]
    if goal is not None:
        lines.append(f"- **target (issue #5): {'met' if goal['met'] else 'not met'}**: {goal['case']} is "
                     f"{goal['x_hf_sorted']:.2f}x the HF sorted peer (>= 1.8), {goal['x_hf_padded']:.2f}x the HF "
                     f"padded peer (>= 4), same loss as padded: {goal['same_loss']}")
    lines += [f"- lengths: the first {stats['examples']} of baseline-peers.py's draws (lognormal, clipped to "
              f"[{stats['min']}, {stats['max']}]): mean {stats['mean']:.0f}, max {stats['max']} tokens, "
              f"{stats['tokens']:,} tokens; every case trains exactly this one epoch ({stats['tokens']:,} trained "
              f"tokens) and times all but its {record.get('warmup', 3)} warm-up steps",
              f"- same loss: epoch mean loss per token, weights held still by a 1e-9 lr (lost in bf16 weights); "
              f"|Δ| <= {summary['loss_tolerance']:g} counts as the same",
              "- each case `optrush bench` in its own process: " + " ".join(f"`{o}`" for o in record["common"])]
    if first is not None:
        lines.append(provenance_line(first["provenance"], first["device"]))
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="debug model on CPU, results under /tmp")
    parser.add_argument("--only", nargs="*", default=None, help="run just these cases (names above)")
    parser.add_argument("--peer", default=None, help="path to baseline-peers.py (skipped when missing)")
    parser.add_argument("--examples", type=int, default=None, help="documents in the epoch (default: 1000)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--timeout-s", type=float, default=180.0, help="per case (default: 180)")
    parser.add_argument("--budget-s", type=float, default=0.0,
                        help="start no case after this many seconds (0 = no limit); those left are 'skipped'")
    parser.add_argument("--work", default=None, help="corpus, tokenizer and cache folder, kept (default: a temp "
                        "dir, removed at the end)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--name", default=None, help="output stem (default: length_mix_<gpu>)")
    args = parser.parse_args()
    unknown = set(args.only or ()) - set(CASES)
    if unknown:
        parser.error(f"unknown case(s) {', '.join(sorted(unknown))}; cases: {', '.join(CASES)}")
    spec = SMOKE if args.smoke else GPU
    n = args.examples or spec["examples"]
    lengths = peer_lengths(scale=2048 // spec["max_length"])[:n]
    work = Path(args.work or tempfile.mkdtemp(prefix="optrush-length-mix-"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    data_path, tokenizer_dir = write_corpus(work, lengths, vocab=spec["vocab"], seed=1)
    common = common_overrides(spec, data_path=data_path, tokenizer_dir=tokenizer_dir, work=work)
    record = {"model": spec["preset"], "common": common, "warmup": args.warmup, "cases": [], "peers": {},
              "provenance": provenance(),
              "length_mix": {"examples": n, "mean": sum(lengths) / n, "min": min(lengths), "max": max(lengths),
                             "tokens": sum(lengths), "batch_tokens": spec["batch_tokens"],
                             "max_length": spec["max_length"]}}
    out = Path("/tmp/length_mix_smoke" if args.smoke else args.out)
    started = time.perf_counter()

    def save() -> None:
        record["cases"].sort(key=lambda r: list(CASES).index(r["name"]))  # table in (a)..(e) order
        record["summary"] = summarize(record, tolerance=spec["loss_tolerance"])
        devices = record["provenance"]["devices"]
        tag = devices[0].replace("NVIDIA ", "").split()[0].lower() if devices else "cpu"
        write_result(record, markdown(record), out=out, name=args.name or f"length_mix_{tag}")

    def out_of_time() -> bool:
        return bool(args.budget_s) and time.perf_counter() - started > args.budget_s

    # the peers first, then the packed cases: what the targets compare, before the rest of the time budget
    peer = Path(args.peer) if args.peer and not args.smoke else None
    for section in ("random", "sorted") if peer is not None else ():
        print(f"== peer lengthmix_{section} ({time.perf_counter() - started:.0f}s)", flush=True)
        record["peers"][section] = (run_peer(peer, f"lengthmix_{section}", timeout_s=args.timeout_s)
                                    if peer.is_file() else {"status": "skipped", "reason": f"{peer} not found"})
        save()
        print(f"   {record['peers'][section]}", flush=True)
    chosen = [name for name in RUN_ORDER if name in spec["cases"] and (args.only is None or name in args.only)]
    for name in chosen:
        if out_of_time():
            record["cases"].append({"name": name, "status": "skipped", "reason": f"--budget-s {args.budget_s:g} spent"})
            continue
        batches = epoch_batches(lengths, packing=CASES[name][0].split("=")[1], max_length=spec["max_length"],
                                batch_tokens=spec["batch_tokens"], seed=0)
        print(f"== {name}: {batches} micro-batches in the epoch ({time.perf_counter() - started:.0f}s)", flush=True)
        result = run_case(name, [*common, *CASES[name]], warmup=args.warmup, steps=batches - args.warmup,
                          timeout_s=args.timeout_s, logs=work / "logs")
        if result.get("status") == "ok" and sum(result["step_units"]) != sum(lengths):
            result = {"name": name, "status": "failed", "reason": f"trained {sum(result['step_units'])} tokens, "
                      f"not the epoch's {sum(lengths)}: the case did not see exactly the same examples"}
        record["cases"].append(result)
        save()
        shown = (f"{result['real_tokens_per_s']:,.0f} non-pad tokens/s, padding {result['padding_fraction']:.1%}, "
                 f"{result['peak_mem_gib']:.1f} GiB" if result.get("status") == "ok" else result.get("reason"))
        print(f"   {shown}", flush=True)
    save()
    print(markdown(record))
    same = all(loss["same_loss"] for loss in record["summary"]["loss"].values())
    ran = all(result.get("status") == "ok" for result in record["cases"])
    print(f"wrote {out} ({time.perf_counter() - started:.0f}s); all cases ran: {ran}; same loss: {same}")
    if args.work is None and ran:  # a failed case's log (named in its reason) stays
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ran and same else 1


if __name__ == "__main__":
    sys.exit(main())
