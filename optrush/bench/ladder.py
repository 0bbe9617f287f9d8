"""The Optimization Rush ladder: one config, then optimizations switched on one at a time, each rung measured in
its own process, side by side with peer stacks (HF Trainer, TRL) on the same model and data.

    optrush bench optrush/recipes/demo.yaml model.preset=llama3.2-1b --synthetic --ladder default --peers --out runs/ladder
    record = run_ladder(None, ["model.preset=debug", "train.device=cpu"], ladder=DEFAULT_LADDER, synthetic=True,
                        warmup=1, steps=3, peers=["hf_default"], out_dir="runs/ladder")

A ladder is a list of rungs, each a name and `key=value` overrides. Rung k runs the user's config plus the
overrides of rungs 1..k (later wins), so each rung adds one optimization to everything before it. The built-in
`DEFAULT_LADDER` follows issue #10: baseline (fp32, padded batches, SDPA, eager, AdamW) -> packing -> bf16 ->
efficient attention -> torch.compile -> fused kernels -> fused cross-entropy -> activation checkpointing -> LoRA
-> QLoRA -> 8-bit optimizer -> FSDP2 (two or more GPUs). `load_ladder(path)` reads one from YAML:

    reference: baseline            # optional: the rung loss deltas are taken against (default: the first)
    rungs:
      - name: baseline
        set: {precision.mode: bf16_mixed, peft.method: lora}
      - name: +compile
        set: {compile.mode: blocks}
      - name: +fsdp2
        set: {parallel.strategy: fsdp}
        min_gpus: 2                # skipped with fewer visible GPUs; launched through torchrun with as many

A rung that cannot run here is reported as `skipped` with the reason, and its overrides are not carried to the
rungs after it: its resolved config is rejected (`load_config`'s error: an option this optrush does not have yet,
flex/varlen attention on CPU, ...), it needs more GPUs than are visible, it changes only `data.*` keys on
synthetic data (full random rows: nothing to pack), or it resolves to the same config as the rung before. A rung
that raises or dies (out of memory, a compile error, a timeout) is `failed`, with the error, and its overrides
are carried on. Each rung is `python -m optrush bench CONFIG overrides --json-out FILE`, a fresh process, so its
peak memory, compile caches and allocator state are its own; `measure_rung` is what that child runs. Each finished
rung and peer is also appended to `<out>/finished.jsonl` at once, so a run cut short keeps what it measured.

With peers and a `model.preset`, the model is built once (seeded), saved as an HF directory in the output folder
(removed at the end), and every rung and peer loads it, so all start from identical weights; a `model.path`
model is loaded by all as it is. The record names the best rung by non-padding
tokens/s (padded peers and packed rungs then compare fairly) and its ratio over the best peer.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from optrush.config import ConfigError, to_dict
from optrush.config.load import LEAF_KEYS, unknown_key_message
from optrush.config.machine import load_config_for_machine, visible_gpus


@dataclass(frozen=True, slots=True)
class Rung:
    name: str
    overrides: tuple[str, ...]
    """Dotted `key=value` overrides this rung adds to the ones of the rungs before it."""
    min_gpus: int = 1
    """Skipped with fewer visible CUDA devices; with more than one, the child runs under torchrun."""


@dataclass(frozen=True, slots=True)
class Ladder:
    rungs: tuple[Rung, ...]
    reference: str
    """Name of the rung whose final loss the others' loss deltas are taken against."""


# Baseline keys are only ones every optrush build has: an unknown key would make the baseline itself "skipped".
DEFAULT_LADDER = Ladder(reference="baseline", rungs=(
    Rung("baseline", ("precision.mode=fp32", "data.packing=none", "model.attention=sdpa", "compile.mode=none",
                      "kernels.fused_ops=false", "kernels.fused_loss=false", "activations.checkpointing=none",
                      "activations.offload=false", "peft.method=none", "optim.name=adamw")),
    Rung("+packing", ("data.packing=bfd",)),
    Rung("+bf16", ("precision.mode=bf16_mixed",)),
    Rung("+efficient attention", ("model.attention=varlen",)),
    Rung("+torch.compile", ("compile.mode=blocks",)),
    Rung("+fused kernels", ("kernels.fused_ops=true",)),
    Rung("+fused cross-entropy", ("kernels.fused_loss=true",)),
    Rung("+activation checkpointing", ("activations.checkpointing=selective",)),
    Rung("+LoRA", ("peft.method=lora",)),
    Rung("+QLoRA", ("peft.quantize=nf4",)),
    Rung("+8-bit optimizer", ("optim.name=adamw8bit",)),
    Rung("+FSDP2", ("parallel.strategy=fsdp",), min_gpus=2),
))

RUNG_KEYS = {"name", "set", "min_gpus"}


def load_ladder(path: str | Path) -> Ladder:
    """A ladder from a YAML file (format in the module docstring); `default` gives `DEFAULT_LADDER`."""
    if str(path) == "default":
        return DEFAULT_LADDER
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--ladder {path}: no such file (give a ladder YAML file, or 'default')")
    tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(tree, dict) or not isinstance(tree.get("rungs"), list) or not tree["rungs"]:
        raise ConfigError(f"{path}: a ladder file is a mapping with a non-empty 'rungs:' list")
    unknown = set(tree) - {"rungs", "reference"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {sorted(unknown)}; a ladder has 'rungs' and "
                          "optionally 'reference'")
    rungs = tuple(rung_from_yaml(item, where=f"{path}: rung {i + 1}") for i, item in enumerate(tree["rungs"]))
    names = [r.name for r in rungs]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: rung names must be unique, got {names}")
    reference = tree.get("reference", names[0])
    if reference not in names:
        raise ConfigError(f"{path}: reference {reference!r} is not a rung name ({', '.join(names)})")
    return Ladder(rungs=rungs, reference=reference)


def rung_from_yaml(item: object, *, where: str) -> Rung:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise ConfigError(f"{where}: each rung is a mapping with a 'name' and a 'set' mapping of config keys")
    if set(item) - RUNG_KEYS:
        raise ConfigError(f"{where} ({item['name']}): unknown key(s) {sorted(set(item) - RUNG_KEYS)}; a rung has "
                          f"{', '.join(sorted(RUNG_KEYS))}")
    settings = item.get("set") or {}
    if not isinstance(settings, dict):
        raise ConfigError(f"{where} ({item['name']}): 'set' must map dotted config keys to values, "
                          "e.g. {compile.mode: blocks}")
    min_gpus = item.get("min_gpus", 1)
    if not isinstance(min_gpus, int) or min_gpus < 1:
        raise ConfigError(f"{where} ({item['name']}): min_gpus must be an integer >= 1, got {min_gpus!r}")
    for key in settings:
        if not is_config_key(str(key)):
            section = str(key).split(".")[0] + "."
            valid = [k for k in LEAF_KEYS if k.startswith(section)] or sorted(LEAF_KEYS)
            raise ConfigError(f"{where} ({item['name']}): {unknown_key_message(str(key), valid)}")
    return Rung(item["name"], tuple(override(key, value) for key, value in settings.items()), min_gpus=min_gpus)


def is_config_key(key: str) -> bool:
    """A leaf key (`train.lr`) or a section (`train`) of the config: a typo in a ladder file is an error at load,
    not a rung "skipped as not available" after the run."""
    return key in LEAF_KEYS or any(leaf.startswith(key + ".") for leaf in LEAF_KEYS)


def override(key: str, value: object) -> str:
    """`key=value` that `load_config` reads back as `value` (JSON is YAML: quote only where YAML would retype)."""
    plain = isinstance(value, str) and yaml.safe_load(value) == value
    return f"{key}={value if plain else json.dumps(value)}"


# ------------------------------------------------------------------------------------------------ planning rungs

@dataclass(slots=True)
class PlannedRung:
    rung: Rung
    overrides: list[str]
    """The rung's cumulative overrides (those of the rungs before it that apply, then its own)."""
    skipped: str | None = None


def plan_ladder(config_path: str | None, base_overrides: Sequence[str], ladder: Ladder, *, synthetic: bool,
                gpus: int) -> list[PlannedRung]:
    """Resolve every rung's cumulative overrides and decide, without running anything, which rungs are skipped."""
    planned, carried, previous = [], [], None
    for rung in ladder.rungs:
        overrides = carried + list(rung.overrides)
        reason, resolved = None, None
        if rung.min_gpus > max(gpus, 1):  # one device (CPU or GPU) is always there
            reason = f"needs {rung.min_gpus} GPUs, {gpus} visible"
        elif synthetic and rung.overrides and all(o.startswith("data.") for o in rung.overrides):
            reason = "synthetic data: rows are full random tokens, so data.* settings change nothing (run on the " \
                     "config's data, without --synthetic, to measure them)"
        else:
            try:
                resolved = to_dict(load_config_for_machine(config_path, [*base_overrides, *overrides], gpus=gpus,
                                                           synthetic_data=synthetic))
            except ConfigError as err:
                reason = f"not available with this config or machine: {err}"
            else:
                if resolved == previous:
                    reason = "same resolved config as the rung before (the setting was already on)"
        planned.append(PlannedRung(rung, overrides, skipped=reason))
        if reason is None:
            carried, previous = overrides, resolved
    return planned


# --------------------------------------------------------------------------------------------- one rung (child)

def measure_rung(config_path: str | None, overrides: Sequence[str], *, name: str, synthetic: bool, warmup: int,
                 steps: int) -> dict:
    """One `bench` of the config, never raising: `status` is ok, skipped (config rejected: not available here)
    or failed (any other error, e.g. out of memory), with the `reason`. What a ladder rung's process runs."""
    from optrush.bench.run import bench

    try:
        cfg = load_config_for_machine(config_path, overrides, synthetic_data=synthetic)
        return {"status": "ok", **bench(cfg, synthetic=synthetic, warmup=warmup, steps=steps, name=name)}
    except ConfigError as err:
        return {"name": name, "status": "skipped", "reason": f"not available with this config or machine: {err}"}
    except Exception as err:  # noqa: BLE001 - a failing rung (out of memory, compile error) is a result too
        traceback.print_exc()
        return {"name": name, "status": "failed", "reason": f"{type(err).__name__}: {err}"[:2000]}


def write_child_result(result: dict, path: str | Path) -> None:
    """Written by rank 0 only when the child runs under torchrun."""
    if os.environ.get("RANK", "0") == "0":
        Path(path).write_text(json.dumps(result), encoding="utf-8")


# ----------------------------------------------------------------------------------------- the ladder (parent)

def run_ladder(config_path: str | None, overrides: Sequence[str], *, ladder: Ladder, synthetic: bool, warmup: int,
               steps: int, out_dir: str | Path, peers: Sequence[str] = (), repeats: int = 1,
               timeout_s: float | None = None, resume: bool = False) -> dict:
    """Run every rung (and peer) in its own process; returns the record (also written by `write_ladder_report`).
    `repeats` runs of each rung: the one with the median tokens/s is reported, all speeds kept. `timeout_s`
    bounds each process; one that runs past it is reported as failed. `resume`: rungs and peers that an earlier
    run into the same `out_dir` finished (`finished.jsonl`, same name and overrides) are taken from it, not rerun,
    and a shared model that run saved is reused: a ladder longer than one time-limited session completes in two."""
    from optrush.bench.peers import PEERS, peer_skip_reason, save_peer_model

    if repeats < 1 or warmup < 1 or steps < 1:
        raise ValueError(f"bench needs warmup >= 1, steps >= 1 and repeats >= 1; got {warmup}, {steps}, {repeats}")
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise ConfigError(f"--peers: unknown peer(s) {unknown}; choose from {', '.join(PEERS)}")
    out_dir = Path(out_dir)
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    base = list(overrides)
    cfg = load_config_for_machine(config_path, base, synthetic_data=synthetic)
    model_dir = None
    if peers and cfg.model.path is None:  # one model for everyone: rungs and peers load the same saved weights
        model_dir = out_dir / "model"
        if not (resume and (model_dir / "config.json").is_file()):  # saved atomically: present means complete
            save_peer_model(cfg, model_dir, synthetic=synthetic)
        base += ["model.preset=null", f"model.path={model_dir}"]

    common = dict(timeout_s=timeout_s, logs=out_dir / "logs")
    # one line per finished rung or peer, written as it finishes: a run cut short (a device's time limit) keeps them
    finished = out_dir / "finished.jsonl"
    done = read_finished(finished) if resume else {}
    if not resume:
        finished.unlink(missing_ok=True)

    def report(result: dict) -> None:
        print(progress_line(result), flush=True)
        with open(finished, "a", encoding="utf-8") as out:
            out.write(json.dumps(result) + "\n")

    results = []
    for plan in plan_ladder(config_path, base, ladder, synthetic=synthetic, gpus=visible_gpus()):
        earlier = done.get(("optrush", plan.rung.name))
        if earlier is not None and earlier["overrides"] == plan.overrides:
            results.append(earlier)
            print(progress_line(earlier) + " (from finished.jsonl)", flush=True)
            continue
        if plan.skipped:
            result = {"name": plan.rung.name, "status": "skipped", "reason": plan.skipped}
        else:
            command = rung_command(config_path, base + plan.overrides, name=plan.rung.name, synthetic=synthetic,
                                   warmup=warmup, steps=steps, gpus=plan.rung.min_gpus)
            result = median_run([run_child(command, name=plan.rung.name, **common) for _ in range(repeats)])
        results.append({"stack": "optrush", "overrides": plan.overrides, **result})
        report(results[-1])

    peer_results = []
    for peer in peers:
        if (PEERS[peer], peer) in done:
            peer_results.append(done[PEERS[peer], peer])
            print(progress_line(peer_results[-1]) + " (from finished.jsonl)", flush=True)
            continue
        reason = peer_skip_reason(peer)
        if reason:
            result = {"name": peer, "status": "skipped", "reason": reason}
        else:
            command = peer_command(peer, config_path, base, synthetic=synthetic, warmup=warmup, steps=steps)
            result = median_run([run_child(command, name=peer, **common) for _ in range(repeats)])
        peer_results.append({"stack": PEERS[peer], **result})
        report(peer_results[-1])
    if model_dir is not None:
        shutil.rmtree(model_dir)  # an intermediate: the config and seed recreate it
        for result in results:
            point_at_preset(result, model_dir, cfg.model.preset)

    reference = add_loss_deltas(results, reference=ladder.reference)
    return {"benchmark": "optrush bench --ladder", "config": config_path, "overrides": list(overrides),
            "synthetic": synthetic, "warmup": warmup, "steps": steps, "repeats": repeats,
            "reference": reference, "configured_reference": ladder.reference, "shared_model": bool(peers),
            "rungs": results,
            "peers": peer_results, **best_over_peers(results, peer_results)}


def read_finished(path: Path) -> dict[tuple[str, str], dict]:
    """The measured rungs and peers of an earlier run, by (stack, name); failures are run again."""
    if not path.is_file():
        return {}
    records = (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return {(r["stack"], r["name"]): r for r in records if r["status"] != "failed"}


def point_at_preset(result: dict, model_dir: Path, preset: str) -> None:
    """A record that trained the shared saved model names the preset it was saved from (the directory is gone;
    `optrush plan` rebuilds the shape from the preset)."""
    model = result.get("config", {}).get("model", {})
    if model.get("path") == str(model_dir):
        model.update(preset=preset, path=None)


def rung_command(config_path: str | None, overrides: Sequence[str], *, name: str, synthetic: bool, warmup: int,
                 steps: int, gpus: int) -> list[str]:
    from optrush.parallel.launch import torchrun_command

    arguments = ["bench", *([str(config_path)] if config_path else []), *overrides, "--name", name,
                 "--warmup", str(warmup), "--steps", str(steps), *(["--synthetic"] if synthetic else [])]
    return torchrun_command(arguments, nproc=gpus) if gpus > 1 else [sys.executable, "-m", "optrush", *arguments]


def peer_command(peer: str, config_path: str | None, overrides: Sequence[str], *, synthetic: bool, warmup: int,
                 steps: int) -> list[str]:
    return [sys.executable, "-m", "optrush.bench.peers", peer, *([str(config_path)] if config_path else []),
            *overrides, "--warmup", str(warmup), "--steps", str(steps), *(["--synthetic"] if synthetic else [])]


def run_child(command: list[str], *, name: str, timeout_s: float | None, logs: Path) -> dict:
    """Run one measuring process (`command` plus `--json-out FILE`); its output goes to `logs/<name>.log`."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result_path = Path(handle.name)
    log = logs / (("".join(c if c.isalnum() else "_" for c in name)).strip("_") + ".log")
    package_root = str(Path(__file__).resolve().parents[2])  # the child imports this optrush, installed or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    try:
        with open(log, "w", encoding="utf-8") as out:
            proc = subprocess.Popen([*command, "--json-out", str(result_path)], stdout=out,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                proc.wait(timeout=timeout_s)
            except BaseException:  # timed out or interrupted: no process of the try may outlive it
                stop(proc)
                raise
        text = result_path.read_text(encoding="utf-8")
    except subprocess.TimeoutExpired:
        return {"name": name, "status": "failed", "reason": f"timed out after {timeout_s:.0f} s (log: {log})",
                "log": str(log)}
    finally:
        result_path.unlink(missing_ok=True)
    if not text:  # died before writing: killed (e.g. host out of memory) or crashed in C++
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:] or ["no output"]
        return {"name": name, "status": "failed", "reason": f"exit code {proc.returncode}: {tail[0][:300]} "
                f"(log: {log})", "log": str(log)}
    return {**json.loads(text), "wall_s": time.perf_counter() - started, "log": str(log)}


def stop(proc: subprocess.Popen, *, grace_s: float = 60) -> None:
    """Stop a child started in a session of its own, and all it started: SIGTERM first, on which torchrun stops
    its workers (each in a session of its own, so out of reach of a signal to the child's group) and exits; then
    SIGKILL to whatever is left in the group after `grace_s`. A worker left running would keep its GPU memory
    and its place in NCCL collectives."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def median_run(runs: list[dict]) -> dict:
    """The run with the median tokens/s (the first failure if any run failed), with every run's speed kept."""
    failed = [r for r in runs if r["status"] != "ok"]
    if failed:
        return failed[0]
    ordered = sorted(runs, key=lambda r: r["tokens_per_s"])
    chosen = ordered[(len(ordered) - 1) // 2]
    return {**chosen, "tokens_per_s_runs": [r["tokens_per_s"] for r in runs],
            "tokens_per_s_stdev": statistics.stdev(r["tokens_per_s"] for r in runs) if len(runs) > 1 else None}


def add_loss_deltas(results: list[dict], *, reference: str) -> str | None:
    """`loss_delta`: each measured rung's final loss minus the reference rung's. Same model, data and seed: the
    delta shows what an optimization does to the numbers, not just speed. When the reference did not run (an fp32
    baseline out of memory, say) the first rung that ran stands in; returns the name used (None if none ran)."""
    ran = [r for r in results if r["status"] == "ok"]
    ref = next((r for r in ran if r["name"] == reference), ran[0] if ran else None)
    for result in ran:
        result["loss_delta"] = result["loss"] - ref["loss"]
    return ref and ref["name"]


def best_over_peers(results: list[dict], peers: list[dict]) -> dict:
    """Our fastest rung and the fastest peer by non-padding tokens/s, and their ratio (None where missing)."""
    ours = max((r for r in results if r["status"] == "ok"), key=lambda r: r["real_tokens_per_s"], default=None)
    theirs = max((p for p in peers if p["status"] == "ok"), key=lambda p: p["real_tokens_per_s"], default=None)
    ratio = ours["real_tokens_per_s"] / theirs["real_tokens_per_s"] if ours and theirs else None
    return {"best_rung": ours and ours["name"], "best_peer": theirs and theirs["name"], "ratio_over_best_peer": ratio}


def progress_line(result: dict) -> str:
    name = f"{result['stack']}: {result['name']}"
    if result["status"] != "ok":
        # a config error spans lines ("invalid configuration:" then the problems): show them on one line
        return f"{name}: {result['status']}: {' '.join(result['reason'].split())[:300]}"
    return (f"{name}: {result['real_tokens_per_s']:,.0f} non-padding tokens/s, peak {result['peak_mem_gib']:.2f} GiB, "
            f"loss {result['loss']:.4f}" + (f" ({result['wall_s']:.0f} s in all)" if "wall_s" in result else ""))
