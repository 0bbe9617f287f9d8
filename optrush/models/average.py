"""Checkpoint averaging: the arithmetic mean of the weights of several checkpoints of one run.

    average_checkpoints(["run/checkpoints/step_00000800", "run/checkpoints/step_00000900", "run/final"],
                        out="run/averaged")
    optrush average run/checkpoints/step_00000800 run/checkpoints/step_00000900 run/final --out run/averaged

Averaging the last few checkpoints of a run smooths out the noise of the final steps and often evaluates a little
better than any one of them (lecture 002; https://arxiv.org/abs/1803.05407 for the idea). The mean is accumulated in
fp32 and written in the first checkpoint's dtype, with the tokenizer files of the first checkpoint holding one beside
it. A training checkpoint's step directory stands for its `model/` folder (which holds the run's tokenizer).
"""
from __future__ import annotations

import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from optrush.data.tokenizer import holds_tokenizer
from optrush.models.io import CONFIG_FILE, load_model, read_config, save_model
from optrush.models.llama import Transformer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "generation_config.json")


@torch.no_grad()
def average_checkpoints(paths: Sequence[str | Path], *, out: str | Path) -> Transformer:
    """Save the mean of the checkpoints in `paths` (same architecture) to `out` and return it."""
    if len(paths) < 1:
        raise ValueError("give at least one checkpoint to average")
    from optrush.train.checkpoint import checkpoint_model_dir  # optrush.train builds on optrush.models

    paths = [checkpoint_model_dir(p) for p in paths]
    first_config = read_config(paths[0])
    model = load_model(paths[0])
    if not isinstance(model, Transformer):
        raise ValueError(f"{paths[0]}: averaging needs a native optrush model (Llama, Qwen2/3, Mistral)")
    dtype = model.tok_embeddings.weight.dtype
    total = {name: p.float().clone() for name, p in model.named_parameters()}
    for path in paths[1:]:
        config = read_config(path)
        for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"):
            if config.get(key) != first_config.get(key):
                raise ValueError(f"{path / CONFIG_FILE}: {key}={config.get(key)!r} differs from "
                                 f"{paths[0] / CONFIG_FILE} ({first_config.get(key)!r}); average checkpoints of one run")
        other = dict(load_model(path, dtype=torch.float32).named_parameters())
        for name in total:
            total[name] += other[name]
    for name, param in model.named_parameters():
        param.copy_((total[name] / len(paths)).to(dtype))
    save_model(model, out)
    copy_tokenizer(paths, Path(out))
    return model


def copy_tokenizer(paths: Sequence[Path], out: Path) -> None:
    """The tokenizer files of the first of `paths` holding a tokenizer, copied into `out`."""
    source = next((p for p in paths if holds_tokenizer(p)), None)
    if source is None:
        warnings.warn(f"none of the averaged checkpoints holds a tokenizer: copy the run's tokenizer files into "
                      f"{out} before generating from it", stacklevel=3)
        return
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
