"""`optrush eval`: how good is a checkpoint? Perplexity on held-out data and metrics of generated samples, or, on
preference pairs, how a reward model or a DPO policy ranks them.

    report = evaluate("runs/x/final", data="heldout.jsonl", data_format="recipe", samples=4)
    print(report_markdown(report))
    optrush eval runs/x/final --data heldout.jsonl [--format recipe] [--samples 4] [--out report.md]
                 [data.on_error=skip data.text_column=body ...]
    optrush eval runs/dpo/final --data pairs.jsonl --format preference [--reference DIR] [dpo.beta=0.1 ...]

Perplexity is exp(mean cross-entropy) over the trained tokens of the examples that `optrush.data.dataset`
builds from the file (the same rendering, masking and length handling as training). `data_overrides` set how the
records are read and rendered (`EVAL_DATA_KEYS`); with data.on_error=skip a malformed row is counted in the report
and written to the rejects file, as in training. Samples continue the first `samples` prompts of the file (greedy
unless a temperature is given; format=text: the first `TEXT_PROMPT_TOKENS` tokens of each document, at most half
of it, as text has no prompt) and are scored by `recipe_metrics`: the repetition rate (repeated word 4-grams)
and, for recipe data only, whether the text parses as a recipe (an Ingredients: list and a Directions: list, both
non-empty) and which fraction of the listed ingredients the directions mention.

Preference data (`data.format=preference`) is scored pair by pair, with no samples, by what the model can rank:

- a reward model (the final/ of an objective=reward run): ranking accuracy (score(chosen) > score(rejected)), mean
  reward gap and the Bradley-Terry loss, as training's eval_* metrics of objective=reward;
- a causal LM: the policy's own log-prob preference accuracy and margin (summed completion log-probs of chosen vs
  rejected, no reference), and the DPO eval metrics of training (loss, accuracy, reward margin, chosen and
  rejected rewards) when the reference is known (loaded quantized where it is the base a QLoRA run trained over,
  as training's reference was): `reference` (--reference DIR), else the starting model the run recorded
  (starting_model in the run's summary.json, an absolute path, so eval may run from any directory; a LoRA preset
  run's base/; in an older summary.json, model.path, taken from the current directory); simpo and orpo need none.
  A run that started from a random model.preset init (full fine-tune) left no reference on disk: no DPO metrics
  then, and the report says how to get them. The dpo.* (reward.margin) settings are the run's own when
  its summary.json says it trained that objective; `PAIR_KEYS` overrides change them. Training's eval covers at
  most train.eval_batches micro-batches; this covers every pair of the file.

During training, `sample_during_training(model, tokenizer, cfg, step)` (train.sample_every) returns greedy samples
of `train.sample_prompts` and the same metrics, for the loop's metrics log.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import NamedTuple

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
                  "data.prompt_column", "data.completion_column", "data.messages_column", "data.chat_template",
                  "data.chosen_column", "data.rejected_column")
# How preference pairs are scored, per objective (format=preference only): the run's own values unless overridden.
PAIR_SETTINGS = {"reward": ("reward.margin",), "dpo": ("dpo.loss", "dpo.beta", "dpo.label_smoothing",
                                                       "dpo.simpo_gamma")}
PAIR_KEYS = PAIR_SETTINGS["reward"] + PAIR_SETTINGS["dpo"]
SAMPLES = 4
"""Samples drawn when none are asked for (single-example formats; preference data draws none)."""
TEXT_PROMPT_TOKENS = 32
"""format=text: a sample continues this many first tokens of a document (at most half of it)."""
SAMPLE_METRICS = {"parses": "samples parsing as recipes", "ingredient_use": "ingredients used in the directions",
                  "repetition": "repeated word 4-grams"}


def sample_metric_names(data_format: str) -> tuple[str, ...]:
    """The `recipe_metrics` that mean something for samples of `data_format`: parsing and ingredient use only
    for recipes."""
    return tuple(SAMPLE_METRICS) if data_format == "recipe" else ("repetition",)


def evaluate(ckpt: str | Path | None, *, data: str | Path, data_format: str = "recipe", max_length: int = 2048,
             samples: int | None = None, max_new_tokens: int = 256, temperature: float = 0.0,
             device: str | None = None, adapter: str | Path | None = None, base: str | Path | None = None,
             reference: str | Path | None = None, data_overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Perplexity of checkpoint `ckpt` (or of `base` + `adapter`, see optrush.generate.load) on `data` plus
    `samples` (default `SAMPLES`) generated continuations and their metrics; for data_format=preference the pair
    metrics of `evaluate_pairs` instead. `data_overrides`: `key=value` items of `EVAL_DATA_KEYS` (and, for
    preference data, `PAIR_KEYS`), e.g. data.on_error=skip."""
    from optrush.config import ConfigError, load_config
    from optrush.data.dataset import build_datasets
    from optrush.generate.load import generation_device, load_for_generation, resolve

    check_data_overrides(data_overrides, data_format)
    if samples is not None and samples < 0:
        raise ConfigError(f"--samples {samples}: give how many prompts of the file to generate from, 0 or more")
    if max_length < 1:  # named as typed: the data config would name data.max_length
        raise ConfigError(f"--max-length {max_length}: give the most tokens an example keeps, 1 or more")
    device = generation_device(device)
    if data_format == "preference":
        if samples:
            raise ConfigError("--samples: preference data is scored pair by pair and draws no samples; leave "
                              "--samples out")
        return evaluate_pairs(ckpt, data=data, max_length=max_length, device=device, adapter=adapter, base=base,
                              reference=reference, data_overrides=data_overrides)
    if reference is not None:
        raise ConfigError("--reference: only --format preference uses a reference model (for the DPO metrics); "
                          "leave it out")
    model_dir, adapter_dir, tokenizer_dir = resolve(ckpt, adapter=adapter, base=base)
    if is_reward_checkpoint(model_dir, adapter_dir):
        raise ConfigError(f"{model_dir} is a reward model (a scalar head, no language-model head): evaluate it on "
                          "preference pairs with --format preference (ranking accuracy, reward gap), or score "
                          f"texts with `optrush score {model_dir} --data FILE`")
    model, tokenizer = load_for_generation(ckpt, adapter=adapter, base=base, device=device)
    cfg = load_config(None, [f"model.path={model_dir}", f"data.path={data}", f"data.tokenizer={tokenizer_dir}",
                             f"data.format={data_format}", f"data.max_length={max_length}",
                             "data.too_long=truncate", *data_overrides]).data
    examples, _, data_report = build_datasets(cfg, tokenizer, seed=0, purpose="evaluation")
    report = {"checkpoint": checkpoint_name(model_dir, adapter_dir), "data": str(data), "format": data_format,
              "examples": len(examples), "rejected": data_report.train.rejected,
              "rejects_path": data_report.train.rejects_path, **perplexity(model, examples)}
    count = SAMPLES if samples is None else samples
    return {**report, **draw_samples(model, tokenizer, cfg, count=count, max_new_tokens=max_new_tokens,
                                     temperature=temperature)}


def checkpoint_name(model_dir: Path, adapter_dir: Path | None) -> str:
    return str(model_dir) if adapter_dir is None else f"{model_dir} + adapter {adapter_dir}"


def is_reward_checkpoint(model_dir: Path, adapter_dir: Path | None) -> bool:
    """A reward model's checkpoint, or a LoRA reward run's adapter (`is_reward_adapter`: it holds the head)."""
    from optrush.models.hf import is_reward_config
    from optrush.models.io import read_config
    from optrush.peft.export import is_reward_adapter

    if adapter_dir is not None:
        return is_reward_adapter(adapter_dir)
    return is_reward_config(read_config(model_dir))


def check_data_overrides(overrides: list[str] | tuple[str, ...], data_format: str = "recipe") -> None:
    from optrush.config import ConfigError
    from optrush.config.load import LEAF_KEYS, parse_override, unknown_key_message

    allowed = EVAL_DATA_KEYS + (PAIR_KEYS if data_format == "preference" else ())
    for item in overrides:
        key = parse_override(item)[0]
        if key not in LEAF_KEYS:  # a typo: suggested as training suggests it
            raise ConfigError(f"override {item}: {unknown_key_message(key, list(allowed))}")
        if key in PAIR_KEYS and key not in allowed:
            raise ConfigError(f"override {item}: {key} scores preference pairs; it applies with --format "
                              "preference only")
        if key not in allowed:
            raise ConfigError(f"override {item}: optrush eval takes only {', '.join(EVAL_DATA_KEYS)} (how the "
                              f"records of --data are read) and, with --format preference, {', '.join(PAIR_KEYS)} "
                              "(how pairs are scored); give the format and length with --format and --max-length")


def draw_samples(model: nn.Module, tokenizer, cfg, *, count: int, max_new_tokens: int, temperature: float) -> dict:
    """{"samples": [{"prompt", "text", <metric>: value}], "mean_<metric>": ...} of continuations of the first
    `count` prompts of `cfg.path`, with the metrics of `sample_metric_names`; no mean_* keys without samples."""
    from optrush.generate.decode import generate_texts

    prompts = sample_prompts(cfg, count, tokenizer)
    texts = generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature) \
        if prompts else []
    names = sample_metric_names(cfg.format)
    samples = []
    for prompt, text in zip(prompts, texts):
        metrics = recipe_metrics(text)
        samples.append({"prompt": prompt, "text": text, **{name: metrics[name] for name in names}})
    means = {f"mean_{name}": sum(float(s[name]) for s in samples) / len(samples) for name in names} if samples else {}
    return {"samples": samples, **means}


def sample_prompts(cfg, count: int, tokenizer) -> list[str]:
    """The prompts of the first `count` good records of `cfg.path` (chat: the conversation before its last
    assistant turn; text: the start of the document, `document_start`). Under data.on_error=skip the perplexity
    pass has already counted and written the bad rows, so here they are only passed over."""
    from optrush.data.dataset import read_source
    from optrush.data.reader import DataError
    from optrush.data.sources import Recounted

    rejects = Recounted() if cfg.on_error == "skip" else None
    prompts = []
    for where, record in read_source(cfg.path, cfg=cfg, rejects=rejects):
        if len(prompts) == count:
            break
        try:
            prompts.append(record_prompt(record, cfg=cfg, tokenizer=tokenizer, where=where))
        except DataError:
            if rejects is None:
                raise
    return prompts


def record_prompt(record: dict, *, cfg, tokenizer, where: str) -> str:
    from optrush.data.chat import chat_prompt
    from optrush.data.formats import render

    if cfg.format == "chat":
        return chat_prompt(record, cfg=cfg, tokenizer=tokenizer, where=where)
    prompt, completion = render(record, cfg=cfg, where=where)
    return document_start(completion, tokenizer) if cfg.format == "text" else prompt


def document_start(text: str, tokenizer) -> str:
    """The first `TEXT_PROMPT_TOKENS` tokens of a document, at most half of it, so that the sample has some of the
    document left to continue (a text record has no prompt of its own)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.decode(ids[:min(TEXT_PROMPT_TOKENS, len(ids) // 2)])


def evaluate_pairs(ckpt: str | Path | None, *, data: str | Path, max_length: int = 2048, device: str = "cpu",
                   adapter: str | Path | None = None, base: str | Path | None = None,
                   reference: str | Path | None = None, data_overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Pair metrics of a reward model (`reward_metrics`) or a causal LM (`policy_metrics`) on the preference
    pairs of `data`, each pair encoded as for training (`optrush.data.preference`); pairs dropped (longer than
    `max_length`, identical sides) and malformed rows skipped are counted in the report."""
    from optrush.config import load_config
    from optrush.config.load import parse_override
    from optrush.data.preference import build_preference_datasets
    from optrush.data.tokenizer import load_tokenizer
    from optrush.generate.load import load_for_generation, resolve

    model_dir, adapter_dir, tokenizer_dir = resolve(ckpt, adapter=adapter, base=base)
    objective = "reward" if is_reward_checkpoint(model_dir, adapter_dir) else "dpo"
    run = training_run(adapter_dir or model_dir)
    recorded = recorded_settings(run, objective)
    cfg = load_config(None, [f"objective={objective}", f"model.path={model_dir}", f"data.path={data}",
                             f"data.tokenizer={tokenizer_dir}", "data.format=preference",
                             f"data.max_length={max_length}", *recorded, *data_overrides])
    tokenizer = load_tokenizer(tokenizer_dir)
    pairs, _, data_report = build_preference_datasets(cfg.data, tokenizer, seed=0, purpose="evaluation")
    tally = data_report.train
    report = {"checkpoint": checkpoint_name(model_dir, adapter_dir), "data": str(data), "format": "preference",
              "pairs": len(pairs), "dropped": dict(tally.dropped), "rejected": tally.rejected,
              "rejects_path": tally.rejects_path,
              "settings_from": str(run.folder / "summary.json") if recorded else None,
              "settings_given": [item for item in data_overrides if parse_override(item)[0] in PAIR_KEYS]}
    if objective == "reward":
        return {**report, **reward_metrics(model_dir, adapter_dir, pairs, cfg=cfg, pad_id=tokenizer.pad_token_id,
                                           device=device)}
    model = load_for_generation(ckpt, adapter=adapter, base=base, device=device)[0]
    return {**report, **policy_metrics(model, pairs, cfg=cfg, pad_id=tokenizer.pad_token_id, device=device,
                                       reference=reference, run=run, model_dir=model_dir, adapter_dir=adapter_dir)}


class TrainingRun(NamedTuple):
    """What the summary.json of the run that wrote a checkpoint records."""
    folder: Path
    """The run's output directory, absolute."""
    config: dict
    starting_model: str | None
    """The absolute directory of the model the run started from; None for a random model.preset init, or in a
    summary.json written before optrush recorded it."""


def training_run(path: Path) -> TrainingRun | None:
    """The run that wrote checkpoint `path` (its final/, final/adapter, checkpoints/step_N/model or /adapter), from
    the summary.json training writes at its end; None without one."""
    for folder in list(Path(path).resolve().parents)[:3]:
        summary = folder / "summary.json"
        if summary.is_file():
            record = json.loads(summary.read_text())
            config = record.get("config")
            return TrainingRun(folder, config, record.get("starting_model")) if isinstance(config, dict) else None
    return None


def recorded_settings(run: TrainingRun | None, objective: str) -> list[str]:
    """The run's own values of `PAIR_SETTINGS[objective]` as overrides; none unless the run trained `objective`."""
    if run is None or run.config.get("objective") != objective:
        return []
    section = run.config.get(objective) or {}
    names = [key.split(".", 1)[1] for key in PAIR_SETTINGS[objective]]
    return [f"{objective}.{name}={json.dumps(section[name])}" for name in names if name in section]


@torch.no_grad()
def per_sequence(score, model: nn.Module, pairs: list, *, cfg, pad_id: int) -> torch.Tensor:
    """(N, 2) fp32 `score(model, pair_batch)` ((2P,) values: chosen, rejected, ...) of every pair of `pairs`,
    row `PreferencePair.index`. One pair a row, padded to the micro-batch's longest: rows no wider than the pairs,
    whatever the model's max_seq_len (each sequence attends only to itself, so packing would not change a value)."""
    from optrush.data.preference import PairLoader
    from optrush.objectives.dpo import pair_table

    loader = PairLoader(pairs, strategy="none", rows=8, max_length=cfg.data.max_length, pad_id=pad_id, seed=0,
                        shuffle=False)
    return pair_table(score, model, loader, size=len(pairs))


def reward_metrics(model_dir: Path, adapter_dir: Path | None, pairs: list, *, cfg, pad_id: int, device: str) -> dict:
    """The reward model of `model_dir` (a checkpoint, or the base of a LoRA reward run's `adapter_dir`) on the
    pairs: its ranking
    accuracy (score(chosen) > score(rejected)), mean reward gap and Bradley-Terry loss (with reward.margin), the
    eval metrics training logs for objective=reward."""
    from optrush.objectives.reward import load_reward_model, sequence_rewards

    model = load_reward_model(model_dir, device=device) if adapter_dir is None else \
        load_reward_model(adapter_dir, base=model_dir, device=device)
    rewards = per_sequence(sequence_rewards, model, pairs, cfg=cfg, pad_id=pad_id)
    gap = rewards[:, 0] - rewards[:, 1]
    return {"model": "reward", "reward_margin_setting": cfg.reward.margin,
            "loss": float(-torch.nn.functional.logsigmoid(gap - cfg.reward.margin).mean()),
            "accuracy": float((gap > 0).float().mean()), "reward_gap": float(gap.mean())}


def policy_metrics(model: nn.Module, pairs: list, *, cfg, pad_id: int, device: str,
                   reference: str | Path | None, run: TrainingRun | None, model_dir: Path,
                   adapter_dir: Path | None) -> dict:
    """A causal LM's own preference, no reference: how often its summed completion log-prob (and its mean per
    token, which a length difference does not sway) is higher for chosen than for rejected, and the mean summed
    margin; with the reference known (`dpo_reference`) or not needed, the DPO eval metrics of training under
    cfg.dpo. `model` is `model_dir`, or the base `model_dir` with `adapter_dir`: they say whether the reference
    is loaded quantized (`reference_quantization`)."""
    from optrush.models.io import load_model
    from optrush.objectives.dpo import REFERENCE_FREE, preference_losses, sequence_logps

    def completion_logps(m, batch):
        return sequence_logps(m, batch)[0]

    logps = per_sequence(completion_logps, model, pairs, cfg=cfg, pad_id=pad_id)
    tokens = torch.tensor([[p.chosen.num_trained, p.rejected.num_trained] for p in pairs],
                          dtype=torch.float32)  # pairs[i].index == i, as in `per_sequence`
    per_token = logps / tokens
    d = cfg.dpo
    report = {"model": "policy", "logp_accuracy": float((logps[:, 0] > logps[:, 1]).float().mean()),
              "logp_accuracy_per_token": float((per_token[:, 0] > per_token[:, 1]).float().mean()),
              "logp_margin": float((logps[:, 0] - logps[:, 1]).mean()),
              "dpo": {"loss": d.loss, "beta": d.beta, "label_smoothing": d.label_smoothing,
                      "simpo_gamma": d.simpo_gamma}}
    reference_dir, report["reference_note"] = dpo_reference(d.loss, reference, run)
    report["reference"] = None if reference_dir is None else str(reference_dir)
    if reference_dir is None and d.loss not in REFERENCE_FREE:
        return report
    ref = None
    if reference_dir is not None:
        quantize = reference_quantization(reference_dir, model_dir=model_dir, adapter_dir=adapter_dir, run=run)
        if quantize != "none":
            report["reference_note"] += f"; loaded {quantize}-quantized, as training held it (peft.quantize={quantize})"
        ref = per_sequence(completion_logps, load_model(reference_dir, device=device, quantize=quantize).eval(),
                           pairs, cfg=cfg, pad_id=pad_id)
    losses, chosen, rejected = preference_losses(
        d.loss, chosen=logps[:, 0], rejected=logps[:, 1], chosen_tokens=tokens[:, 0], rejected_tokens=tokens[:, 1],
        ref_chosen=None if ref is None else ref[:, 0], ref_rejected=None if ref is None else ref[:, 1],
        beta=d.beta, label_smoothing=d.label_smoothing, gamma=d.simpo_gamma)
    return {**report, "loss": float(losses.mean()), "accuracy": float((chosen > rejected).float().mean()),
            "reward_margin": float((chosen - rejected).mean()), "chosen_reward": float(chosen.mean()),
            "rejected_reward": float(rejected.mean())}


def reference_quantization(reference_dir: Path, *, model_dir: Path, adapter_dir: Path | None,
                           run: TrainingRun | None) -> str:
    """How to load DPO reference `reference_dir` (none, nf4, int8) so that it is the model training compared
    against. A QLoRA run's reference was its quantized base (a frozen copy of the starting model, or with
    dpo.reference=lora_disabled the policy with its adapters off): the base adapter `adapter_dir` trained over
    loads as `base_quantization` says; with no adapter (a QLoRA run's merged final/), the run's starting model
    loads with the run's peft.quantize, except a preset run's base/, which holds those weights dequantized
    already. Any other model loads as it is."""
    from optrush.peft.export import PRESET_BASE_FILE, base_quantization

    if adapter_dir is not None:
        return base_quantization(adapter_dir, model_dir) if same_directory(reference_dir, model_dir) else "none"
    started_there = run is not None and any(same_directory(reference_dir, path)
                                            for path, _ in starting_model_places(run))
    if not started_there or (reference_dir / PRESET_BASE_FILE).is_file():
        return "none"
    return (run.config.get("peft") or {}).get("quantize", "none")


def same_directory(a: Path, b: Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def dpo_reference(loss: str, reference: str | Path | None, run: TrainingRun | None) -> tuple[Path | None, str]:
    """(the DPO reference model's directory or None, where it comes from or why there is none)."""
    from optrush.objectives.dpo import REFERENCE_FREE
    from optrush.train.checkpoint import checkpoint_model_dir

    if loss in REFERENCE_FREE:
        return None, f"dpo.loss={loss} needs no reference"
    if reference is not None:
        return checkpoint_model_dir(reference), "given with --reference"
    ask = "pass --reference DIR (the model the DPO run started from) for the DPO metrics"
    if run is None:
        return None, f"no summary.json of a training run beside the checkpoint names a DPO reference: {ask}"
    summary = run.folder / "summary.json"
    if run.config.get("objective") != "dpo":
        return None, f"the checkpoint's run trained objective={run.config.get('objective')} ({summary}), not dpo: {ask}"
    places = starting_model_places(run)
    for path, how in places:
        if (path / "config.json").is_file():
            return path, f"the run's starting model ({how})"
    if places:
        tried = "; ".join(f"{path} ({how})" for path, how in places)
        return None, f"the run's starting model is not where {summary} says (tried {tried}): {ask}"
    preset = (run.config.get("model") or {}).get("preset")
    return None, (f"the run's reference was its starting model, a random model.preset={preset} init that no "
                  "directory holds; --reference DIR gives the DPO metrics against another model instead")


def starting_model_places(run: TrainingRun) -> list[tuple[Path, str]]:
    """Where the model `run` started from may be, best first, each with how it was found: the absolute path
    training records; a LoRA preset run's base/, found in the run directory even after it moved; in a summary.json
    of an older optrush, which recorded no starting_model, its model.path (relative to where training ran, which
    is taken to be here)."""
    summary = run.folder / "summary.json"
    places = [(Path(run.starting_model), f"starting_model in {summary}")] if run.starting_model else []
    if (run.folder / "base").is_dir():
        places.append((run.folder / "base", "the preset base/ a LoRA run writes"))
    recorded = (run.config.get("model") or {}).get("path")
    if run.starting_model is None and recorded is not None:
        places.append((Path(recorded).absolute(), f"model.path={recorded} in {summary}, from this directory"))
    return places


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
    for key in sample_metric_names(cfg.data.format):
        metrics[f"sample_{key}"] = sum(float(s[key]) for s in scores) / len(scores)
    return metrics


def report_markdown(report: dict, *, with_samples: bool = True) -> str:
    if report.get("format") == "preference":
        return pairs_markdown(report)
    skipped = (f"; skipped {report['rejected']} malformed rows (data.on_error=skip), written to "
               f"{report['rejects_path']}") if report["rejected"] else ""
    lines = [f"# Evaluation of {report['checkpoint']}", "", f"Data: {report['data']} ({report['examples']} examples, "
             f"{report['tokens']} trained tokens){skipped}", "", "| metric | value |", "| --- | ---: |",
             f"| loss | {report['loss']:.4f} |", f"| perplexity | {report['perplexity']:.3f} |"]
    lines += [f"| {label} | {report[f'mean_{name}']:.2f} |" for name, label in SAMPLE_METRICS.items()
              if f"mean_{name}" in report]
    if report["samples"] and report.get("format") == "text":
        lines += ["", f"Each sample continues the first {TEXT_PROMPT_TOKENS} tokens (at most half) of a document."]
    if with_samples:
        for number, sample in enumerate(report["samples"], 1):
            lines += ["", f"## Sample {number} ({sample_scores(sample)})", "", "```", sample["prompt"] + sample["text"],
                      "```"]
    return "\n".join(lines) + "\n"


def sample_scores(sample: dict) -> str:
    scores = [f"parses: {sample['parses']}"] if "parses" in sample else []
    if "ingredient_use" in sample:
        scores.append(f"ingredient use {sample['ingredient_use']:.2f}")
    return ", ".join([*scores, f"repetition {sample['repetition']:.2f}"])


def pairs_markdown(report: dict) -> str:
    from optrush.data.preference import PAIR_DROPS

    left_out = [f"dropped {count} as {reason} ({PAIR_DROPS[reason]})" for reason, count in report["dropped"].items()]
    if report["rejected"]:
        left_out.append(f"skipped {report['rejected']} malformed rows (data.on_error=skip), written to "
                        f"{report['rejects_path']}")
    lines = [f"# Evaluation of {report['checkpoint']}", "",
             f"Data: {report['data']} ({report['pairs']} preference pairs{''.join('; ' + s for s in left_out)})",
             "", "| metric | value |", "| --- | ---: |"]
    sources = ([f"the run's from {report['settings_from']}"] if report["settings_from"] else []) + \
        [f"given {item}" for item in report["settings_given"]]
    settings = f" ({'; '.join(sources)})" if sources else ""
    if report["model"] == "reward":
        lines += [f"| ranking accuracy (score(chosen) > score(rejected)) | {report['accuracy']:.3f} |",
                  f"| mean reward gap (score(chosen) - score(rejected)) | {report['reward_gap']:.4f} |",
                  f"| Bradley-Terry loss (reward.margin={report['reward_margin_setting']:g}) | {report['loss']:.4f} |"]
        return "\n".join([*lines, "", f"A reward model's eval metrics, as training logs them{settings}."]) + "\n"
    lines += [f"| log-prob preference accuracy (policy alone: log p(chosen) > log p(rejected)) | "
              f"{report['logp_accuracy']:.3f} |",
              f"| the same per completion token (mean log-prob, length aside) | "
              f"{report['logp_accuracy_per_token']:.3f} |",
              f"| mean log-prob margin (policy alone, summed over the completion) | {report['logp_margin']:.4f} |"]
    d = report["dpo"]
    dpo = f"dpo.loss={d['loss']}, dpo.beta={d['beta']:g}"
    if "loss" not in report:
        return "\n".join([*lines, "", f"No DPO metrics: {report['reference_note']}."]) + "\n"
    lines += [f"| DPO loss ({dpo}) | {report['loss']:.4f} |",
              f"| DPO accuracy (implicit reward of chosen > rejected) | {report['accuracy']:.3f} |",
              f"| DPO reward margin | {report['reward_margin']:.4f} |",
              f"| DPO chosen reward | {report['chosen_reward']:.4f} |",
              f"| DPO rejected reward | {report['rejected_reward']:.4f} |"]
    reference = report["reference_note"] if report["reference"] is None \
        else f"{report['reference']}, {report['reference_note']}"
    return "\n".join([*lines, "", f"DPO settings: {dpo}, dpo.label_smoothing={d['label_smoothing']:g}{settings}; "
                                  f"reference: {reference}."]) + "\n"
