"""The largest sequence length a config can train: `optrush bench CONFIG --max-context [LIMIT]`.

    result = find_max_context(cfg, start=4096, limit=1_048_576)     # tries in subprocesses
    write_max_context_report(result, "runs/max_context")              # max_context.json + max_context.md

Each try trains `warmup` + `steps` steps of one synthetic row of `length` tokens (train.micro_batch_size=1,
grad_accum=1) through `optrush bench` in its own process, so an out-of-memory failure leaves nothing behind in
the next try (fragmented allocator, half-built CUDA context). The search doubles `length` from `start` while it
fits (up to `limit`), then bisects between the last length that fit and the first that did not, down to
`multiple` tokens. Every try is reported with its tokens/s and peak memory; the result's `max_length` is the
largest that fit. A try that fails for any other reason than memory (a config error, a crash) stops the search
with that reason: a broken config must not pass for a short context. A try that runs past `timeout_s` counts as
not fitting (reported as timed out): at hundreds of thousands of tokens one step can take many minutes. The
model's RoPE tables are sized to each try (`model.max_seq_len`) when the config's are shorter: positions beyond the
pretraining length are then extrapolated unless `model.rope_scaling` says otherwise, which does not change the
speed or memory measured. `subprocess_try(..., nproc=N)` runs each try under torchrun as N processes (context
parallelism over N GPUs, with parallel.strategy fsdp or ddp): rank 0 reports, and a try where any rank ran out of
memory does not fit.
"""
from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from optrush.bench.report import MEMORY_KINDS
from optrush.config import Config, to_yaml

# Reasons a try counts as "does not fit": out of GPU or host memory (the kernel's OOM killer: -9, which torchrun
# reports as a signal), or a step slower than the per-try time limit
OUT_OF_MEMORY = ("OutOfMemoryError", "out of memory", "can't allocate memory", "Signal 9 (SIGKILL)")
DID_NOT_FIT = (*OUT_OF_MEMORY, "exit code -9", "exit code 137", "timed out")

Try = Callable[[int], dict]
"""A try: length -> {"length", "fits": bool, and on success "tokens_per_s", "peak_mem_gib"; else "reason"}."""


def find_max_context(cfg: Config, *, start: int, limit: int, multiple: int = 1024, warmup: int = 1,
                     steps: int = 2, timeout_s: float | None = 1800, try_length: Try | None = None,
                     log: Callable[[str], None] = print) -> dict:
    """Search the largest `data.max_length` in [start, limit] that trains; returns the record (JSON-able).

    `try_length` replaces the subprocess try (tests inject a predicate). Lengths are multiples of `multiple`
    (`start` and `limit` are rounded down to it; `multiple` shrinks to a power of two when `start` is shorter)."""
    if start < 1 or limit < start:
        raise ValueError(f"the search needs 1 <= start <= limit; got start={start} (data.max_length), "
                         f"limit={limit} (--max-context LIMIT): raise the limit or lower data.max_length")
    if multiple > start:  # a short start length: search on the largest power of two it holds
        multiple = 1 << (start.bit_length() - 1)
    start, limit = start // multiple * multiple, limit // multiple * multiple
    if try_length is None:
        try_length = subprocess_try(cfg, warmup=warmup, steps=steps, timeout_s=timeout_s)
    tries: list[dict] = []

    def fits(length: int) -> bool:
        result = {"length": length, **try_length(length)}
        tries.append(result)
        speed = f"{result['tokens_per_s']:,.0f} tokens/s, {result['peak_mem_gib']:.1f} GiB" if result["fits"] \
            else result.get("reason", "does not fit")
        log(f"max-context: {length:,} tokens: {'fits' if result['fits'] else 'no'} ({speed})")
        return result["fits"]

    good, bad = None, None
    length = start
    while length <= limit:
        if not fits(length):
            bad = length
            break
        good = length
        length = limit if length < limit < 2 * length else 2 * length
    if good is not None and bad is not None:
        while bad - good > multiple:
            middle = (good + bad) // 2 // multiple * multiple
            if fits(middle):
                good = middle
            else:
                bad = middle
    best = next((t for t in tries if t["length"] == good), None)
    return {"benchmark": "optrush bench --max-context", "max_length": good, "limit": limit, "start": start,
            "multiple": multiple, "reached_limit": good == limit,
            "tokens_per_s": best["tokens_per_s"] if best else None,
            "peak_mem_gib": best["peak_mem_gib"] if best else None, "tries": tries,
            "config": best.get("config") if best else None, "provenance": best.get("provenance") if best else None}


def subprocess_try(cfg: Config, *, warmup: int, steps: int, timeout_s: float | None,
                   logs: Path | None = None, nproc: int = 1) -> Try:
    """A try that runs `optrush bench` on one row of `length` synthetic tokens in a fresh process, or under
    torchrun as `nproc` processes (one per GPU: context parallelism, FSDP), whose result is rank 0's."""
    from optrush.bench.ladder import run_child
    from optrush.parallel.launch import torchrun_command

    workdir = Path(tempfile.mkdtemp(prefix="optrush-max-context-"))
    config_path = workdir / "config.yaml"
    config_path.write_text(to_yaml(cfg), encoding="utf-8")
    logs = logs or workdir

    def try_length(length: int) -> dict:
        overrides = [f"data.max_length={length}", "train.micro_batch_size=1", "train.grad_accum=1"]
        if cfg.model.max_seq_len < length:  # 0 (the model's own) included: a preset's may be shorter
            overrides.append(f"model.max_seq_len={length}")
        arguments = ["bench", str(config_path), *overrides, "--synthetic", "--name", f"length={length}",
                     "--warmup", str(warmup), "--steps", str(steps)]
        command = torchrun_command(arguments, nproc=nproc) if nproc > 1 else \
            [sys.executable, "-m", "optrush", *arguments]
        return outcome(with_memory_reason(run_child(command, name=f"length_{length}", timeout_s=timeout_s,
                                                    logs=logs)))

    return try_length


def with_memory_reason(result: dict) -> dict:
    """A failed child whose log shows it ran out of memory fails for that reason. Under torchrun the rank that ran
    out may not be rank 0, which then dies (killed by torchrun) or waits on it without writing a result, so the
    failure's own reason ("exit code 1: ...", "timed out") may not say so."""
    if result.get("status") != "failed" or any(m in result.get("reason", "") for m in OUT_OF_MEMORY):
        return result
    log = Path(result.get("log", ""))
    text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
    line = next((line for line in reversed(text.splitlines()) if any(m in line for m in OUT_OF_MEMORY)), None)
    return result if line is None else {**result, "reason": f"{line.strip()[:300]} (log: {log})"}


def outcome(result: dict) -> dict:
    """A child's bench result as a try: fits, or did not (memory, time limit); anything else raises."""
    if result.get("status") == "ok":
        return {"fits": True, **{k: result[k] for k in ("name", "tokens_per_s", "peak_mem_gib", "peak_mem_kind",
                                                          "step_s", "mfu", "world_size", "loss", "device", "config",
                                                          "synthetic", "provenance")}}
    reason = result.get("reason", "no reason given")
    if any(marker in reason for marker in DID_NOT_FIT):
        return {"fits": False, "reason": reason[:300]}
    raise RuntimeError(f"max-context: the try at {result.get('name')} failed for a reason other than memory, so "
                       f"the search stops: {reason}")


# ------------------------------------------------------------------------------------------------------ report

def markdown(result: dict) -> str:
    lines = ["# optrush bench --max-context", "",
             f"Largest trainable length: **{result['max_length'] or 'none'}** tokens"
             + (f" at {result['tokens_per_s']:,.0f} tokens/s, {result['peak_mem_gib']:.1f} GiB peak"
                if result["max_length"] else "")
             + (" (the search limit: it may fit more)" if result["reached_limit"] else ""), "",
             "| length | fits | tokens/s | peak GiB | note |", "|---|---|---|---|---|"]
    for t in sorted(result["tries"], key=lambda t: t["length"]):
        if t["fits"]:
            lines.append(f"| {t['length']:,} | yes | {t['tokens_per_s']:,.0f} | {t['peak_mem_gib']:.1f} | |")
        else:
            lines.append(f"| {t['length']:,} | no | | | {t.get('reason', '')[:120]} |")
    # on CPU the bench measures the process's resident memory, not GPU allocations: say which, as its report does
    kinds = sorted({t["peak_mem_kind"] for t in result["tries"] if "peak_mem_kind" in t})
    notes = [f"- peak GiB ({kind}): {MEMORY_KINDS[kind]}" for kind in kinds]
    p = result.get("provenance")
    if p:
        notes = [f"- device: {result['tries'][0].get('device', 'unknown')}; torch {p['torch']}, "
                 f"optrush {p['git_sha'] or p['optrush'] or 'unknown'}; measured {p['timestamp_utc']}",
                 "- each try: one row of synthetic tokens, its own process; tokens/s over the timed steps", *notes]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def write_max_context_report(result: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write `<out_dir>/max_context.json` and `.md`; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "max_context.json", out_dir / "max_context.md"
    json_path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    md_path.write_text(markdown(result), encoding="utf-8")
    return json_path, md_path
