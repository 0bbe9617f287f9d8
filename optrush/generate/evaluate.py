"""`optrush eval`: how good is a checkpoint? Perplexity on held-out data, and recipe metrics on generated samples.

    report = evaluate("runs/x/final", data="heldout.jsonl", data_format="recipe", samples=4)
    print(report_markdown(report))
    optrush eval runs/x/final --data heldout.jsonl [--format recipe] [--samples 4] [--out report.md]
                 [data.on_error=skip data.text_column=body ...]

Perplexity is exp(mean cross-entropy) over the trained tokens of the examples that `optrush.data.dataset`
builds from the file (the same rendering, masking and length handling as training). `data_overrides` set how the
records are read and rendered (`EVAL_DATA_KEYS`); with data.on_error=skip a malformed row is counted in the report
and written to the rejects file, as in training. Samples continue the first `samples` prompts of the file (greedy
unless a temperature is given) and are scored by `recipe_metrics`:
whether the text parses as a recipe (an Ingredients: list and a Directions: list, both non-empty), which fraction
of the listed ingredients the directions mention, and the repetition rate (repeated word 4-grams).

During training, `sample_during_training(model, tokenizer, cfg, step)` (train.sample_every) returns greedy samples
of `train.sample_prompts` and the same metrics, for the loop's metrics log.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn

from optrush.data.batch import IGNORE_INDEX
from optrush.data.formats import Example
from optrush.parallel.distributed import world_size

UNITS = {"cup", "cups", "tablespoon", "tablespoons", "teaspoon", "teaspoons", "pound", "pounds", "ounce", "ounces",
         "g", "kg", "ml", "l", "pinch", "cloves", "clove", "can", "cans", "slices", "slice", "large", "small",
         "medium", "lb", "lbs", "oz", "tbsp", "tsp", "package", "packages", "stick", "sticks"}


@torch.no_grad()
def perplexity(model: nn.Module, examples: list[Example], *, batch_size: int = 8) -> dict:
    """{"loss", "perplexity", "tokens"} over the trained tokens of `examples` (right-padded batches)."""
    device = model.tok_embeddings.weight.device
    total, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            width = max(len(e) for e in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
            for row, example in enumerate(chunk):
                ids[row, :len(example)] = torch.tensor(example.input_ids)
                labels[row, :len(example)] = torch.tensor(example.labels)
            total += float(model(ids.to(device), labels=labels.to(device), reduction="sum"))
            tokens += int((labels != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    loss = total / tokens if tokens else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if tokens else float("nan"), "tokens": tokens}


def _section(text: str, name: str, until: str | None) -> list[str]:
    match = re.search(rf"{name}:\s*\n(.*)", text, flags=re.S)
    if match is None:
        return []
    body = match.group(1)
    if until is not None:
        body = body.split(f"{until}:")[0]
    return [line.strip() for line in body.splitlines() if line.strip()]


def ingredient_name(line: str) -> str:
    """'- 1/4 cup butter' -> 'butter': the line without its dash, quantities and units."""
    words = line.lstrip("-* ").lower().split()
    while words and (re.fullmatch(r"[\d/.,½¼¾-]+", words[0]) or words[0] in UNITS):
        words.pop(0)
    return " ".join(words)


def recipe_metrics(text: str) -> dict:
    """{"parses", "ingredients", "ingredient_use", "repetition"} of one generated recipe text."""
    ingredients = [ingredient_name(line) for line in _section(text, "Ingredients", "Directions")]
    ingredients = [name for name in ingredients if name]
    directions = " ".join(_section(text, "Directions", None)).lower()
    used = [name for name in ingredients if name in directions or name.split()[-1] in directions]
    words = text.lower().split()
    grams = [tuple(words[i:i + 4]) for i in range(len(words) - 3)]
    return {"parses": bool(ingredients) and bool(directions), "ingredients": len(ingredients),
            "ingredient_use": len(used) / len(ingredients) if ingredients else 0.0,
            "repetition": 1 - len(set(grams)) / len(grams) if grams else 0.0}


# The data.* keys `evaluate` takes from the user: how records are read and rendered. The others are set by
# evaluate itself (path, tokenizer, format, max_length, too_long) or would leave records out of the evaluation.
EVAL_DATA_KEYS = ("data.on_error", "data.rejects_path", "data.json_columns", "data.text_column",
                  "data.prompt_column", "data.completion_column", "data.messages_column", "data.chat_template")


def evaluate(ckpt: str | Path | None, *, data: str | Path, data_format: str = "recipe", max_length: int = 2048,
             samples: int = 4, max_new_tokens: int = 256, temperature: float = 0.0, device: str | None = None,
             adapter: str | Path | None = None, base: str | Path | None = None,
             data_overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Perplexity of checkpoint `ckpt` (or of `base` + `adapter`, see optrush.generate.load) on `data` plus
    `samples` generated continuations and their metrics. `data_overrides`: `key=value` items of `EVAL_DATA_KEYS`,
    e.g. data.on_error=skip."""
    from optrush.config import load_config
    from optrush.data.dataset import build_datasets
    from optrush.generate.decode import generate_texts
    from optrush.generate.load import load_for_generation, resolve

    check_data_overrides(data_overrides)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_for_generation(ckpt, adapter=adapter, base=base, device=device)
    model_dir, adapter_dir, tokenizer_dir = resolve(ckpt, adapter=adapter, base=base)
    cfg = load_config(None, [f"model.path={model_dir}", f"data.path={data}", f"data.tokenizer={tokenizer_dir}",
                             f"data.format={data_format}", f"data.max_length={max_length}",
                             "data.too_long=truncate", *data_overrides]).data
    examples, _, data_report = build_datasets(cfg, tokenizer, seed=0)
    name = str(model_dir) if adapter_dir is None else f"{model_dir} + adapter {adapter_dir}"
    report = {"checkpoint": name, "data": str(data), "examples": len(examples), "rejected": data_report.train.rejected,
              "rejects_path": data_report.train.rejects_path, **perplexity(model, examples)}
    prompts = sample_prompts(cfg, samples, tokenizer)
    texts = generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature) \
        if prompts else []
    report["samples"] = [{"prompt": p, "text": t, **recipe_metrics(t)} for p, t in zip(prompts, texts)]
    for key in ("parses", "ingredient_use", "repetition"):
        values = [float(s[key]) for s in report["samples"]]
        report[f"mean_{key}"] = sum(values) / len(values) if values else float("nan")
    return report


def check_data_overrides(overrides: list[str] | tuple[str, ...]) -> None:
    from optrush.config import ConfigError
    from optrush.config.load import parse_override

    for item in overrides:
        key = parse_override(item)[0]
        if key not in EVAL_DATA_KEYS:
            raise ConfigError(f"override {item}: optrush eval takes only {', '.join(EVAL_DATA_KEYS)} (how the "
                              "records of --data are read); give the format and length with --format and "
                              "--max-length")


def sample_prompts(cfg, count: int, tokenizer) -> list[str]:
    """The prompts of the first `count` good records of `cfg.path` (chat: the conversation before its last
    assistant turn). Under data.on_error=skip the perplexity pass has already counted and written the bad rows, so
    here they are only passed over."""
    from optrush.data.chat import chat_prompt
    from optrush.data.dataset import read_source
    from optrush.data.formats import render
    from optrush.data.reader import DataError
    from optrush.data.sources import Recounted

    rejects = Recounted() if cfg.on_error == "skip" else None
    prompts = []
    for where, record in read_source(cfg.path, cfg=cfg, rejects=rejects):
        if len(prompts) == count:
            break
        try:
            prompts.append(chat_prompt(record, cfg=cfg, tokenizer=tokenizer, where=where) if cfg.format == "chat"
                           else render(record, cfg=cfg, where=where)[0])
        except DataError:
            if rejects is None:
                raise
    return prompts


def sample_during_training(model: nn.Module, tokenizer, cfg, step: int) -> dict:
    """At a step that `cfg.train.sample_every` divides, greedy continuations of `cfg.train.sample_prompts` as
    metrics: `sample_<i>` (the texts), `sample_repetition` and, for recipe data, `sample_parses` and
    `sample_ingredient_use` (means over the prompts); {} at other steps. Greedy decoding draws no random numbers,
    so sampling leaves a run's RNG streams (and its exact resume) untouched; the model's mode is restored."""
    from optrush.generate.decode import generate_texts

    t = cfg.train
    if not t.sample_every or step % t.sample_every:
        return {}
    texts = generate_texts(model, tokenizer, t.sample_prompts, max_new_tokens=t.sample_max_new_tokens,
                           temperature=0, stop_together=world_size() > 1)  # every rank decodes (sharded weights)
    scores = [recipe_metrics(text) for text in texts]
    metrics: dict = {f"sample_{i}": text for i, text in enumerate(texts)}
    keys = ("repetition", "parses", "ingredient_use") if cfg.data.format == "recipe" else ("repetition",)
    for key in keys:
        metrics[f"sample_{key}"] = sum(float(s[key]) for s in scores) / len(scores)
    return metrics


def report_markdown(report: dict, *, with_samples: bool = True) -> str:
    skipped = (f"; skipped {report['rejected']} malformed rows (data.on_error=skip), written to "
               f"{report['rejects_path']}") if report["rejected"] else ""
    lines = [f"# Evaluation of {report['checkpoint']}", "", f"Data: {report['data']} ({report['examples']} examples, "
             f"{report['tokens']} trained tokens){skipped}", "", "| metric | value |", "| --- | ---: |",
             f"| loss | {report['loss']:.4f} |", f"| perplexity | {report['perplexity']:.3f} |",
             f"| samples parsing as recipes | {report['mean_parses']:.2f} |",
             f"| ingredients used in the directions | {report['mean_ingredient_use']:.2f} |",
             f"| repeated word 4-grams | {report['mean_repetition']:.2f} |"]
    if with_samples:
        for number, sample in enumerate(report["samples"], 1):
            lines += ["", f"## Sample {number} (parses: {sample['parses']}, ingredient use "
                      f"{sample['ingredient_use']:.2f}, repetition {sample['repetition']:.2f})", "", "```",
                      sample["prompt"] + sample["text"], "```"]
    return "\n".join(lines) + "\n"
