"""`optrush demo`: the whole product in two minutes on a CPU, offline.

1. generate a deterministic synthetic recipe corpus (with a few deliberately bad records),
2. clean it and print what each rule dropped,
3. train a byte-level BPE tokenizer on the cleaned text,
4. fine-tune a fresh ~3M-parameter Llama on recipe prompt -> completion with packed batches,
5. print two sampled recipes, and check that transformers loads the saved HF checkpoint.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import time
from importlib import resources
from pathlib import Path

import torch

from optrush.config import ConfigError, load_config
from optrush.data.clean import clean_records
from optrush.data.recipes import generate_recipes, recipe_completion, recipe_prompt, write_jsonl
from optrush.data.tokenizer import train_tokenizer
from optrush.generate.decode import generate_texts
from optrush.models.io import load_model
from optrush.train import train
from optrush.train.loop import resolve_device

DEMO_RECORDS = 6000
DEMO_MIN_RECORDS = 20
"""Fewer synthetic recipes leave too few after cleaning to train on and hold some out for evaluation (20 keep 5)."""
SAMPLE_TITLES = ("Recipe: Easy Garlic Chicken Soup\n", "Recipe: Lemon Butter Pasta\n")


def demo_config_path() -> Path:
    return Path(str(resources.files("optrush") / "recipes" / "demo.yaml"))


def train_demo_tokenizer(records: list[dict], out_dir: str | Path):
    """The demo's byte-level BPE of 2048 tokens, trained on the recipes' prompt + completion text."""
    return train_tokenizer((recipe_prompt(r) + recipe_completion(r) for r in records), vocab_size=2048,
                           out_dir=out_dir)


def run_demo(*, out_dir: str | Path = "demo_run", steps: int | None = None, records: int | None = None) -> dict:
    started = time.perf_counter()
    out = Path(out_dir)
    data_dir, tokenizer_dir, clean_path = out / "data", out / "tokenizer", out / "data" / "recipes.jsonl"
    # every setting is checked before minutes go into the data and the tokenizer
    check_demo_arguments(steps=steps, records=records)
    overrides = [f"data.path={clean_path}", f"data.tokenizer={tokenizer_dir}", f"output_dir={out / 'run'}",
                 "checkpoint.resume=never"]
    if steps is not None:
        overrides += [f"train.max_steps={steps}", f"train.warmup_steps={min(10, steps)}",
                      f"train.eval_every={max(1, steps // 3)}", f"checkpoint.every={max(1, steps // 3)}"]
    cfg = load_config(demo_config_path(), overrides)
    data_dir.mkdir(parents=True, exist_ok=True)

    raw = list(generate_recipes(DEMO_RECORDS if records is None else records, seed=0))
    write_jsonl(raw, data_dir / "raw.jsonl")
    kept, report = clean_records(raw)
    print(f"[1/4] generated {len(raw)} synthetic recipes; cleaning kept {len(kept)}:\n{report.format()}", flush=True)
    write_jsonl(kept, clean_path)

    tokenizer = train_demo_tokenizer(kept, tokenizer_dir)
    print(f"[2/4] trained a byte-level BPE tokenizer of {len(tokenizer)} tokens -> {tokenizer_dir}", flush=True)

    device = resolve_device(cfg.train.device)  # the device training takes, not the config's "auto"
    print(f"[3/4] training a {cfg.model.preset!r} Llama for {cfg.train.max_steps} steps on {device.type}", flush=True)
    if Path(cfg.output_dir).exists():  # an earlier demo's run: a new run may not mix its checkpoints with it
        shutil.rmtree(cfg.output_dir)
        print(f"      removed the earlier demo run in {cfg.output_dir}", flush=True)
    summary = train(cfg)

    final_dir = Path(cfg.output_dir) / "final"
    model = load_model(final_dir)
    print("[4/4] two sampled recipes from the fine-tuned model:", flush=True)
    texts = generate_texts(model, tokenizer, list(SAMPLE_TITLES), max_new_tokens=160, temperature=0.7, top_k=40,
                           generator=torch.Generator().manual_seed(0))
    for prompt, text in zip(SAMPLE_TITLES, texts):
        print("-" * 60 + f"\n{prompt}{text}", flush=True)
    check_transformers_loads(final_dir)
    print(f"demo finished in {time.perf_counter() - started:.0f}s: loss {summary['losses'][0]:.2f} -> "
          f"{summary['final_loss']:.2f}; HF checkpoint at {final_dir}", flush=True)
    return summary


def check_demo_arguments(*, steps: int | None, records: int | None) -> None:
    """Refuse --steps and --records the demo cannot run with, before any work."""
    if steps is not None and steps < 1:
        raise ConfigError(f"--steps {steps}: give at least 1 optimizer step (or leave --steps out for the recipe's "
                          "own)")
    if records is not None and records < DEMO_MIN_RECORDS:
        raise ConfigError(f"--records {records}: the demo needs at least {DEMO_MIN_RECORDS} synthetic recipes (in "
                          "fewer, most ingredients appear in one recipe only, and cleaning's rare_vocabulary rule "
                          "drops nearly every recipe, leaving none to train on); give --records "
                          f"{DEMO_MIN_RECORDS} or more (default: {DEMO_RECORDS})")


def check_transformers_loads(path: Path) -> None:
    from transformers import AutoModelForCausalLM

    with quiet_loggers("torchao", "torch.utils._pytree"):
        AutoModelForCausalLM.from_pretrained(path)
    print(f"transformers.AutoModelForCausalLM.from_pretrained({str(path)!r}) loads the checkpoint", flush=True)


@contextlib.contextmanager
def quiet_loggers(*names: str):
    """Only errors from these loggers for the duration. transformers imports torchao while it loads a model, and
    torchao logs each CUDA extension a CPU machine cannot load and each torch deprecation it trips: lines about a
    library the demo never uses, at the end of a run that worked."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
