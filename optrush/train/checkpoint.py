"""Resumable training checkpoints, written atomically.

Layout: `<output_dir>/checkpoints/step_00000040/` holds the model in HF format (config.json + safetensors, loadable by
transformers and `optrush.load_model`) and `trainer_state.pt` (optimizer, scheduler, RNG states, data-loader
position, step). A checkpoint is first written to a hidden temporary directory and renamed into place, so a directory
named `step_*` is always complete: a process killed mid-write leaves only a temporary directory, which the next
start deletes, and the previous checkpoint stays usable.

With LoRA adapters (peft.method lora/dora) a checkpoint holds `adapter/` (PEFT format, every trainable tensor
exactly) instead of `model/`: the frozen base is rebuilt from the config on resume, so it is never rewritten.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from optrush.models.io import save_model
from optrush.peft.export import load_adapter_weights, save_adapter
from optrush.peft.lora import has_lora

STEP_DIR = re.compile(r"^step_(\d{8})$")
STATE_FILE = "trainer_state.pt"


@dataclass
class TrainState:
    """Progress that must survive a restart, beside the model/optimizer/scheduler/loader states."""
    step: int = 0
    tokens_seen: int = 0
    losses: list[float] = field(default_factory=list)


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
    def __init__(self, directory: str | Path, *, keep_last: int, base_model_path: str | None = None):
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.base_model_path = base_model_path
        """Written into a LoRA checkpoint's adapter_config.json (`optrush export` finds the base there)."""

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
        return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))

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

    def save(self, *, model, optimizer, scheduler, loader, state: TrainState) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"step_{state.step:08d}"
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.directory))
        try:
            if has_lora(model):
                save_adapter(model, tmp / "adapter", base_model_path=self.base_model_path)
            else:
                save_model(model, tmp / "model")
            trainer_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                             "loader": loader.state_dict(), "rng": rng_state(), "train": vars(state).copy()}
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

    def prune(self) -> None:
        for old in self.complete()[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def load_trainer_state(path: Path) -> dict[str, Any]:
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{state_file} is missing: {path} is not an optrush training checkpoint "
                                "(use checkpoint.resume=never to start fresh)")
    # weights_only=False: the state holds Python RNG tuples and numpy arrays written by this module itself
    return torch.load(state_file, map_location="cpu", weights_only=False)


def restore(path: Path, *, model, optimizer, scheduler, loader) -> TrainState:
    """Load model weights and every training state from checkpoint `path` into live objects."""
    from optrush.models.io import load_state_into

    if (path / "adapter").is_dir():
        load_adapter_weights(model, path / "adapter")
    else:
        load_state_into(model, path / "model")
    saved = load_trainer_state(path)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    loader.load_state_dict(saved["loader"])
    set_rng_state(saved["rng"])
    return TrainState(**saved["train"])
