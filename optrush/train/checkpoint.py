"""Resumable training checkpoints, written atomically.

Layout: `<output_dir>/checkpoints/step_00000040/` holds `model/`, the model in HF format with the run's tokenizer
beside it (like the run's `final/`: loadable by transformers, `optrush.load_model`, `optrush generate` and
`optrush average`, which take the step directory itself too), and `trainer_state.pt` (optimizer, scheduler, RNG
states, data-loader position, step, and the settings a resume compares). A checkpoint is first written to a hidden
temporary directory and renamed into place, so a directory named `step_*` is always complete: a process killed
mid-write leaves only a temporary directory, which the next start deletes, and the previous checkpoint stays usable.

With adapters (peft.method lora/dora, over a quantized base too, or prompt_tuning) a checkpoint holds `adapter/`
(PEFT format, every trainable tensor exactly) instead of `model/`, and the tokenizer beside it in the step directory
(as in `final/`): the frozen base is rebuilt from the config on resume, so it is never rewritten.

Distributed runs (parallel.strategy ddp/fsdp/hsdp, any world size) write a sharded torch.distributed.checkpoint
(DCP) instead: `dcp/` holds the trainable weights and the optimizer state, each rank writing its own shards in
parallel (no rank ever holds the full model), `trainer_state.pt` the scheduler and step (rank 0), and
`rank_00003.pt` rank 3's data-loader position and RNG states. DCP stores each tensor with its global shape, so a
checkpoint resumes on any world size and with any strategy, one process without a process group included
(the state-dict API `torch.distributed.checkpoint.state_dict` maps between live sharded modules and plain
names). Atomicity is the same: every rank writes into the temporary directory rank 0 created, and after a barrier
rank 0 renames it. Checkpoint directories must be on a filesystem every node sees.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from optrush.config import ConfigError
from optrush.models.io import save_model
from optrush.parallel.distributed import barrier, broadcast_object, is_main, rank
from optrush.peft.export import has_adapters, load_adapter_weights, save_adapter

STEP_DIR = re.compile(r"^step_(\d{8})$")
STATE_FILE = "trainer_state.pt"
MODEL_DIR = "model"
Extras = dict[str, Any] | None
DCP_DIR = "dcp"
# frozen weights (a LoRA run's base) are rebuilt from the config on resume, as in single-process checkpoints
DCP_OPTIONS = StateDictOptions(ignore_frozen_params=True)
# loading into a model with frozen weights (LoRA's base): those keys are absent by design; every trainable one is
# still required, because dcp.load fills the dict built from the live model's trainable tensors
DCP_LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)
# What the errors that refuse a resume offer instead. A new output_dir: checkpoint.resume=never into one that holds
# checkpoints is refused too (the new run's checkpoints would mix with the old run's).
START_FRESH = "start a new run in a new output_dir (checkpoint.resume=never)"


@dataclass
class TrainState:
    """Progress that must survive a restart, beside the model/optimizer/scheduler/loader states."""
    step: int = 0
    tokens_seen: int = 0
    losses: list[float] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    """The run's settings that a resume compares (`optrush.train.resume.run_settings`: schedule, global batch,
    optimizer, model and adapters), saved so that a resume can name what changed; a checkpoint written before a
    setting was recorded lacks it (empty in the oldest), and that setting goes unchecked."""


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    def __init__(self, directory: str | Path, *, keep_last: int, base_model_path: str | Path | None = None,
                 tokenizer=None):
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.base_model_path = base_model_path
        """Written into a LoRA checkpoint's adapter_config.json (`optrush export` finds the base there)."""
        # the run's HF tokenizer, serialised once: each save then writes these bytes into the checkpoint (so that it
        # is generated from like final/) instead of serialising the tokenizer again
        self.tokenizer_files = tokenizer_files(tokenizer) if tokenizer is not None else {}

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
        return sorted(found, key=checkpoint_step)

    def remove_partial(self) -> list[Path]:
        """Delete temporary directories left by a process killed while writing; returns what was removed."""
        if not self.directory.is_dir():
            return []
        partial = [p for p in self.directory.iterdir() if p.name.startswith(".tmp-")]
        for path in partial:
            shutil.rmtree(path, ignore_errors=True)
        return partial

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def set_aside_after(self, step: int) -> Path | None:
        """Move the complete checkpoints past `step` into one folder beside them, whose name is no checkpoint's,
        so that neither checkpoint.resume=auto nor pruning sees them; returns it (None: there were none). A run
        resumed from an earlier step writes a new history: left in place, they would be pruned as the newest
        instead of its own checkpoints, and after an interruption `auto` would continue the abandoned run."""
        later = [path for path in self.complete() if checkpoint_step(path) > step]
        if not later:
            return None
        aside = self.directory / f"abandoned_after_step_{step:08d}"
        suffix = 1
        while aside.exists():  # rolled back to this step before
            suffix += 1
            aside = self.directory / f"abandoned_after_step_{step:08d}_{suffix}"
        aside.mkdir()
        for path in later:
            os.replace(path, aside / path.name)
        return aside

    def save(self, *, model, optimizer, scheduler, loader, state: TrainState, extras: Extras = None) -> Path:
        """`extras`: further live objects with state_dict/load_state_dict (the objective's sampling state, the
        EMA weights), saved under their names."""
        extras = extras or {}
        if dist.is_initialized():
            return self.save_distributed(model=model, optimizer=optimizer, scheduler=scheduler, loader=loader,
                                         state=state, extras=extras)
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"step_{state.step:08d}"
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.directory))
        try:
            if has_adapters(model):  # LoRA/DoRA (over a quantized base too) or a soft prompt
                save_adapter(model, tmp / "adapter", base_model_path=self.base_model_path)
                self.write_tokenizer(tmp)  # beside adapter/, as in final/
            else:
                save_model(model, tmp / MODEL_DIR)
                self.write_tokenizer(tmp / MODEL_DIR)
            trainer_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                             "loader": loader.state_dict(), "rng": rng_state(), "train": vars(state).copy(),
                             **extra_states(extras)}
            with open(tmp / STATE_FILE, "wb") as f:
                torch.save(trainer_state, f)
                f.flush()
                os.fsync(f.fileno())
            if final.exists():  # the same step saved twice (e.g. periodic + final): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.prune()
        return final

    def save_distributed(self, *, model, optimizer, scheduler, loader, state: TrainState, extras: Extras) -> Path:
        """Collective: a DCP checkpoint written by every rank into rank 0's temporary directory, renamed by rank 0
        once all ranks are done."""
        final = self.directory / f"step_{state.step:08d}"
        if is_main():
            self.directory.mkdir(parents=True, exist_ok=True)
        tmp = Path(broadcast_object(tempfile.mkdtemp(prefix=".tmp-", dir=self.directory) if is_main() else None))
        try:
            dcp.save({"model": get_model_state_dict(model, options=DCP_OPTIONS),
                      "optimizer": get_optimizer_state_dict(model, optimizer, options=DCP_OPTIONS)},
                     checkpoint_id=tmp / DCP_DIR)
            # extras are per rank: each rank samples its own GRPO rollouts; EMA shadows are replicated
            write_synced({"loader": loader.state_dict(), "rng": rng_state(), **extra_states(extras)},
                         tmp / f"rank_{rank():05d}.pt")
            if is_main():
                write_synced({"scheduler": scheduler.state_dict(), "train": vars(state).copy(),
                              "world_size": dist.get_world_size()}, tmp / STATE_FILE)
            barrier()
            if is_main():
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                self.prune()
            barrier()
        except BaseException:
            if is_main():
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def write_tokenizer(self, directory: Path) -> None:
        for name, data in self.tokenizer_files.items():
            (directory / name).write_bytes(data)

    def prune(self) -> None:
        for old in self.complete()[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def checkpoint_step(path: Path) -> int:
    """The step of checkpoint directory `path` (step_00000040: 40), from its name."""
    return int(STEP_DIR.match(path.name).group(1))


def tokenizer_files(tokenizer) -> dict[str, bytes]:
    """{file name: contents} of what `tokenizer.save_pretrained` writes: the same files as the run's final/."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {f.name: f.read_bytes() for f in Path(tmp).iterdir() if f.is_file()}


def checkpoint_model_dir(path: str | Path) -> Path:
    """The HF model directory to load for `path`: a training checkpoint's step directory resolves to its `model/`
    folder (which holds the tokenizer too); any other path is returned as is. Raises, saying what to do instead,
    for step directories that hold no HF model (LoRA adapters, sharded checkpoints of distributed runs)."""
    path = Path(path)
    if (path / "config.json").is_file() or not (path / STATE_FILE).is_file():
        return path
    if (path / MODEL_DIR / "config.json").is_file():
        return path / MODEL_DIR
    if (path / "adapter").is_dir():
        raise ConfigError(f"{path} is a LoRA/adapter checkpoint (it holds adapter/, not a full model): merge it "
                          f"into its base first with `optrush export {path} --merge --out DIR`")
    if (path / DCP_DIR).is_dir():
        raise ConfigError(f"{path} is a sharded checkpoint of a distributed run (it holds {DCP_DIR}/, not an HF "
                          "model): use the run's final/ directory, or write one by resuming it with "
                          f"checkpoint.resume={path} and train.max_steps set to its step (nothing is trained)")
    raise ConfigError(f"{path} holds {STATE_FILE} but no {MODEL_DIR}/config.json: the checkpoint is incomplete")


def extra_states(extras: dict[str, Any]) -> dict[str, Any]:
    return {f"extra/{name}": obj.state_dict() for name, obj in extras.items()}


def load_extra_states(extras: dict[str, Any], saved: dict[str, Any], path: Path) -> None:
    for name, obj in extras.items():
        if f"extra/{name}" not in saved:
            raise ConfigError(f"{path} holds no {name} state (it was saved by a run without it, e.g. "
                              f"train.ema_decay=0): resume with the settings it was saved with, or {START_FRESH}")
        obj.load_state_dict(saved[f"extra/{name}"])


def load_trainer_state(path: Path) -> dict[str, Any]:
    require_trainer_state(path)
    # weights_only=False: the state holds Python RNG tuples and numpy arrays written by this module itself
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)


def saved_run(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the TrainState fields: step, settings, ...; rank 0's data-loader state) that checkpoint `path` saved, for a
    start-up check. mmap: the optimizer state beside them (gigabytes for a large model) is mapped, not read."""
    require_trainer_state(path)
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False, mmap=True)
    # a distributed run keeps each rank's loader state in its own file
    loader = state["loader"] if "loader" in state else \
        torch.load(path / f"rank_{0:05d}.pt", map_location="cpu", weights_only=False, mmap=True)["loader"]
    return state["train"], loader


def require_trainer_state(path: Path) -> None:
    """Raise, saying what to do instead, when directory `path` is not a checkpoint a run can resume."""
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"{path} is not a resumable training checkpoint (it holds no {STATE_FILE}): "
                          f"{not_a_checkpoint_advice(path)}")


def not_a_checkpoint_advice(path: Path) -> str:
    """What to do instead with `path`, which holds no trainer state: a trained model (a run's final/) is not
    resumed but starts a new run."""
    resume = ("to continue its run, resume a step directory of the run's checkpoints/ (checkpoints/step_N; "
              "checkpoint.resume=auto takes the newest in output_dir)")
    if (path / "config.json").is_file():
        return (f"it holds a trained model (like a run's final/); {resume}, or fine-tune the model further with "
                f"model.path={path} and checkpoint.resume=never in a new output_dir")
    if (path / "adapter").is_dir():
        return (f"it holds a trained adapter (like a LoRA run's final/); {resume}, or merge it with `optrush "
                f"export {path} --merge --out DIR` and fine-tune further with model.path=DIR in a new output_dir")
    return f"give a checkpoints/step_N directory of a run, or {START_FRESH}"


def write_synced(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def restore(path: Path, *, model, optimizer, scheduler, loader, extras: Extras = None,
            trainer_state: dict[str, Any] | None = None) -> TrainState:
    """Load model weights and every training state from checkpoint `path` into live objects. `trainer_state`:
    `load_trainer_state(path)` when the caller has read it already (to compare its settings before loading)."""
    from optrush.models.io import load_state_into

    saved = load_trainer_state(path) if trainer_state is None else trainer_state
    if (path / DCP_DIR).is_dir():
        return restore_distributed(path, model=model, optimizer=optimizer, scheduler=scheduler, loader=loader,
                                   extras=extras or {}, shared=saved)
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise ConfigError(f"{path} was written by a one-process run and this run shards the model "
                          "(parallel.strategy fsdp/hsdp): resume it with parallel.strategy=none or ddp, which save "
                          "sharded checkpoints that fsdp/hsdp then resume on any world size")

    if (path / "adapter").is_dir():
        load_adapter_weights(model, path / "adapter")
    else:
        load_state_into(model, path / "model")
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    loader.load_state_dict(saved["loader"])
    set_rng_state(saved["rng"])
    load_extra_states(extras or {}, saved, path)
    return TrainState(**saved["train"])


def restore_distributed(path: Path, *, model, optimizer, scheduler, loader, extras: Extras,
                        shared: dict[str, Any]) -> TrainState:
    """Load a DCP checkpoint into live (sharded, replicated or plain) objects; collective when distributed.
    DCP reshards every tensor to this run's layout, so the saving and the resuming world sizes may differ.
    `shared`: the checkpoint's trainer state (rank 0's scheduler and step)."""
    state = {"model": get_model_state_dict(model, options=DCP_OPTIONS),
             "optimizer": get_optimizer_state_dict(model, optimizer, options=DCP_OPTIONS)}
    with warnings.catch_warnings():  # a single process resuming a sharded run is intended, not a fallback
        warnings.filterwarnings("ignore", message="torch.distributed is .*assuming the intent is to load in a single "
                                                  "process")
        dcp.load(state, checkpoint_id=path / DCP_DIR)
    set_model_state_dict(model, state["model"], options=DCP_LOAD_OPTIONS)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=DCP_OPTIONS)
    scheduler.load_state_dict(shared["scheduler"])
    # a rank the saving run did not have takes the RNG of the saved rank it wraps onto; the loader position is
    # global (every rank's file holds the same one)
    saved_rank = rank() % shared["world_size"]
    mine = torch.load(path / f"rank_{saved_rank:05d}.pt", map_location="cpu", weights_only=False)
    loader.load_state_dict(mine["loader"])
    set_rng_state(mine["rng"])
    load_extra_states(extras, mine, path)
    return TrainState(**shared["train"])
