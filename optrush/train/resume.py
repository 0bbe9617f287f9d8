"""Resuming a run: which checkpoint, what may differ from the run that saved it, and what Ctrl-C leaves behind.

    check_resume(cfg)     # at start-up, before any data is read: a bad path, a refused change, a checkpoint past
                          # train.max_steps, a new run into another run's checkpoints or final/ fails in seconds
    state = maybe_resume(cfg, checkpoints, model=model, optimizer=optimizer, scheduler=scheduler, loader=loader,
                         extras=extras)     # a fresh TrainState, or the restored one (checkpoint.resume)
    with report_interrupt(state, checkpoints, every=cfg.checkpoint.every):
        ...                                 # the training steps: Ctrl-C names the last step and checkpoint

Checkpoints save the run's settings (`run_settings`). On resume, a setting that defines the trained weights or the
optimizer state (the model, the optimizer, the adapters, whether the weights are bf16) must match, and so must the
data loader's (`LOADER_KEYS`): each is refused at start-up, before any data is read, where the config alone decides
it (`check_resume`), and the number of trainable parameters once the model is built; the model of `model.path` is
compared by what its folder holds (`model_identity`), so a moved folder still resumes; optimizer hyper-parameters
and the peak lr are restored with the optimizer's state, so a changed one is reported as not applied; a changed
schedule, global batch, gradient clipping or matmul precision is reported with what it does.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import sys
import warnings
from pathlib import Path

import torch

from optrush.config import Config, ConfigError, PeftConfig
from optrush.config.schema import BF16_WEIGHT_MODES
from optrush.data.loader import MUST_MATCH, SAVED_BEFORE
from optrush.parallel.context import data_parallel_position
from optrush.parallel.distributed import barrier, is_main
from optrush.train.checkpoint import START_FRESH, CheckpointManager, TrainState, checkpoint_step, \
    load_trainer_state, require_trainer_state, restore, saved_run
from optrush.train.metrics import trainable_params


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; its message says after which step the run stopped and where it resumes from."""


@contextlib.contextmanager
def report_interrupt(state: TrainState, checkpoints: CheckpointManager, *, every: int):
    """Ctrl-C in the block becomes a TrainingInterrupted (still a KeyboardInterrupt) naming the last finished step
    and the newest checkpoint, for the CLI to print instead of a stack. `every`: checkpoint.every."""
    try:
        yield
    except KeyboardInterrupt as interrupt:
        latest = checkpoints.latest()
        if latest is not None:
            where = f"the last checkpoint is {latest} (resume with checkpoint.resume=auto)"
        else:
            where = "no checkpoint was saved" + ("" if every else " (checkpoint.every=N saves one every N steps)")
        raise TrainingInterrupted(f"interrupted after step {state.step}; {where}") from interrupt


def maybe_resume(cfg: Config, checkpoints: CheckpointManager, **live) -> TrainState:
    """The restored training state per checkpoint.resume, or a fresh one; either records this run's settings,
    which its checkpoints then save."""
    resume = cfg.checkpoint.resume
    if is_main():
        for partial in checkpoints.remove_partial():
            print(f"removed an incomplete checkpoint left by an interrupted save: {partial}", flush=True)
    barrier()
    settings = run_settings(cfg, live["model"])
    path = resume_target(resume, checkpoints)
    if path is None:
        return TrainState(settings=settings)
    saved = load_trainer_state(path)
    refuse_incompatible(saved["train"].get("settings", {}), settings, path)
    state = restore(path, trainer_state=saved, **live)
    apply_schedule_at_resumed_step(live["scheduler"])
    if is_main():
        print(f"resumed from {path} at step {state.step}", flush=True)
        if aside := checkpoints.set_aside_after(state.step):
            print(f"moved the checkpoints past step {state.step} to {aside}: this run trains a new history from "
                  "there, and checkpoint.resume=auto must not continue the old one", flush=True)
        if (moved_from := state.settings.get("model.path")) not in (None, settings["model.path"]):
            print(f"model.path changed from {moved_from} to {settings['model.path']}: the same model (its "
                  "config.json and weights match the checkpoint's)", flush=True)
        if state.step == cfg.train.max_steps:
            print(f"the run is already complete (train.max_steps={cfg.train.max_steps}): nothing left to train; "
                  "raise train.max_steps to train on", flush=True)
        if changes := describe_changes(state.settings, settings):
            print(f"warning: resuming {path} with settings that differ from the run that saved it:\n{changes}\n"
                  "Resume with the saved values to continue that run exactly.", file=sys.stderr, flush=True)
    # what a resume does not apply stays as saved, so that the next resume compares with what the optimizer holds
    state.settings = settings | {key: state.settings[key] for key in NOT_APPLIED_KEYS if key in state.settings}
    return state


def check_resume(cfg: Config) -> None:
    """Raise when checkpoint.resume names no resumable checkpoint, or one that this config cannot resume (a setting
    that must match and is decided by the config alone differs, or it is past train.max_steps), or when a run from
    step 0 would write beside another run's checkpoints (`never`) or over its final/. Cheap, so that a run can stop
    on it before any data is read or any model is built."""
    check_resume_path(cfg.checkpoint.resume)
    checkpoints = CheckpointManager(Path(cfg.output_dir) / "checkpoints", keep_last=cfg.checkpoint.keep_last)
    if cfg.checkpoint.resume == "never":
        refuse_to_mix_runs(checkpoints, cfg.output_dir)
    path = resume_target(cfg.checkpoint.resume, checkpoints)
    if path is None:
        refuse_to_replace_final(cfg.output_dir)
        return
    saved, loader = saved_run(path)
    refuse(path, incompatibilities(saved.get("settings", {}), config_settings(cfg)) + loader_mismatches(loader, cfg))
    refuse_step_past_max(path, saved["step"], cfg.train.max_steps)


def refuse_to_mix_runs(checkpoints: CheckpointManager, output_dir: str) -> None:
    """Raise when a new run (checkpoint.resume=never) would write its checkpoints beside another run's: pruning
    (checkpoint.keep_last) keeps the highest steps, so it would delete the new run's, and checkpoint.resume=auto
    would later continue the old run under the new run's final/."""
    newest = checkpoints.latest()
    if newest is None:
        return
    raise ConfigError(f"output_dir={output_dir} already holds the checkpoints of a run (the newest: {newest}, step "
                      f"{checkpoint_step(newest)}), and checkpoint.resume=never starts a new run, whose checkpoints "
                      "would mix with them: train into a new output_dir, or move or delete "
                      f"{checkpoints.directory} to start over here (checkpoint.resume=auto continues that run)")


def refuse_to_replace_final(output_dir: str) -> None:
    """Raise when a run that starts from step 0 would write over another run's final/ (and its metrics.jsonl):
    with no checkpoint beside it (checkpoint.every=0, or pruned), nothing says that run is this config's."""
    final = Path(output_dir) / "final"
    if final.exists():
        raise ConfigError(f"output_dir={output_dir} already holds a finished run's model ({final}) and no checkpoint "
                          "to resume, so this run would start from step 0 and replace it and its metrics.jsonl: "
                          f"train into a new output_dir, or move or delete {final} to train here again")


def refuse_step_past_max(path: Path, step: int, max_steps: int) -> None:
    """Raise when checkpoint `path` is past train.max_steps: training cannot go back, and finishing "done" would
    label step-N weights as a shorter run's."""
    if step > max_steps:
        raise ConfigError(f"checkpoint {path} is at step {step}, past train.max_steps={max_steps}: set "
                          f"train.max_steps above {step} to train on, resume an earlier checkpoint "
                          f"(checkpoint.resume=PATH), or {START_FRESH}")


def resume_target(resume: str, checkpoints: CheckpointManager) -> Path | None:
    """The checkpoint that checkpoint.resume=`resume` names (auto: the newest of `checkpoints`), or None."""
    if resume == "never":
        return None
    return checkpoints.latest() if resume == "auto" else Path(resume)


def loader_mismatches(saved: dict, cfg: Config) -> list[str]:
    """The data-loader settings that differ from those the checkpoint's data position was saved with."""
    changes = []
    for key, name in LOADER_KEYS.items():
        section, field = key.split(".")
        old, new = saved.get(name, SAVED_BEFORE.get(name)), getattr(getattr(cfg, section), field)
        if old is not None and old != new:
            changes.append(f"{key} differs from the checkpoint's ({old} -> {new}; the saved data position is only "
                           "valid for the checkpoint's value)")
    return changes


def check_resume_path(resume: str) -> None:
    """Raise when checkpoint.resume names a path (not auto or never) that is no resumable checkpoint."""
    if resume in ("auto", "never"):
        return
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(f"checkpoint.resume={resume}: no such checkpoint directory (a relative path is taken from "
                          f"the working directory, {Path.cwd()}): give a run's checkpoints/step_N directory, auto (the "
                          "newest checkpoint in output_dir, if any) or never (a new run, into an output_dir "
                          "without checkpoints)")
    require_trainer_state(path)


SCHEDULE_KEYS = ("train.max_steps", "train.schedule", "train.warmup_steps", "train.min_lr_ratio",
                 "train.decay_fraction")
BATCH_KEYS = ("train.micro_batch_size", "train.grad_accum", "data-parallel replicas")
# Hyper-parameters that live in the optimizer's param groups (LoRA+'s ratio in the B group's lr), which loading
# its saved state restores. They are not re-applied on top: the groups also hold optimizer state (schedule-free's
# averaging weights, Muon's own groups), so writing them back safely would take every optimizer's own rules.
OPTIMIZER_KEYS = ("optim.betas", "optim.eps", "optim.weight_decay", "optim.momentum", "optim.ns_steps",
                  "peft.lora_plus_ratio")
NOT_APPLIED_KEYS = ("train.lr", *OPTIMIZER_KEYS)  # the lr: the scheduler's saved base lrs too
# What defines the trained weights and the optimizer state that holds them: a checkpoint of other weights, or of
# another optimizer, cannot be loaded into this run. The model of model.path too, compared by `another_model`.
MUST_MATCH_KEYS = ("model.preset", "trainable parameters", "optim.name", "peft.method", "peft.r", "peft.alpha",
                   "peft.rslora", "peft.target_modules", "peft.quantize", "peft.num_virtual_tokens")
MODEL_KEYS = ("model.path", "model")
# The data loader's settings (its saved state's names, by the config key that sets each) that the saved position is
# only valid for: the position indexes the epoch's plan of micro-batches, which each of them changes. data.shuffle
# too: continuing the epoch at that index in the other order would train some of its examples twice and skip
# others, silently, so it is refused rather than reported.
LOADER_KEYS = {source: name for name, source in MUST_MATCH.items() if source.startswith(("data.", "train."))}
# Settings read from the config at every step, so a change applies from the resumed step on (and is reported).
APPLIED_KEYS = {"train.max_grad_norm": "gradients are clipped to the new norm from the resumed step on",
                "precision.mode": "the matmuls run in the new precision from the resumed step on (the weights and "
                                  "the optimizer state keep their dtype)"}
# bytes read at evenly spaced offsets of each weight file: a fine-tune of the same architecture has the same config
# and file sizes, and differs in (nearly) every weight
SAMPLES_PER_FILE, SAMPLE_BYTES = 16, 4096


def run_settings(cfg: Config, model: torch.nn.Module) -> dict:
    """What fixes a run's learning-rate schedule, its global batch (micro_batch_size x grad_accum x replicas), its
    optimizer, the weights it trains and how; checkpoints save it so that a resume can say what changed."""
    return {**config_settings(cfg), "data-parallel replicas": data_parallel_position(cfg.context.degree)[1],
            # last, after the keys that say why: it catches what no key names, e.g. a preset sized to another
            # tokenizer's vocabulary
            "trainable parameters": trainable_params(model)}


def config_settings(cfg: Config) -> dict:
    """The settings of `run_settings` that the config alone decides (not those of the built model or of the
    process group, which `train --nproc` checks before it starts one)."""
    t, o = cfg.train, cfg.optim
    return {"train.max_steps": t.max_steps, "train.lr": t.lr, "train.schedule": t.schedule,
            "train.warmup_steps": t.warmup_steps, "train.min_lr_ratio": t.min_lr_ratio,
            "train.decay_fraction": t.decay_fraction, "train.micro_batch_size": t.micro_batch_size,
            "train.grad_accum": t.grad_accum, "train.max_grad_norm": t.max_grad_norm,
            "precision.mode": cfg.precision.mode,
            "optim.betas": list(o.betas), "optim.eps": o.eps, "optim.weight_decay": o.weight_decay,
            **({"optim.momentum": o.momentum, "optim.ns_steps": o.ns_steps} if o.name == "muon" else {}),
            # absolute: the same directory named from another working directory is the same model
            "model.path": os.path.abspath(cfg.model.path) if cfg.model.path else None,
            "model": model_identity(cfg.model.path) if cfg.model.path else None,
            "model.preset": cfg.model.preset, "optim.name": o.name, "peft.method": cfg.peft.method,
            **adapter_settings(cfg.peft)}


def model_identity(path: str) -> dict:
    """What model directory `path` holds, cheaply: digests of its config.json and of its weight files' names, sizes
    and a few sampled bytes (a moved or copied folder keeps them)."""
    directory = Path(path)
    weights = hashlib.sha256()
    for file in sorted(f for f in directory.iterdir() if f.suffix in (".safetensors", ".bin")):
        size = file.stat().st_size
        weights.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as f:
            for sample in range(SAMPLES_PER_FILE):
                f.seek(size * sample // SAMPLES_PER_FILE)
                weights.update(f.read(SAMPLE_BYTES))
    config = hashlib.sha256((directory / "config.json").read_bytes())
    return {"config.json": config.hexdigest(), "weights": weights.hexdigest()}


def adapter_settings(p: PeftConfig) -> dict:
    """The peft settings of `p.method` (those of another method have no effect, so they may change)."""
    if p.method in ("lora", "dora"):
        return {"peft.r": p.r, "peft.alpha": p.alpha, "peft.rslora": p.rslora, "peft.target_modules": p.target_modules,
                "peft.quantize": p.quantize, "peft.lora_plus_ratio": p.lora_plus_ratio}
    if p.method == "prompt_tuning":
        return {"peft.num_virtual_tokens": p.num_virtual_tokens}
    return {}


def differing(saved: dict, current: dict) -> list[str]:
    """The keys of `current` whose saved value differs; a key the checkpoint did not save is unknown, not
    different."""
    return [key for key in current if key in saved and saved[key] != current[key]]


def refuse_incompatible(saved: dict, current: dict, path: Path) -> None:
    """Raise before anything is loaded when the checkpoint holds other weights or another optimizer's state."""
    refuse(path, incompatibilities(saved, current))


def incompatibilities(saved: dict, current: dict) -> list[str]:
    """Why the checkpoint's weights or optimizer state cannot be loaded with `current` settings, one entry a key."""
    changes = [f"{key} differs from the checkpoint's ({saved[key]} -> {current[key]})"
               for key in differing(saved, current) if key in MUST_MATCH_KEYS]
    before, after = saved.get("precision.mode"), current["precision.mode"]
    # bf16 weights get an optimizer state laid out for them (moments in bf16 unless optim.state_dtype says
    # otherwise, Kahan buffers, optrush's AdamW instead of torch's with optim.state_dtype=fp32), and a resume
    # converts none of that, so a change between them and the fp32-weight modes is refused
    if "precision.mode" in differing(saved, current) and (before in BF16_WEIGHT_MODES) != (after in BF16_WEIGHT_MODES):
        changes.append(f"precision.mode differs from the checkpoint's ({before} -> {after}; "
                       f"{' and '.join(BF16_WEIGHT_MODES)} keep bf16 weights and an optimizer state laid out for "
                       "them, every other mode fp32 ones)")
    if model := another_model(saved, current):
        changes.insert(0, model)
    return changes


def refuse(path: Path, changes: list[str]) -> None:
    if changes:
        raise ConfigError(f"cannot resume {path}: {'; '.join(changes)}: resume with the same setting, or "
                          f"{START_FRESH}")


def another_model(saved: dict, current: dict) -> str | None:
    """How the checkpoint's model.path model differs from this run's, or None. By what the folders hold when both
    identities are known (a moved folder is the same model, a rewritten one is not), else by path (a checkpoint
    written before identities were saved, or a preset on one side)."""
    old, new = saved.get("model.path"), current["model.path"]
    if saved.get("model") is None or current["model"] is None:
        same = "model.path" not in saved or old == new
        return None if same else f"model.path differs from the checkpoint's ({old} -> {new})"
    differ = [part for part, digest in current["model"].items() if saved["model"].get(part) != digest]
    if not differ:
        return None
    what = f"its {' and '.join(differ)} differ"
    if old == new:
        return f"the model at model.path={new} is not the checkpoint's ({what})"
    return f"model.path differs from the checkpoint's ({old} -> {new}) and holds another model ({what})"


def apply_schedule_at_resumed_step(scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """Set the optimizer's lrs to this run's schedule at the resumed step. The restored optimizer holds the lrs the
    checkpoint's schedule gave the next step; with changed schedule settings (e.g. a longer train.max_steps) the
    first resumed update would use the old schedule's lr. Stepping the scheduler from the step before recomputes
    them through torch's own code (which also fills tensor lrs in place); an unchanged schedule gives the same."""
    scheduler.last_epoch -= 1
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": no update is skipped here
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
        scheduler.step()


def describe_changes(saved: dict, current: dict) -> str:
    """One line per setting that differs, with what the change does; "" when none does (or none was saved)."""
    lines = []
    for key in differing(saved, current):
        if key in MODEL_KEYS:  # the same model, or the resume was refused: a moved folder is said on its own
            continue
        if key == "train.lr":  # the optimizer's and the scheduler's saved states hold the peak lr
            effect = "not applied: the resumed run keeps the checkpoint's peak lr"
        elif key in OPTIMIZER_KEYS:
            effect = "not applied: the resumed optimizer keeps the checkpoint's value"
        elif key in SCHEDULE_KEYS:
            effect = "the learning-rate schedule changes shape from the resumed step on"
        elif key in APPLIED_KEYS:
            effect = APPLIED_KEYS[key]
        elif (before := global_batch(saved)) != (after := global_batch(current)):
            effect = f"the global batch changes from {before} to {after} rows per step"
        else:
            effect = f"the global batch stays {after} rows per step"
        lines.append(f"  {key}: {saved[key]} -> {current[key]} ({effect})")
    return "\n".join(lines)


def global_batch(settings: dict) -> int:
    return math.prod(settings[key] for key in BATCH_KEYS)
